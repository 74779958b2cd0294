"""Job specs: what a submitted job may say, its validation, and its stored and shown forms."""

from __future__ import annotations

import datetime
import functools
import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping

from orch.core.concurrency import Concurrency, OnLimit, check_concurrency
from orch.core.dag import Dep, check_depends_on, check_ref
from orch.core.errors import ValidationError
from orch.core.kinds import (
    DOCKER,
    EXEC,
    PYTHON,
    check_docker,
    check_python,
    check_runner,
    docker_text,
    python_text,
    runner_text,
)
from orch.core.rates import check_rate_keys
from orch.core.retry import RetryPolicy

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# Characters a worker's name or host may not hold (they reach operators' terminals): the C0 controls, DEL,
# the C1 controls, and the Unicode format controls that hide or reorder text (soft hyphen, bidi marks,
# embeddings, overrides and isolates, zero-width characters, line and paragraph separators, BOM,
# interlinear annotation). Written as regex ranges that Python and ECMA-262 (the API document) read alike.
CONTROL_CHARS = (r"\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
                 r"\ufff9-\ufffb")
CONTROL_RE = re.compile(f"[{CONTROL_CHARS}]")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_PLAIN_ARGV = re.compile(r"[\w@%+=:,./-]+(?:\x00[\w@%+=:,./-]+)*", re.ASCII)  # words shlex.quote leaves alone
MAX_ARGS = 4096
MAX_ARG_LEN = 128 * 1024
MAX_ENV = 256
MAX_LABELS = 64
MAX_TIMEOUT = 7 * 24 * 3600.0
COMMAND_SHOWN = 256  # characters of a job's command a listing shows (a longer one is cut, and says so)
MAX_DELAY = 366 * 86400.0  # seconds a job's delay may put it off (a run_at is a time: the calendar bounds it)
MAX_KEY_LEN = 255  # characters of an idempotency key (a UUID is 36; Stripe allows 255)
MAX_TIME_LEN = 64  # characters of a run_at (an RFC 3339 time is 20-35 of them)
# RFC 3339's date-time (section 5.6): full-date "T" partial-time time-offset; T and Z in either case, any digits of
# fraction, the offset required (a time without one is a local time of no known zone, and is refused).
RFC3339_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
                        re.ASCII)
_NAIVE_RE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?", re.ASCII)
_EPOCH_DAY = datetime.date(1970, 1, 1).toordinal()

SPEC_FIELDS = frozenset(
    {
        "command", "shell", "task", "args", "queue", "priority", "env", "cwd", "timeout",
        "max_attempts", "labels", "name", "backoff", "retry_on_exit", "run_at", "delay", "idempotency_key",
        "rate_keys", "concurrency", "depends_on", "ref", "python", "docker", "runner", "params",
    }
)
BACKOFF_FIELDS = frozenset({"base", "factor", "cap", "jitter"})


@dataclass(frozen=True)
class JobSpec:
    """What to run and how: the validated form of a submitted job."""

    argv: tuple[str, ...]  # the exec runner's (command, shell, task); () for the others
    kind: str  # "command", "shell", "task", "python", "docker" or "runner": how the user wrote it
    queue: str = "default"
    priority: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    backoff: Mapping[str, float] = field(default_factory=dict)
    retry_on_exit: tuple[int, ...] | None = None
    run_at: str | None = None  # when to run it, as the user wrote it (RFC 3339 with an offset)
    delay: float | None = None  # or: seconds after its submit (as written: an int stays an int)
    run_at_ts: float | None = None  # run_at as Unix seconds
    idempotency_key: str | None = None  # a submit with a key a kept job has is that job, not a new one
    rate_keys: tuple[str, ...] = ()  # the rate limits (orch limit set) its start counts against
    concurrency: Concurrency | None = None  # at most so many jobs of its key run at once (orch/core/concurrency.py)
    depends_on: tuple[Dep, ...] = ()  # blocked until these are met (orch/core/dag.py)
    ref: str | None = None  # its name in its batch, for the others' depends_on (and its inputs' key)
    # python, docker: the checked object; runner: the plugin runner's params (orch/core/kinds.py)
    params: Mapping[str, Any] = field(default_factory=dict)
    plugin: str | None = None  # kind runner: the plugin runner's name

    @property
    def runner(self) -> str:
        """The runner a worker needs to run it (a job is leased only to a worker that has it)."""
        if self.kind in _EXEC_KINDS:
            return EXEC
        return self.plugin if self.plugin is not None else self.kind

    def due(self, now: float) -> float | None:
        """When the job is due (Unix seconds) if it is submitted at ``now``: its run_at, or ``now`` plus its delay;
        None without either. The caller reads the clock (the store, at submit): the core never does."""
        if self.run_at_ts is not None:
            return self.run_at_ts
        if self.delay is not None:
            return now + self.delay
        return None

    def to_json(self) -> dict[str, Any]:
        """The spec as stored and as a worker gets it: the form it was submitted in (``command``, ``shell``,
        or ``task`` and ``args``) and only the fields that were given. ``spec_view`` fills in the rest."""
        out: dict[str, Any]
        if self.kind == "command":
            out = {"command": list(self.argv)}
        elif self.kind == "shell":
            out = {"shell": self.argv[2]}
        elif self.kind in (PYTHON, DOCKER):
            out = {self.kind: dict(self.params)}
        elif self.kind == "runner":
            out = {"runner": self.plugin}
            if self.params:
                out["params"] = dict(self.params)
        else:
            out = {"task": self.argv[0]}
            if len(self.argv) > 1:
                out["args"] = list(self.argv[1:])
        if self.queue != "default":
            out["queue"] = self.queue
        if self.priority:
            out["priority"] = self.priority
        if self.env:
            out["env"] = dict(self.env)
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.max_attempts is not None:
            out["max_attempts"] = self.max_attempts
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.name is not None:
            out["name"] = self.name
        if self.backoff:
            out["backoff"] = dict(self.backoff)
        if self.retry_on_exit is not None:
            out["retry_on_exit"] = list(self.retry_on_exit)
        if self.run_at is not None:
            out["run_at"] = self.run_at
        if self.delay is not None:
            out["delay"] = self.delay
        if self.idempotency_key is not None:
            out["idempotency_key"] = self.idempotency_key
        if self.rate_keys:
            out["rate_keys"] = list(self.rate_keys)
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency.to_json()
        if self.depends_on:
            out["depends_on"] = [d.to_json() for d in self.depends_on]
        if self.ref is not None:
            out["ref"] = self.ref
        return out

    @property
    def command_text(self) -> str:
        """What the job runs, as a person reads it: the shell line, or the argv quoted as a shell would."""
        if self.kind == "shell":
            return self.argv[2]
        if self.kind == PYTHON:
            return python_text(self.params)
        if self.kind == DOCKER:
            return docker_text(self.params)
        if self.kind == "runner":
            assert self.plugin is not None
            return runner_text(self.plugin, self.params)
        return _command_text(self.argv)


_EXEC_KINDS = frozenset({"command", "shell", "task"})
KINDS = ("command", "shell", "task", PYTHON, DOCKER, "runner")


@functools.lru_cache(maxsize=4096)
def _command_text(argv: tuple[str, ...]) -> str:
    """shlex.join, remembered (this runs at every submit, and a batch often repeats its commands); a command
    of plain words costs one regex match over all of them, not a quote() per word."""
    if _PLAIN_ARGV.fullmatch("\x00".join(argv)):
        return " ".join(argv)
    return shlex.join(argv)


def stored_spec(spec: JobSpec, defaults: RetryPolicy) -> dict[str, Any]:
    """What the store keeps of a spec: its submitted form, with the attempts it gets fixed at submit."""
    out = spec.to_json()
    out.setdefault("max_attempts", defaults.max_attempts)
    return out


def argv_of(spec: Mapping[str, Any]) -> list[str]:
    """The argv a stored spec runs (``argv`` itself from a scheduler before specs kept their submitted form)."""
    if "command" in spec:
        return list(spec["command"])
    if "shell" in spec:
        return ["/bin/sh", "-c", spec["shell"]]
    if "task" in spec:
        return [spec["task"], *spec.get("args", ())]
    if "argv" in spec:
        return list(spec["argv"])
    return []  # not the exec runner's


def spec_view(stored: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A stored spec as the API shows it: the form it was submitted in, every field with its value, the
    defaults filled in (those of this scheduler: the retry policy applies as it is now). ``defaults``:
    ``view_defaults(policy)``, made once (this runs for every job answered)."""
    out: dict[str, Any] = {k: stored[k] for k in KINDS if k in stored}
    if "runner" in stored:
        out["params"] = stored.get("params", {})
    if "task" in stored:
        out["args"] = list(stored.get("args", ()))
    out.update(defaults)
    for k, v in stored.items():
        if k in out and k not in _NOT_AS_IS:
            out[k] = v
    if stored.get("backoff"):  # the job's own values over the defaults'
        out["backoff"] = {**out["backoff"], **stored["backoff"]}
    c = stored.get("concurrency")
    if c is not None:  # its on_limit too, when it was left to the default
        out["concurrency"] = {**c, "on_limit": c.get("on_limit", "queue")}
    return out


_NOT_AS_IS = frozenset({*KINDS, "params", "args", "backoff"})  # copied above, or merged


def view_defaults(defaults: RetryPolicy) -> dict[str, Any]:
    """Every optional field of a spec with its default, in the order the API shows them (made once per policy;
    the values are copied into each view and never changed there)."""
    return {"queue": "default", "priority": 0, "env": {}, "cwd": None, "timeout": None,
            "max_attempts": defaults.max_attempts, "labels": {}, "name": None,
            "backoff": {"base": defaults.base, "factor": defaults.factor, "cap": defaults.cap,
                        "jitter": defaults.jitter},
            "retry_on_exit": list(defaults.retry_on_exit) if defaults.retry_on_exit is not None else None,
            "run_at": None, "delay": None, "idempotency_key": None, "rate_keys": [],
            "concurrency": None, "depends_on": [], "ref": None}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v: Any) -> int | None:
    """``v`` as an integer if it is one to JSON Schema (2.0 as much as 2), else None."""
    if type(v) is int:  # the usual case, first: this runs for every spec of a batch
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v if _is_int(v) else None


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _str_list(v: Any, fld: str, *, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValidationError(f"{fld} must be a list of strings", field=fld)
    if not v and not allow_empty:
        raise ValidationError(f"{fld} must not be empty", field=fld)
    if len(v) > MAX_ARGS:
        raise ValidationError(f"{fld} has more than {MAX_ARGS} items", field=fld)
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise ValidationError(f"{fld}[{i}] must be a string", field=f"{fld}[{i}]")
        if len(item) > MAX_ARG_LEN or "\x00" in item:
            raise ValidationError(f"{fld}[{i}] is too long or holds a NUL byte", field=f"{fld}[{i}]")
    return tuple(v)


def _str_map(v: Any, fld: str, key_re: re.Pattern[str], limit: int) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ValidationError(f"{fld} must be an object of string to string", field=fld)
    if len(v) > limit:
        raise ValidationError(f"{fld} has more than {limit} entries", field=fld)
    for k, val in v.items():
        if not key_re.fullmatch(k):
            raise ValidationError(f"{fld} key {k[:80]!r} is not a valid name", field=f"{fld}.{k[:80]}")
        if not isinstance(val, str) or len(val) > MAX_ARG_LEN or "\x00" in val:
            raise ValidationError(f"{fld}.{k} must be a string without NUL bytes", field=f"{fld}.{k}")
    return dict(v)


def parse_time(v: Any, fld: str) -> float:
    """An RFC 3339 time with its UTC offset (``2026-12-24T08:00:00+01:00``, ``...Z``) as Unix seconds; anything
    else is a ValidationError naming ``fld``, one without an offset saying so. A leap second (``:60``) is the
    second after ``:59``; years run from 0001 to 9999, as the format allows."""
    example = "e.g. 2026-12-24T08:00:00+01:00 or 2026-12-24T07:00:00Z"
    if not isinstance(v, str) or len(v) > MAX_TIME_LEN:
        raise ValidationError(f"{fld} must be an RFC 3339 time with a UTC offset, {example}", field=fld)
    m = RFC3339_RE.fullmatch(v)
    if m is None:
        if _NAIVE_RE.fullmatch(v):
            raise ValidationError(f"{fld} {v!r} has no UTC offset: add Z or +HH:MM (RFC 3339), {example}", field=fld)
        raise ValidationError(f"{fld} must be an RFC 3339 time with a UTC offset, {example}", field=fld)
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    off_h, off_m = (int(m.group(10)), int(m.group(11))) if m.group(9) else (0, 0)
    try:
        ordinal = datetime.date(year, month, day).toordinal()
    except ValueError:
        raise ValidationError(f"{fld} {v!r} is not a date of the calendar", field=fld) from None
    if hour > 23 or minute > 59 or second > 60 or off_h > 23 or off_m > 59:
        raise ValidationError(f"{fld} {v!r} is not a time of day (or its offset is not one)", field=fld)
    offset = (off_h * 3600 + off_m * 60) * (-1 if m.group(9) == "-" else 1)
    frac = float(m.group(7)) if m.group(7) else 0.0
    return (ordinal - _EPOCH_DAY) * 86400.0 + hour * 3600 + minute * 60 + second + frac - offset


def validate_name(v: Any, fld: str) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise ValidationError(
            f"{fld} must be 1-64 characters of letters, digits, '_', '.', ':' or '-'", field=fld
        )
    return v


def parse_spec(body: Any, prefix: str = "") -> JobSpec:
    """Validate a submitted job (a decoded JSON object) into a JobSpec.

    Raises ValidationError naming the offending field. ``prefix`` names the
    job's place in a batch (``jobs[3].``) so errors point at it.
    """
    if not isinstance(body, dict):
        raise ValidationError("a job must be a JSON object", field=prefix.rstrip(".") or None)
    unknown = sorted(set(body) - SPEC_FIELDS)
    if unknown:
        raise ValidationError(f"unknown field {unknown[0]!r}", field=prefix + unknown[0])

    def f(name: str) -> str:
        return prefix + name

    kinds = [k for k in KINDS if k in body]
    if len(kinds) != 1:
        raise ValidationError("a job needs exactly one of 'command', 'shell', 'task', 'python', 'docker' or "
                              "'runner'", field=f("command"))
    kind = kinds[0]
    if "args" in body and kind != "task":
        raise ValidationError("'args' goes with 'task' only", field=f("args"))
    if "params" in body and kind != "runner":
        raise ValidationError("'params' goes with 'runner' only", field=f("params"))
    params: Mapping[str, Any] = {}
    plugin: str | None = None
    argv: tuple[str, ...] = ()
    if kind == PYTHON:
        params = check_python(body[PYTHON], f(PYTHON))
    elif kind == DOCKER:
        params = check_docker(body[DOCKER], f(DOCKER))
    elif kind == "runner":
        plugin, params = check_runner(body["runner"], body["params"] if "params" in body else {}, f("runner"))
    elif kind == "command":
        argv = _str_list(body["command"], f("command"), allow_empty=False)
        if not argv[0]:
            raise ValidationError("command[0] must not be empty", field=f("command[0]"))
    elif kind == "shell":
        line = body["shell"]
        if not isinstance(line, str) or not line.strip():
            raise ValidationError("shell must be a non-empty string", field=f("shell"))
        if len(line) > MAX_ARG_LEN or "\x00" in line:
            raise ValidationError("shell is too long or holds a NUL byte", field=f("shell"))
        argv = ("/bin/sh", "-c", line)
    else:  # task
        task = body["task"]
        if not isinstance(task, str) or not task.strip() or "\x00" in task or len(task) > MAX_ARG_LEN:
            raise ValidationError(f"task must be a non-empty string of at most {MAX_ARG_LEN} characters",
                                  field=f("task"))
        argv = (task, *_str_list(body.get("args", []), f("args"), allow_empty=True))

    queue = validate_name(body.get("queue", "default"), f("queue"))
    priority = _as_int(body["priority"]) if "priority" in body else 0
    if priority is None or not -1000 <= priority <= 1000:
        raise ValidationError("priority must be an integer from -1000 to 1000", field=f("priority"))
    env = _str_map(body.get("env", {}), f("env"), ENV_KEY_RE, MAX_ENV)
    # An optional field is absent or has a value: null is refused, as the OpenAPI document says.
    cwd = body.get("cwd")
    if "cwd" in body and (not isinstance(cwd, str) or not cwd or len(cwd) > 4096 or "\x00" in cwd):
        raise ValidationError("cwd must be a non-empty path string", field=f("cwd"))
    timeout = body.get("timeout")
    if "timeout" in body and (timeout is None or not _is_num(timeout) or not 0 < timeout <= MAX_TIMEOUT):
        raise ValidationError(f"timeout must be a number of seconds in (0, {int(MAX_TIMEOUT)}]", field=f("timeout"))
    max_attempts = _as_int(body["max_attempts"]) if "max_attempts" in body else None
    if "max_attempts" in body and (max_attempts is None or not 1 <= max_attempts <= 100):
        raise ValidationError("max_attempts must be an integer from 1 to 100", field=f("max_attempts"))
    labels = _str_map(body.get("labels", {}), f("labels"), NAME_RE, MAX_LABELS)
    for k, val in labels.items():
        if len(val) > 256:
            raise ValidationError("label values are at most 256 characters", field=f(f"labels.{k}"))
    name = body.get("name")
    if "name" in body and (not isinstance(name, str) or not 0 < len(name) <= 200 or "\x00" in name):
        # (no NUL: a job's name is a column of its own, and PostgreSQL's text holds none)
        raise ValidationError("name must be a string of 1-200 characters without NUL bytes", field=f("name"))
    backoff = body.get("backoff", {})
    if not isinstance(backoff, dict):
        raise ValidationError("backoff must be an object", field=f("backoff"))
    for k, val in backoff.items():
        if k not in BACKOFF_FIELDS:
            raise ValidationError(f"unknown field {k!r}", field=f(f"backoff.{k}"))
        lo, hi = (1.0 if k == "factor" else 0.0), (1.0 if k == "jitter" else 86400.0)
        if not _is_num(val) or not lo <= val <= hi:
            raise ValidationError(f"backoff.{k} is out of range", field=f(f"backoff.{k}"))
    retry_on_exit = body.get("retry_on_exit")
    if "retry_on_exit" in body:
        codes = [_as_int(c) for c in retry_on_exit] if isinstance(retry_on_exit, list) else None
        if codes is None or len(codes) > 255 or not all(c is not None and 1 <= c <= 255 for c in codes):
            raise ValidationError("retry_on_exit must be a list of exit codes 1-255", field=f("retry_on_exit"))
        retry_on_exit = tuple(c for c in codes if c is not None)
    run_at, run_at_ts, delay = body.get("run_at"), None, body.get("delay")
    if "run_at" in body:
        if "delay" in body:
            raise ValidationError("give run_at or delay, not both", field=f("delay"))
        run_at_ts = parse_time(run_at, f("run_at"))
    if "delay" in body and (delay is None or not _is_num(delay) or not 0 <= delay <= MAX_DELAY):
        raise ValidationError(f"delay must be a number of seconds from 0 to {int(MAX_DELAY)} (366 days)",
                              field=f("delay"))
    key = body.get("idempotency_key")
    if "idempotency_key" in body:
        key = check_idempotency_key(key, f("idempotency_key"))
    rate_keys = check_rate_keys(body["rate_keys"], field=f("rate_keys")) if "rate_keys" in body else ()
    if rate_keys and ("run_at" in body or "delay" in body):
        # A start reserved days ahead would hold the bucket back for every job after it until then (a token bucket
        # only moves forward): a delayed start is to be reserved when it comes due, which orch does not do yet.
        raise ValidationError("rate_keys cannot go with run_at or delay", field=f("rate_keys"))
    concurrency = check_concurrency(body["concurrency"], f("concurrency")) if "concurrency" in body else None
    if concurrency is not None and concurrency.on_limit is not OnLimit.QUEUE and ("run_at" in body or "delay" in body):
        # skip_new and cancel_running decide at the submit; a delayed job's slot is not weighed until it is due.
        raise ValidationError(f"concurrency.on_limit {concurrency.on_limit} cannot go with run_at or delay"
                              " (on_limit queue can)", field=f("concurrency.on_limit"))
    depends_on = check_depends_on(body["depends_on"], f("depends_on")) if "depends_on" in body else ()
    if depends_on and rate_keys:
        # A start is reserved at the submit; a blocked job's start is not known until its dependencies end.
        raise ValidationError("rate_keys cannot go with depends_on", field=f("rate_keys"))
    if depends_on and concurrency is not None and concurrency.on_limit is not OnLimit.QUEUE:
        raise ValidationError(f"concurrency.on_limit {concurrency.on_limit} cannot go with depends_on"
                              " (on_limit queue can)", field=f("concurrency.on_limit"))
    ref = check_ref(body["ref"], f("ref")) if "ref" in body else None
    return JobSpec(
        argv=argv, kind=kind, queue=queue, priority=priority, env=env, cwd=cwd,
        timeout=float(timeout) if timeout is not None else None, max_attempts=max_attempts,
        labels=labels, name=name, backoff={k: float(v) for k, v in backoff.items()},
        retry_on_exit=retry_on_exit, run_at=run_at, delay=delay, run_at_ts=run_at_ts, idempotency_key=key,
        rate_keys=rate_keys, concurrency=concurrency, depends_on=depends_on, ref=ref, params=params, plugin=plugin,
    )


def check_idempotency_key(key: object, field: str = "idempotency_key") -> str:
    """An idempotency key: 1-255 printable characters (no controls: it is shown, logged and put in headers)."""
    return check_printable(key, field, MAX_KEY_LEN, "an idempotency key")


def check_printable(text: object, field: str, max_len: int, what: str) -> str:
    """1 to ``max_len`` characters of valid Unicode without control characters: a string users wrote that orch
    shows, logs and may put in a header, so that it cannot forge a line or break a terminal."""
    if not isinstance(text, str) or not 0 < len(text) <= max_len or CONTROL_RE.search(text) or not _utf8(text):
        raise ValidationError(f"{what} is 1-{max_len} characters of Unicode without control characters",
                              field=field)
    return text


def _utf8(text: str) -> bool:
    """Whether ``text`` is valid Unicode (a header decoded with surrogate escapes, or JSON's lone surrogates, is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def spec_from_json(d: Mapping[str, Any]) -> JobSpec:
    """Rebuild a JobSpec from its stored ``to_json`` form (validated again: it is cheap, and never wrong)."""
    return parse_spec(dict(d))
