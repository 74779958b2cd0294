"""How a job's output is shown when some of it was not kept: a marker where the hole is.

Output is stored as chunks, each knowing where it starts in its stream
(``pos``, in bytes). Two things leave holes: the worker drops the oldest
unsent output of a stream that grows faster than the scheduler takes it (the
next chunk then starts further on), and the store keeps only the tail of
each stream (``scheduler.output_limit_bytes``). Wherever the bytes shown jump,
the text gets ``[orch: N bytes of stdout not kept]`` on a line of its own,
in the stored output (``GET /v1/jobs/{id}``, ``orch logs``) and in the
followers' streams (``orch logs -f``, ``orch run --wait``) alike.
"""

from __future__ import annotations

from typing import Iterable


def marker(stream: str, nbytes: int, after: str = "\n") -> str:
    """The text standing for ``nbytes`` of ``stream`` not kept; ``after`` is what was shown before it
    (a marker that would not start a line gets a newline before it)."""
    lead = "" if not after or after.endswith("\n") else "\n"
    return f"{lead}[orch: {nbytes:,} bytes of {stream} not kept]\n"


def _tail(text: str, nbytes: int) -> str:
    if text.isascii():
        return text[len(text) - nbytes:] if 0 < nbytes < len(text) else (text if nbytes > 0 else "")
    raw = text.encode("utf-8")
    return raw[len(raw) - nbytes:].decode("utf-8", "ignore") if nbytes < len(raw) else text


def render(stream: str, pieces: Iterable[tuple[int, str, int]], total: int, limit: int) -> tuple[str, bool]:
    """One stream of an attempt as text, from its stored ``(pos, data, size)`` pieces in order, of
    ``total`` bytes written in all: at most the last ``limit`` bytes of data, holes marked; and whether
    anything is missing."""
    kept = list(pieces)
    size = sum(p[2] for p in kept)
    while kept and size - kept[0][2] >= limit:  # whole pieces beyond the limit go first
        size -= kept.pop(0)[2]
    if kept and size > limit:  # then the head of the first one
        pos, data, n = kept[0]
        text = _tail(data, n - (size - limit))
        cut = n - len(text.encode("utf-8"))
        kept[0] = (pos + cut, text, n - cut)
    out: list[str] = []
    at = 0  # the stream position the text shown so far has reached
    last = ""
    missing = False
    for pos, data, n in kept:
        if pos > at:
            out.append(marker(stream, pos - at, last))
            missing = True
        if data:
            out.append(data)
            last = data
        at = max(at, pos + n)
    if total > at:
        out.append(marker(stream, total - at, last))
        missing = True
    return "".join(out), missing
