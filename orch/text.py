"""Text that came from elsewhere (the scheduler, a worker, a job spec) made safe to print on a terminal."""

from __future__ import annotations

from typing import Any


def visible(text: Any) -> str:
    """``text`` with every character Python does not call printable written as an escape, as repr() writes it.

    That covers the C0 controls (ESC, CR, BS...), DEL, the C1 controls, line and paragraph separators and
    the Unicode format controls that reorder or hide text (U+202E, U+2066, U+200F, U+FEFF...): a job name,
    a command or a worker name can then neither rewrite the screen nor pass for a different line or row.
    Backslashes are left alone, so commands read as they were given.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
