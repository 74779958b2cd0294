"""Rate limits: how many job starts a named limit allows, as a token bucket.

A limit of ``count`` starts ``per`` seconds with a ``burst`` is a token bucket
that holds ``burst`` tokens and gains one every ``per / count`` seconds; each
start takes a token. It is kept in the form of the generic cell rate algorithm
(GCRA): one number per limit, ``tat``, the theoretical arrival time of the next
start were the bucket never full. That number is all a store keeps; a start at
time ``t`` is allowed when ``t >= tat - (burst - 1) * interval``, and moves
``tat`` to ``max(tat, t) + interval``.

Because a bucket's future is known, a start need not be refused: it can be
given the first time it is allowed (``reserve``), and that time becomes the
job's due time. Jobs then wait in ``scheduled`` for their turn, in the order
they asked, without anyone polling. Pure functions of plain values: the store
reads and writes ``tat`` in the transaction that admits the jobs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from orch.core.errors import ValidationError

LIMIT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_RATE_KEYS = 16  # limits one job may name
MAX_BURST = 1_000_000
MAX_PER = 999 * 86400.0  # the longest period a rate may be written over (999d: every rate RATE_PATTERN lets by)
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d{0,3})\s*(s|m|h|d|sec|min|hour|day)\s*$", re.ASCII)
# The rates the API document describes (every one of them is taken; the server also takes spaces, leading zeros).
RATE_PATTERN = r"^[1-9][0-9]{0,8}/(?:[1-9][0-9]{0,2})?(?:s|m|h|d|sec|min|hour|day)$"
_LONG = {"sec": "s", "min": "m", "hour": "h", "day": "d"}
_SLACK = 1e-6  # seconds of float rounding a burst's last start may be late by and still start now


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` starts every ``per`` seconds, at most ``burst`` of them at once."""

    count: int
    per: float
    burst: int = 1

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate (one token's refill)."""
        return self.per / self.count

    @property
    def tolerance(self) -> float:
        """How far ahead of its steady-rate time a start may come (the burst, in seconds)."""
        return (self.burst - 1) * self.interval

    def text(self) -> str:
        """The rate as ``parse_rate`` reads it: ``100/m``, ``5/10s`` (the largest unit the period is a whole number
        of)."""
        for unit, secs in reversed(UNITS.items()):
            n = self.per / secs
            if n == int(n):
                return f"{self.count}/{'' if n == 1 else int(n)}{unit}"
        return f"{self.count}/{self.per:g}s"


def parse_rate(text: str, burst: int | None = None, *, field: str = "rate") -> Rate:
    """``100/m``, ``10/s``, ``5/10s``, ``1000/h``, ``1/d`` (also ``/sec``, ``/min``, ``/hour``, ``/day``): count
    per an optional number of units. ``burst``: how many starts a bucket left unused may let through at once
    (default 1: starts evenly spaced, ``per / count`` apart)."""
    if not isinstance(text, str):
        raise ValidationError("a rate is a string such as '100/m' or '10/s'", field=field)
    m = _RATE_RE.match(text)
    if not m:
        raise ValidationError(f"{text[:40]!r} is not a rate: write COUNT/UNIT such as '100/m', '10/s' or '5/10s' "
                              "(units s, m, h, d)", field=field)
    count, many, unit = int(m.group(1)), m.group(2), _LONG.get(m.group(3), m.group(3))
    per = (int(many) if many else 1) * UNITS[unit]
    if count < 1:
        raise ValidationError("a rate's count must be at least 1", field=field)
    if not 0 < per <= MAX_PER:
        raise ValidationError(f"a rate's period must be more than 0 and at most 999 days, not {per:g}s", field=field)
    return Rate(count, per, check_burst(burst))


def check_burst(burst: object, *, field: str = "burst") -> int:
    """A burst as given (None: 1), checked."""
    if burst is None:
        return 1
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        raise ValidationError(f"burst must be an integer from 1 to {MAX_BURST}", field=field)
    return burst


def check_rate_keys(value: object, *, field: str = "rate_keys") -> tuple[str, ...]:
    """A spec's ``rate_keys``: a list of limit names, each at most once."""
    if not isinstance(value, list):
        raise ValidationError("rate_keys must be a list of limit names", field=field)
    if len(value) > MAX_RATE_KEYS:
        raise ValidationError(f"a job may name at most {MAX_RATE_KEYS} rate limits", field=field)
    seen: list[str] = []
    for name in value:
        if not isinstance(name, str) or not LIMIT_NAME_RE.match(name):
            raise ValidationError("each rate key must be a limit name: 1-64 of letters, digits and _ . : - "
                                  "starting with a letter or digit", field=field)
        if name in seen:
            raise ValidationError(f"rate key {name!r} is named twice", field=field)
        seen.append(name)
    return tuple(seen)


def check_limit_name(name: object, *, field: str = "name") -> str:
    if not isinstance(name, str) or not LIMIT_NAME_RE.match(name):
        raise ValidationError("a limit's name is 1-64 of letters, digits and _ . : - starting with a letter or digit",
                              field=field)
    return name


def allowed_at(rate: Rate, tat: float | None) -> float:
    """The earliest time a start is allowed on a bucket whose theoretical arrival time is ``tat`` (None: a bucket
    never used, full)."""
    return -math.inf if tat is None else tat - rate.tolerance


def reserve(limits: Mapping[str, Rate], tats: Mapping[str, float | None], names: Sequence[str],
            now: float) -> tuple[float, str | None, dict[str, float]]:
    """Reserve one start on every limit in ``names`` at the first time all of them allow it, and not before ``now``.

    Returns that time, the limit that holds the start past ``now`` (None: it may start now), and the new ``tat`` of
    each limit named. Names without a limit in ``limits`` are not counted (the caller refuses unknown names)."""
    at, holder = now, None
    for name in names:
        rate = limits.get(name)
        if rate is None:
            continue
        first = allowed_at(rate, tats.get(name))
        if first > at + _SLACK:
            at, holder = first, name
    new: dict[str, float] = {}
    for name in names:
        rate = limits.get(name)
        if rate is None:
            continue
        tat = tats.get(name)
        new[name] = max(at if tat is None else tat, at) + rate.interval
    return at, holder, new
