"""Times as the API and the CLI write them."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def iso(ts: float | None) -> str | None:
    """Unix seconds to an ISO 8601 UTC string with milliseconds (None stays None).

    The same text as ``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")``
    with a ``Z``, at a quarter of the cost: a job list shows three per job, and jobs of
    one second share the part up to the second, which is remembered.
    """
    if ts is None:
        return None
    frac, whole = math.modf(ts)  # rounded to microseconds as datetime does, then cut to milliseconds
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole += 1
        us -= 1_000_000
    elif us < 0:
        whole -= 1
        us += 1_000_000
    sec = int(whole)
    if sec != _iso_second[0]:
        _iso_second[:] = [sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_iso_second[1]}.{us // 1000:03d}Z"


_iso_second: list[Any] = [None, ""]  # the last second iso() saw, and its text
