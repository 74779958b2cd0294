"""Cron schedules: what a schedule may say, when its ticks fall, and what each tick does.

A schedule has a name, a cron expression (five fields, or six with seconds first), an IANA time zone (UTC by
default), an overlap policy, a catch-up window and the spec of the job each tick submits. Tick times come
from cronsim (pure Python, maintained for Healthchecks, a cron monitoring service, and made to match
Debian's cron, DST included: a daily 02:30 in a zone that skips 02:30 runs at 03:00 that day, once; a daily
01:30 on the day 01:30 repeats runs once). Everything here is a pure function of plain values and the times
it is given: the scheduler reads the clock and the store keeps the state (orch/scheduler/cron.py).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from datetime import UTC, datetime
from typing import Any, Iterator, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from orch.core.errors import ValidationError
from orch.core.spec import MAX_LABELS, NAME_RE, parse_spec

MAX_CATCHUP = 366 * 86400.0
DEFAULT_CATCHUP = 60.0  # seconds late a tick may still fire (a scheduler restart); older ones are missed
ON_TIME = 1.0  # seconds late a tick counts as on time whatever its catch-up window (0: "only on time")
MAX_MISSED_COUNTED = 100_000  # missed ticks counted one by one after downtime; beyond, "at least"
MAX_EXPR_LEN = 200
SCHEDULE_FIELDS = frozenset({"cron", "tz", "overlap", "catchup", "job", "paused"})
LABEL = "schedule"  # the label each of its jobs carries, with the schedule's name


class Overlap(enum.StrEnum):
    """What a tick does while the schedule's previous job has not ended."""

    SKIP = "skip"  # nothing: the tick is recorded skipped (the default)
    ALLOW = "allow"  # a new job all the same
    CANCEL_RUNNING = "cancel_running"  # the previous job is cancelled, and a new one submitted
    QUEUE_ONE = "queue_one"  # a new job that waits for the previous to end; more ticks meanwhile are skipped


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A schedule's definition, checked: its job is the stored form of a spec (``job``)."""

    name: str
    cron: str
    tz: str = "UTC"
    overlap: Overlap = Overlap.SKIP
    catchup: float = DEFAULT_CATCHUP
    job: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"cron": self.cron, "tz": self.tz, "overlap": self.overlap.value, "catchup": self.catchup,
                "job": dict(self.job), "paused": self.paused}


def check_name(name: Any, fld: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationError(f"a schedule's {fld} is 1-64 characters of letters, digits, '_', '.', ':' or '-'",
                              field=fld)
    return name


def check_tz(tz: Any, fld: str = "tz") -> str:
    if not isinstance(tz, str) or not tz or len(tz) > 64 or not re.fullmatch(r"[A-Za-z0-9_+\-/]+", tz) \
            or tz.startswith("/") or ".." in tz:
        raise ValidationError("tz is an IANA time zone name, e.g. Europe/Berlin or UTC", field=fld)
    try:
        if tz not in _known_zones():
            raise ValueError(tz)
        _zone(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValidationError(f"no time zone {tz!r} (an IANA name, e.g. Europe/Berlin, America/New_York, UTC)",
                              field=fld) from None
    return tz


@functools.lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    return frozenset(zone_names())


@functools.lru_cache(maxsize=512)
def _zone(tz: str) -> Any:
    return UTC if tz == "UTC" else ZoneInfo(tz)


def _ci(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" for c in word)


def _field(number: str, names: tuple[str, ...] = ()) -> str:
    value = f"(?:{number}|{'|'.join(_ci(n) for n in names)})" if names else f"(?:{number})"
    atom = rf"(?:\*|{value}(?:-{value})?)(?:/[1-9][0-9]?)?"
    return f"{atom}(?:,{atom})*"


_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_SIXTY = "[0-5]?[0-9]"
_FIVE = [_field(_SIXTY), _field("[01]?[0-9]|2[0-3]"), _field("0?[1-9]|[12][0-9]|3[01]"),
         _field("0?[1-9]|1[0-2]", _MONTHS), _field("[0-7]", _DAYS)]
# What a cron expression may be, as the API document says it (ranges of values, lists, steps, month and day names;
# five fields, or six with seconds first): the check refuses the same, and cronsim what is left (a range that
# runs backwards, a date no month has).
CRON_PATTERN = f"^(?:{_field(_SIXTY)} )?{' '.join(_FIVE)}$"
_CRON_RE = re.compile(CRON_PATTERN)


_BOUNDS = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))  # second, minute, hour, day, month, weekday
_NAMES: tuple[dict[str, int], ...] = ({}, {}, {}, {}, {n: i + 1 for i, n in enumerate(_MONTHS)}, {n: i for i, n in enumerate(_DAYS)})


def _wrapped(words: list[str]) -> list[str]:
    """The fields with each range that runs backwards (22-2) written out as the values it wraps around to
    (22,23,0,1,2; with a step, every nth of them): cron gives such a range no meaning of its own, and wrapping
    is what one reads in it."""
    six = words if len(words) == 6 else ["0", *words]
    out = []
    for k, word in enumerate(six):
        lo, hi = _BOUNDS[k]
        names = _NAMES[k]
        atoms = []
        for atom in word.split(","):
            rng, _, step = atom.partition("/")
            a, dash, b = rng.partition("-")
            if dash and a != "*":
                x, y = (names.get(v.upper(), None) if not v.isdigit() else int(v) for v in (a, b))
                if k == 5:
                    x, y = (0 if v == 7 else v for v in (x, y))
                if x is not None and y is not None and x > y:
                    values = [*range(x, hi + 1), *range(lo, y + 1)][::int(step) if step else 1]
                    atoms.append(",".join(str(v) for v in values))
                    continue
                if k == 5 and x is not None and y is not None and "7" in (a, b):  # Sunday as 7, read as 0
                    atoms.append(f"{x}-{y}" + (f"/{step}" if step else ""))
                    continue
            atoms.append(atom)
        out.append(",".join(atoms))
    return out if len(words) == 6 else out[1:]


@functools.lru_cache(maxsize=4096)
def _as_cronsim(expr: str) -> str:
    """An expression as cronsim reads it (backward ranges written out, _wrapped)."""
    return " ".join(_wrapped(expr.split()))


def zone_names() -> list[str]:
    """Every IANA zone name this machine (or the tzdata package) knows, UTC among them."""
    from zoneinfo import available_timezones

    return sorted(available_timezones() | {"UTC"})


def check_cron(expr: Any, fld: str = "cron") -> str:
    from cronsim import CronSim, CronSimError

    if not isinstance(expr, str) or not expr.strip() or len(expr) > MAX_EXPR_LEN or not expr.isascii():
        raise ValidationError("cron is an expression of five fields (minute hour day month weekday), or six with "
                              "seconds first, e.g. '*/5 * * * *'", field=fld)
    words = expr.split()
    if len(words) not in (5, 6):
        raise ValidationError(f"cron {expr!r} has {len(words)} fields: give five (minute hour day month weekday), "
                              "or six with seconds first", field=fld)
    if expr != " ".join(words) or not _CRON_RE.fullmatch(expr):
        raise ValidationError(f"cron {expr!r} is not an expression of numbers in range, *, lists (a,b), ranges (a-b), "
                              "steps (/n), month or day names, its fields one space apart", field=fld)
    try:
        it = CronSim(_as_cronsim(" ".join(words)), datetime(2026, 1, 1, tzinfo=UTC))
        next(it)
    except CronSimError as e:
        raise ValidationError(f"cron {expr!r}: {e}", field=fld) from None
    except StopIteration:
        raise ValidationError(f"cron {expr!r} never matches (in the next 50 years)", field=fld) from None
    return " ".join(words)


def check_schedule(name: Any, body: Any, *, partial: Schedule | None = None, prefix: str = "") -> Schedule:
    """A schedule from a request body: ``{"cron", "tz", "overlap", "catchup", "job", "paused"}`` (``job`` a job
    spec as ``POST /v1/jobs`` takes, less what a tick decides: no ``idempotency_key``, ``run_at``, ``delay`` nor
    ``depends_on``). With ``partial``, the fields given change that schedule (a PATCH)."""
    name = check_name(name)
    if not isinstance(body, dict):
        raise ValidationError("a schedule is a JSON object with cron and job", field=prefix.rstrip(".") or None)
    unknown = sorted(set(body) - SCHEDULE_FIELDS)
    if unknown:
        raise ValidationError(f"unknown field {unknown[0]!r}", field=prefix + unknown[0])
    base = partial or Schedule(name, "")
    if partial is None:
        for required in ("cron", "job"):
            if required not in body:
                raise ValidationError(f"a schedule needs {required}", field=prefix + required)
    cron = check_cron(body["cron"], prefix + "cron") if "cron" in body else base.cron
    tz = check_tz(body["tz"], prefix + "tz") if "tz" in body else base.tz
    overlap = base.overlap
    if "overlap" in body:
        raw = body["overlap"]
        if not isinstance(raw, str) or raw not in Overlap._value2member_map_:
            raise ValidationError(f"overlap is one of {', '.join(o.value for o in Overlap)}", field=prefix + "overlap")
        overlap = Overlap(raw)
    catchup = base.catchup
    if "catchup" in body:
        raw = body["catchup"]
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= raw <= MAX_CATCHUP:
            raise ValidationError(f"catchup is seconds from 0 to {int(MAX_CATCHUP)} (366 days)",
                                  field=prefix + "catchup")
        catchup = float(raw)
    paused = base.paused
    if "paused" in body:
        if not isinstance(body["paused"], bool):
            raise ValidationError("paused is true or false", field=prefix + "paused")
        paused = body["paused"]
    job = check_job(body["job"], prefix + "job.") if "job" in body else dict(base.job)
    return Schedule(name, cron, tz, overlap, catchup, job, paused)


def check_job(job: Any, prefix: str) -> dict[str, Any]:
    """A schedule's job spec, checked as a submit checks it, with what each tick adds (its env and label)."""
    if not isinstance(job, dict):
        raise ValidationError("job is a job spec (a JSON object with command, shell or task)",
                              field=prefix.rstrip("."))
    for own in ("idempotency_key", "run_at", "delay", "depends_on", "ref"):
        if own in job:
            raise ValidationError(f"a schedule's job takes no {own}: each tick decides when it runs",
                                  field=prefix + own)
    spec = parse_spec(job, prefix)
    if len(spec.labels) >= MAX_LABELS and LABEL not in spec.labels:
        raise ValidationError(f"a schedule's job has at most {MAX_LABELS - 1} labels (each tick adds "
                              f"'{LABEL}')", field=prefix + "labels")
    parse_spec(tick_spec("x" * 64, dict(job), 0.0, 0.0), prefix)  # with what a tick adds, it is still a spec
    return dict(job)


def _ticks(cron: str, tz: str, after: float) -> Iterator[float]:
    """Tick times (Unix seconds) strictly after ``after``, in order."""
    from cronsim import CronSim

    zone = _zone(tz)
    start = datetime.fromtimestamp(int(after), zone)  # whole seconds: cron's finest grain
    for dt in CronSim(_as_cronsim(cron), start):
        t = dt.timestamp()
        # In the hour that comes twice, cronsim reads a fixed time on the local clock: started from its second
        # pass, it names the first pass's tick again (an hour before the start). That one was had: go on.
        if t > after:
            yield t


def next_ticks(cron: str, tz: str, after: float, n: int) -> list[float]:
    """The first ``n`` tick times after ``after``."""
    out: list[float] = []
    for t in _ticks(cron, tz, after):
        if len(out) >= n:
            break
        out.append(t)
    return out


@dataclasses.dataclass
class Plan:
    """What a schedule's ticks up to now call for: the ticks to fire (oldest first), how many older ones are
    missed (past the catch-up window; ``more_missed``: more than were counted), and the next tick after now."""

    fire: list[float]
    missed: int
    first_missed: float | None
    next_at: float | None
    more_missed: bool = False


def plan(s: Schedule, last_tick: float, now: float, limit: int = 1000) -> Plan:
    """The ticks of ``s`` after ``last_tick`` up to ``now``: those within its catch-up window (no older than
    ``now - s.catchup``, or ON_TIME) fire, at most ``limit`` of them, the newest; the others are missed, never fired. After
    long downtime the missed ones are counted up to MAX_MISSED_COUNTED, then the count jumps to the window."""
    edge = now - max(s.catchup, ON_TIME)
    fire: list[float] = []
    missed, first, more = 0, None, False
    nxt: float | None = None
    it = _ticks(s.cron, s.tz, last_tick)
    while True:
        t = next(it, None)
        if t is None or t > now:
            nxt = t
            break
        if t < edge:
            missed += 1
            first = t if first is None else first
            if missed >= MAX_MISSED_COUNTED and not more:
                more = True
                it = _ticks(s.cron, s.tz, max(edge - 1, t))
            continue
        fire.append(t)
    if len(fire) > limit:
        missed += len(fire) - limit
        first = fire[0] if first is None else first
        fire = fire[-limit:]
    return Plan(fire, missed, first, nxt, more)


def tick_key(name: str, tick: float) -> str:
    """The idempotency key of the job a tick submits: one job per (schedule, time), however many times, or
    through however many schedulers, the tick is fired."""
    return f"schedule:{name}:{iso_second(tick)}"


def iso_second(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tick_spec(name: str, job: Mapping[str, Any], tick: float, now: float, *, manual: bool = False,
              after: int | None = None) -> dict[str, Any]:
    """The spec a tick submits: the schedule's job with ``ORCH_SCHEDULE`` and ``ORCH_SCHEDULED_FOR`` in its
    env, the ``schedule`` label, and the tick's idempotency key (a manual run, none); ``after``: a job it waits
    to end first (overlap queue_one)."""
    spec = dict(job)
    spec["env"] = {**(job.get("env") or {}), "ORCH_SCHEDULE": name, "ORCH_SCHEDULED_FOR": iso_second(tick)}
    spec["labels"] = {**(job.get("labels") or {}), LABEL: name}
    if not manual:
        spec["idempotency_key"] = tick_key(name, tick)
    if after is not None:
        spec["depends_on"] = [{"job": after, "on": "completion"}]
    return spec


class TickAction(enum.Enum):
    FIRE = "fire"
    SKIP = "skip"
    CANCEL_AND_FIRE = "cancel_and_fire"
    FIRE_AFTER = "fire_after"  # a job that waits for the previous one (queue_one)


def on_tick(overlap: Overlap, previous_running: bool, previous_waiting: bool) -> TickAction:
    """What a tick does given the schedule's last job: still going (``previous_running``), and whether it is
    itself one waiting for the one before (``previous_waiting``: queue_one has queued one already)."""
    if not previous_running or overlap is Overlap.ALLOW:
        return TickAction.FIRE
    if overlap is Overlap.CANCEL_RUNNING:
        return TickAction.CANCEL_AND_FIRE
    if overlap is Overlap.QUEUE_ONE and not previous_waiting:
        return TickAction.FIRE_AFTER
    return TickAction.SKIP

