"""The API's JSON shapes: how the store's records (orch/core/records.py) are written on the wire.

The one place that knows field names and time formats of answers; the
OpenAPI document (openapi.py) describes the same shapes.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from orch.core.dag import workflow_state
from orch.core.rates import allowed_at
from orch.core.records import (
    Attempt,
    DepInfo,
    Event,
    Job,
    JobRecord,
    Lease,
    LimitInfo,
    OutputPiece,
    QueueInfo,
    ScheduleInfo,
    Verdict,
    Worker,
    WorkflowNode,
)
from orch.core.spec import COMMAND_SHOWN, spec_view
from orch.core.states import JobState
from orch.core.times import iso
from orch.output import render as render_output

_RETRYING, _SCHEDULED = JobState.RETRYING, JobState.SCHEDULED


def job_summary(j: Job, times: dict[float, str | None] | None = None) -> dict[str, Any]:
    """A job as a listing shows it: bounded in size whatever its spec (the command cut, with a flag).

    ``times``: the texts of timestamps already written, for many jobs at once (a batch shares its
    created_at). The record is unpacked at once: a batch or page writes thousands of these, and a
    named field read costs as much as the rest of the line.
    """
    (id_, state, queue, priority, name, command, attempt, max_attempts, created_at, started_at, finished_at,
     run_at, worker_id, cancel_requested, exit_code, error, replayed) = j
    command = command or ""
    if times is None:
        created = iso(created_at)
    else:
        created = times.get(created_at)
        if created is None:
            created = times[created_at] = iso(created_at)
    return {
        "id": id_,
        "state": state.value,
        "queue": queue,
        "priority": priority,
        "name": name,
        "command": command[:COMMAND_SHOWN],
        "command_truncated": len(command) > COMMAND_SHOWN,
        "attempt": attempt,
        "max_attempts": max_attempts,
        "created_at": created,
        "started_at": None if started_at is None else iso(started_at),
        "finished_at": None if finished_at is None else iso(finished_at),
        "retry_at": iso(run_at) if state is _RETRYING else None,
        "scheduled_for": iso(run_at) if state is _SCHEDULED else None,
        "worker": worker_id,
        "cancel_requested": cancel_requested,
        "exit_code": exit_code,
        "error": error,
        **_REPLAY[replayed],
    }


_REPLAY: dict[bool, dict[str, bool]] = {False: {}, True: {"idempotent_replay": True}}


def attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "worker": a.worker_id,
        "state": a.state.value,
        "started_at": iso(a.started_at),
        "finished_at": iso(a.finished_at),
        "exit_code": a.exit_code,
        "error": a.error,
        "duration": a.duration,
        "stdout_bytes": a.stdout_bytes,
        "stderr_bytes": a.stderr_bytes,
    }


def result_json(last: Attempt, pieces: Iterable[OutputPiece], output_limit: int) -> dict[str, Any]:
    """The last attempt's end and the tail of its output up to the limit, with a marker wherever bytes
    are missing (orch/output.py)."""
    streams: dict[str, list[tuple[int, str, int]]] = {"stdout": [], "stderr": []}
    for p in pieces:
        streams[p.stream].append((p.pos, p.data, p.size))
    result: dict[str, Any] = {"attempt": last.attempt, "exit_code": last.exit_code, "error": last.error,
                              "duration": last.duration,
                              "value": json.loads(last.value) if last.value is not None else None}
    for name, total in (("stdout", last.stdout_bytes), ("stderr", last.stderr_bytes)):
        text, cut = render_output(name, streams[name], total, output_limit)
        result[name] = text
        result[f"{name}_truncated"] = cut
    return result


def job_json(rec: JobRecord, view_defaults: Mapping[str, Any], output_limit: int) -> dict[str, Any]:
    """A job in full: its spec in the form it was submitted in with the defaults filled in
    (``spec_view``), its attempts, and (when the record holds its output) its result."""
    job = job_summary(rec.job)
    job["spec"] = spec_view(rec.spec, view_defaults)
    job["attempts"] = [attempt_json(a) for a in rec.attempts]
    job["duration"] = rec.attempts[-1].duration if rec.attempts else None
    job["result"] = (result_json(rec.attempts[-1], rec.output, output_limit)
                     if rec.attempts and rec.output is not None else None)
    job["dependencies"] = [dep_json(d) for d in rec.dependencies]
    job["workflow"] = rec.workflow
    return job


def dep_json(d: DepInfo) -> dict[str, Any]:
    return {"job_id": d.job_id, "on": d.on, "met": d.met, "ref": d.ref,
            "state": d.state.value if d.state is not None else None}


def workflow_json(workflow: int, nodes: Sequence[WorkflowNode]) -> dict[str, Any]:
    """A workflow: its id (its first job's), its state from its jobs', and each job with its dependencies."""
    return {"id": workflow, "state": workflow_state([n.job.state for n in nodes]),
            "counts": {s: n for s, n in sorted(Counter(n.job.state.value for n in nodes).items())},
            "jobs": [{**job_summary(n.job), "ref": n.ref, "dependencies": [dep_json(d) for d in n.dependencies]}
                     for n in nodes]}


def event_json(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "job_id": e.job_id,
        "attempt": e.attempt,
        "from": e.from_state.value if e.from_state is not None else None,
        "to": e.to_state.value,
        "at": iso(e.at),
        "reason": e.reason,
    }


def worker_json(w: Worker, now: float) -> dict[str, Any]:
    """``now``: the wall clock; the last heartbeat is shown as the wall time ``heartbeat_age`` ago."""
    return {
        "id": w.id,
        "name": w.name,
        "hostname": w.hostname,
        "queues": w.queues,
        "concurrency": w.concurrency,
        "state": w.state.value,
        "registered_at": iso(w.registered_at),
        "last_heartbeat": iso(now - w.heartbeat_age),
        "heartbeat_age": round(w.heartbeat_age, 3),
        "running": w.running,
        "metrics": w.metrics,
        "runners": list(w.runners),
    }


def verdict_json(v: Verdict) -> dict[str, Any]:
    if v.state is None:
        return {"job_id": v.job_id, "attempt": v.attempt, "accepted": False, "error": "stale_attempt"}
    return {"job_id": v.job_id, "attempt": v.attempt, "accepted": True, "state": v.state.value}


def refs_json(refs: Iterable[tuple[int, int]]) -> list[dict[str, int]]:
    return [{"job_id": job_id, "attempt": attempt} for job_id, attempt in refs]


_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def leases_json(leases: Iterable[Lease]) -> str:
    """Claimed jobs as the JSON list the worker gets, each spec embedded as the JSON text the store keeps
    (it was made by json.dumps at submit): no parse and re-encode per job."""
    return "[" + ",".join(
        f'{{"job_id":{j.job_id:d},"attempt":{j.attempt:d},"spec":{j.spec},"queue":{_string(j.queue)},'
        f'"queued_at":{j.queued_at!r}' + (f',"inputs":{j.inputs}}}' if j.inputs is not None else "}")
        for j in leases) + "]"


def queue_json(q: QueueInfo, now: float) -> dict[str, Any]:
    """A queue as GET /v1/queues shows it: unfinished jobs by state, paused, its oldest queued job's wait."""
    oldest = q.oldest_queued_at
    return {"name": q.name, "queued": q.queued, "running": q.running, "scheduled": q.scheduled,
            "retrying": q.retrying, "paused": q.paused, "oldest_queued_at": iso(oldest) if oldest is not None else None,
            "oldest_queued_age": round(max(0.0, now - oldest), 3) if oldest is not None else None,
            "concurrency": q.concurrency, "held": q.held}


def limit_json(x: LimitInfo, now: float) -> dict[str, Any]:
    """A rate limit as GET /v1/limits shows it, with the first time its next start is allowed."""
    first = allowed_at(x.rate, x.tat)
    return {"name": x.name, "rate": x.rate.text(), "count": x.rate.count, "per": x.rate.per, "burst": x.rate.burst,
            "next_start_at": iso(max(first, now))}


def schedule_json(x: ScheduleInfo, upcoming: Sequence[float] | None = None) -> dict[str, Any]:
    """A schedule as the API shows it: its definition, its next tick (and the next few, when asked), what its ticks
    did and its last job."""
    s = x.schedule
    out: dict[str, Any] = {"name": s.name, **s.to_json(), "created_at": iso(x.created_at),
                           "updated_at": iso(x.updated_at), "next_at": iso(x.next_at) if x.next_at is not None else None,
                           "last_job": ({"id": x.last_job, "state": x.last_job_state.value if x.last_job_state else None}
                                        if x.last_job is not None else None),
                           "fired": x.fired, "skipped": x.skipped, "missed": x.missed,
                           "last_missed_at": iso(x.last_missed_at) if x.last_missed_at is not None else None}
    if upcoming is not None:
        out["next"] = [iso(t) for t in upcoming]
    return out
