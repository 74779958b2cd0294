"""Job dependencies: what ``depends_on`` may say, when a dependency is met, and a workflow's order.

A job that names dependencies is ``blocked`` until each is decided. A dependency is on another job's end: on its
success (the default), its failure, or its completion (any end). One that ended another way can never be met:
the job is ``skipped``, saying which, and so, in turn, are those of its own dependents it cannot meet either.
A whole workflow is one batch whose jobs carry a local ``ref`` that the others' ``depends_on`` name.

Pure functions of plain values; the stores apply them (orch/store/sqlite.py, and in SQL the PostgreSQL
triggers of sql/postgres/0009, which say the same).
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass
from typing import Any, Sequence

from orch.core.errors import Conflict, NotFound, ValidationError
from orch.core.states import TERMINAL, JobState

MAX_DEPENDS = 10_000  # dependencies one job may name (a fan-in of a 10,000-job batch: its MAX_BATCH)


class On(enum.StrEnum):
    """What end of the job it names meets a dependency."""

    SUCCESS = "success"  # it succeeded
    FAILURE = "failure"  # it failed (its attempts spent, or an exit its retry policy does not retry)
    COMPLETION = "completion"  # it ended, whichever way (succeeded, failed, cancelled, skipped)


@dataclass(frozen=True, slots=True)
class Dep:
    """One dependency as written: on a job by id (``job``), or on a job of the same batch by its ``ref``."""

    job: int | None
    ref: str | None
    on: On = On.SUCCESS

    def to_json(self) -> Any:
        target: Any = self.job if self.job is not None else self.ref
        return target if self.on is On.SUCCESS else {"job": target, "on": self.on.value}


def met(on: On | str, state: JobState | str) -> bool | None:
    """Whether a dependency ``on`` is met by its job being in ``state``: True, False (never: it ended another
    way), or None (it has not ended yet)."""
    s = JobState(state)
    if s not in TERMINAL:
        return None
    o = On(on)
    if o is On.COMPLETION:
        return True
    return s is (JobState.SUCCEEDED if o is On.SUCCESS else JobState.FAILED)


def skipped_reason(dep_id: int, state: JobState | str, on: On | str) -> str:
    """The event reason of a job skipped because dependency ``dep_id`` ended ``state``, which ``on`` is not."""
    return f"dependency {dep_id} ended {JobState(state)}, not {_wanted(On(on))}"


def _wanted(on: On) -> str:
    return "succeeded" if on is On.SUCCESS else "failed" if on is On.FAILURE else "ended"


DEPS_MET = "dependencies met"  # the reason of a blocked job's move to queued (or scheduled)
UNSKIPPED = "dependency replayed: "  # the start of the reason of a skipped job's move back (then whose)


def check_ref(v: Any, fld: str) -> str:
    from orch.core.spec import NAME_RE

    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise ValidationError(f"{fld} must be 1-64 characters of letters, digits, '_', '.', ':' or '-'", field=fld)
    return v


def check_depends_on(v: Any, fld: str) -> tuple[Dep, ...]:
    """``depends_on`` as a submit writes it: a list of job ids (integers), refs of jobs of the same batch
    (strings), or objects ``{"job": ID or REF, "on": "success" | "failure" | "completion"}``."""
    if not isinstance(v, list):
        raise ValidationError(f"{fld} must be a list of job ids, refs, or {{\"job\", \"on\"}} objects", field=fld)
    if len(v) > MAX_DEPENDS:
        raise ValidationError(f"{fld} names more than {MAX_DEPENDS} dependencies", field=fld)
    out: list[Dep] = []
    seen: dict[tuple[int | None, str | None], On] = {}
    for i, item in enumerate(v):
        at = f"{fld}[{i}]"
        on = On.SUCCESS
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"job", "on"})
            if unknown:
                raise ValidationError(f"unknown field {unknown[0]!r}", field=f"{at}.{unknown[0]}")
            if "job" not in item:
                raise ValidationError(f"{at} needs a job: its id, or the ref of a job of the same batch",
                                      field=f"{at}.job")
            raw_on = item.get("on", "success")
            if not isinstance(raw_on, str) or raw_on not in On._value2member_map_:
                raise ValidationError(f"{at}.on must be one of {', '.join(o.value for o in On)}", field=f"{at}.on")
            on, item, at = On(raw_on), item["job"], f"{at}.job"
        if isinstance(item, float) and item.is_integer() and 1 <= item <= 2 ** 62:
            item = int(item)  # 2.0 is the integer 2, as JSON Schema reads it
        if isinstance(item, bool) or not isinstance(item, (int, str)) or (isinstance(item, int) and not
                                                                           1 <= item <= 2 ** 62):
            raise ValidationError(f"{at} must be a job id (a positive integer) or the ref of a job of the batch",
                                  field=at)
        dep = Dep(item, None, on) if isinstance(item, int) else Dep(None, check_ref(item, at), on)
        if (dep.job, dep.ref) in seen:  # the same twice is once; with another end, the list is at odds with itself
            if seen[(dep.job, dep.ref)] is not on:
                raise Conflict(f"{at} names {item!r} a second time, on {on} (it was on "
                               f"{seen[(dep.job, dep.ref)]} before)", field=at)
            continue
        seen[(dep.job, dep.ref)] = on
        out.append(dep)
    return tuple(out)


def resolve(refs: Sequence[str | None], deps: Sequence[Sequence[Dep]]) -> list[list[tuple[int | None, int | None, On]]]:
    """The dependencies of each job of a batch as (job id, batch index, on): a ref becomes the index of the job
    of the batch that has it. A ref none has is a NotFound; a ref two jobs have, and a cycle, a Conflict (the
    batch at odds with itself: each job alone is valid, which is all its schema can say), each naming the place
    (``jobs[i].ref``, ``jobs[i].depends_on[j]``)."""
    where: dict[str, int] = {}
    for i, ref in enumerate(refs):
        if ref is None:
            continue
        if ref in where:
            raise Conflict(f"ref {ref!r} is jobs[{where[ref]}]'s already: each job of a batch has its own",
                           field=f"jobs[{i}].ref")
        where[ref] = i
    out: list[list[tuple[int | None, int | None, On]]] = []
    for i, ds in enumerate(deps):
        row: list[tuple[int | None, int | None, On]] = []
        for j, d in enumerate(ds):
            if d.ref is None:
                row.append((d.job, None, d.on))
                continue
            k = where.get(d.ref)
            if k is None:
                raise NotFound(f"no job of this batch has ref {d.ref!r}", field=f"jobs[{i}].depends_on[{j}]")
            if k == i:
                raise Conflict(f"jobs[{i}] depends on itself", field=f"jobs[{i}].depends_on[{j}]")
            row.append((None, k, d.on))
        out.append(row)
    cycle = find_cycle([[k for _, k, _ in row if k is not None] for row in out])
    if cycle is not None:
        names = [refs[k] or f"jobs[{k}]" for k in cycle]
        i = cycle[0]
        j = next(n for n, (_, k, _) in enumerate(out[i]) if k == cycle[1 % len(cycle)])
        raise Conflict(f"the batch's dependencies make a cycle: {' -> '.join(names + names[:1])}",
                       field=f"jobs[{i}].depends_on[{j}]")
    return out


def find_cycle(edges: Sequence[Sequence[int]]) -> list[int] | None:
    """A cycle of the graph whose node ``i`` depends on ``edges[i]`` (as node indexes, each depending on the
    next), or None. Kahn's order, then a walk among the nodes it could not order."""
    n = len(edges)
    users: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    for i, ks in enumerate(edges):
        for k in ks:
            users[k].append(i)
            waiting[i] += 1
    ready = [i for i in range(n) if waiting[i] == 0]
    heapq.heapify(ready)
    done = 0
    while ready:
        k = heapq.heappop(ready)
        done += 1
        for i in users[k]:
            waiting[i] -= 1
            if waiting[i] == 0:
                heapq.heappush(ready, i)
    if done == n:
        return None
    # Every node left waits on another node left: walking dependencies among them must come back to one.
    start = next(i for i in range(n) if waiting[i] > 0)
    path: list[int] = []
    at: dict[int, int] = {}
    i = start
    while i not in at:
        at[i] = len(path)
        path.append(i)
        i = next(k for k in edges[i] if waiting[k] > 0)
    return path[at[i]:]


def first_state(pending: int, due: float | None, now: float) -> JobState:
    """A job's state once its dependencies are looked at: blocked while ``pending`` of them are undecided, else
    queued (or scheduled while its due time is ahead)."""
    if pending:
        return JobState.BLOCKED
    return JobState.SCHEDULED if due is not None and due > now else JobState.QUEUED


# A workflow's states (workflow_state): running, or the end of its jobs that tells its own.
WORKFLOW_STATES = (JobState.RUNNING.value, JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value,
                   JobState.SKIPPED.value)


def workflow_state(states: Sequence[JobState]) -> str:
    """A workflow's state from its jobs': running while any has not ended; then failed if one failed, cancelled
    if one was cancelled (and none failed), else succeeded (skipped jobs are the others' doing)."""
    if any(s not in TERMINAL for s in states):
        return JobState.RUNNING.value
    for end in (JobState.FAILED, JobState.CANCELLED):
        if end in states:
            return end.value
    return (JobState.SUCCEEDED if JobState.SUCCEEDED in states or not states else JobState.SKIPPED).value


def input_entry(key: str, state: str | None, exit_code: int | None, value: str | None) -> str:
    """One dependency in a job's inputs file, as JSON text: ``"key": {"state", "exit_code", "value"}`` (``value``
    is the JSON text its last attempt wrote to $ORCH_RESULT_PATH, or None)."""
    import json

    return (f'{json.dumps(key)}:{{"state":{json.dumps(state)},"exit_code":{json.dumps(exit_code)},'
            f'"value":{value if value is not None else "null"}}}')
