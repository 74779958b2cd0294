"""`orch why JOB`: why a job is (not) running, in one or two lines, from facts the store gathered.

``explain(facts, heartbeat_interval)`` is pure: ``store.why_facts(job_id)``
reads the job row, its last event, its queue position and the live workers
serving its queue (or the worker holding its lease); this module turns them
into ``{"reason": code, "message": text, ...details}``.

Reason codes: ``scheduled`` (a delayed job not due yet, or being queued), ``no_worker``, ``no_runner``, ``waiting_for_slot``,
``backoff``, ``lease_held``
(the lease holder has gone quiet), ``running``, ``cancel_requested``,
``succeeded``, ``failed``, ``cancelled``, ``rate_limited`` (a job a rate limit put off: which, and until when),
``concurrency_limited`` (a queued job held back: its concurrency key's slots are all taken, and by which jobs),
``queue_limited`` (a queued job whose queue runs as many jobs as its concurrency limit lets it),
``queue_paused`` (a queued job whose queue is paused; a scheduled or
retrying one says it too, with ``queue_paused: true``); a queued job a replay queued again says so first (``replayed_by``).
``blocked`` (waiting on dependencies: which ones, and what each is doing), ``skipped`` (a dependency ended so that it
can never be met: which; or its concurrency key was full).
"""

from __future__ import annotations

from typing import Any, Callable

from orch.core.decisions import RATE_HELD, REPLAYED_BY
from orch.core.kinds import runner_of
from orch.core.records import JobFacts, WorkerLoad
from orch.core.states import JobState, WorkerState
from orch.core.times import iso
from orch.scheduler.wire import job_summary

# A worker is "quiet" once it has missed this many heartbeats.
QUIET_HEARTBEATS = 2.0


def _s(seconds: float) -> str:
    return f"{seconds:.1f}s"


def _span(seconds: float) -> str:
    """A time ahead as people say it: 42.0s, 9m58s, 2h05m, 3d04h."""
    if seconds < 60:
        return _s(seconds)
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _worker_name(w: WorkerLoad | None, fallback: str | None) -> str:
    if not w:
        return str(fallback)
    return f"{w.id} ({w.name})" if w.name and w.name != w.id else str(w.id)


def explain(facts: JobFacts, heartbeat_interval: float) -> dict[str, Any]:
    j = facts.record.job
    job = job_summary(j)  # times as the API writes them
    now = facts.now
    jid, state, queue = j.id, j.state, j.queue
    last_reason = facts.last_event.reason if facts.last_event else None
    out: dict[str, Any] = {"job_id": jid, "state": state.value, "queue": queue, "attempt": j.attempt,
                           "max_attempts": j.max_attempts}

    def done(reason: str, message: str, **details: Any) -> dict[str, Any]:
        if facts.queue_paused and reason != "queue_paused":
            # Due, or its backoff over, it is queued on a queue that hands nothing out: say so as well.
            message += f" Queue {queue} is paused: none of its jobs starts until `orch queue resume {queue}`."
        if facts.queue_paused:
            details["queue_paused"] = True
        out.update(details, reason=reason, message=message)
        return out

    if state is JobState.SUCCEEDED:
        return done(state.value, f"job {jid} is not running because it is done: it succeeded at "
                                 f"{job['finished_at']} (attempt {job['attempt']}, exit {job['exit_code']}).")
    if state is JobState.FAILED:
        why = j.error or (f"exited {j.exit_code}" if j.exit_code is not None else last_reason)
        return done(state.value, f"job {jid} failed for good at {job['finished_at']} after attempt "
                              f"{job['attempt']} of {job['max_attempts']}: {why}; it will not run again unless replayed "
                              f"(orch retry {jid}).")
    if state is JobState.CANCELLED:
        return done(state.value, f"job {jid} was cancelled at {job['finished_at']}"
                                 + (f" ({last_reason})" if last_reason else "")
                    + f"; it will not run again unless replayed (orch retry {jid}).")
    if state is JobState.BLOCKED:
        waits = [d for d in facts.dependencies if not d.met]
        deps = [{"job_id": d.job_id, "ref": d.ref, "on": d.on, "state": d.state.value if d.state else None}
                for d in waits]
        if not waits:
            return done("blocked", f"job {jid} waits on its dependencies; the last one ended and it is being queued.",
                        waiting_on=deps)
        first = waits[0]
        what = f"job {first.job_id}" + (f" ({first.ref})" if first.ref else "")
        wanted = {"success": "succeed", "failure": "fail", "completion": "end"}[first.on]
        more = f" and {_plural(len(waits) - 1, 'other dependency')}" if len(waits) > 1 else ""
        return done("blocked", f"job {jid} is blocked: it waits on {what}, which is "
                               f"{first.state.value if first.state else 'gone'}, to {wanted}{more}; then it is queued "
                               f"on {queue}.", waiting_on=deps)
    if state is JobState.SKIPPED:
        return done("skipped", f"job {jid} was skipped at {job['finished_at']}"
                               + (f" ({last_reason})" if last_reason else "") + "; it never ran"
                    + (": orch retry of the dependency that skipped it runs it" if facts.dependencies else
                       f"; orch retry {jid} runs it") + ".")
    if state is JobState.SCHEDULED:
        due = j.run_at if j.run_at is not None else now
        left = due - now
        details = {"scheduled_for": iso(due), "due_in": round(max(0.0, left), 3)}
        alive = [w for w in facts.workers if w.state is WorkerState.ALIVE]
        unserved = "" if alive else f" (no live worker serves {queue} now)"
        held = last_reason.split(RATE_HELD, 1)[1].split(" until ", 1)[0] if last_reason and RATE_HELD in last_reason \
            else None
        if held is not None:
            details["rate_limit"] = held
        if left > 0 and held is not None:
            return done("rate_limited", f"job {jid} is held by rate limit {held}: it may start at {iso(due)} "
                                        f"({_span(left)} from now), scheduled until then; then it is queued on "
                                        f"{queue}{unserved}.", **details)
        if left > 0:
            return done("scheduled", f"job {jid} is scheduled for {iso(due)} ({_span(left)} from now); then it is "
                                     f"queued on {queue}{unserved}.", **details)
        return done("scheduled", f"job {jid} was due at {iso(due)}; it is being queued on {queue}{unserved}.",
                    **details)
    if state is JobState.RETRYING:
        run_at = j.run_at or now
        left = run_at - now
        after = f"after attempt {job['attempt']} of {job['max_attempts']}" + (f" ({last_reason})" if last_reason else "")
        if left > 0:
            msg = (f"job {jid} is in backoff until {iso(run_at)} ({_s(left)} from now) {after}; "
                   f"then it is queued again on {queue}.")
        else:
            msg = f"job {jid}'s backoff ended at {iso(run_at)} {after}; it is being queued again on {queue}."
        return done("backoff", msg, retry_at=iso(run_at), retry_in=round(max(0.0, left), 3))
    if state is JobState.RUNNING:
        w = facts.worker
        name = _worker_name(w, j.worker_id)
        lease_left = (facts.lease_expires_at or now) - now
        age = w.heartbeat_age if w else None
        details = {"worker": j.worker_id, "heartbeat_age": round(age, 3) if age is not None else None,
                   "lease_expires_in": round(max(0.0, lease_left), 3)}
        if j.cancel_requested:
            return done("cancel_requested", f"job {jid} is being cancelled: worker {name} kills it at its next "
                                            f"heartbeat and reports back.", **details)
        heard = f"last heartbeated {_s(age)} ago" if age is not None else "is no longer registered"
        then = ("retried" if job["attempt"] < job["max_attempts"] else "failed")
        if w is None or not w.state.live or (age is not None and age > QUIET_HEARTBEATS * heartbeat_interval):
            gone = f" and was marked {w.state}" if w and not w.state.live else ""
            return done("lease_held", f"job {jid} is held by a lease on worker {name}, which {heard}{gone} "
                                      f"(heartbeats are due every {heartbeat_interval:g}s); unless it is heard "
                                      f"from, the lease expires in {_s(max(0.0, lease_left))} and the job is {then}.",
                        **details)
        return done(state.value, f"job {jid} is running: attempt {job['attempt']} on worker {name}, which {heard}; "
                               f"its lease runs {_s(max(0.0, lease_left))} more unless renewed.", **details)
    if state is JobState.QUEUED and facts.last_event and last_reason and last_reason.startswith(REPLAYED_BY):
        # Queued again by a replay: say so first, then why it has not started (the rest is as for any queued job).
        replay = f"job {jid} was {last_reason} at {iso(facts.last_event.at)}; "
        out["replayed_by"] = last_reason[len(REPLAYED_BY):]
        queued = explain_queued(facts, done, jid, queue)
        queued["message"] = replay + queued["message"]
        return queued
    if state is JobState.QUEUED and facts.held:
        return explain_held(facts, done, jid, queue)
    if state is JobState.QUEUED:
        return explain_queued(facts, done, jid, queue)
    return done(state.value, f"job {jid} is {state}.")


def explain_held(facts: JobFacts, done: Callable[..., dict[str, Any]], jid: int, queue: str) -> dict[str, Any]:
    """A queued job its concurrency key holds back: which key, its limit, and the jobs taking its slots."""
    c = facts.record.spec.get("concurrency") or {}
    key, limit, holders = c.get("key"), c.get("limit"), facts.slot_holders
    names = ", ".join(str(h) for h in holders) + (", ..." if len(holders) >= 20 else "")
    return done("concurrency_limited",
                f"job {jid} is queued on {queue} and held by concurrency key {key!r}: its {_plural(limit or 0, 'slot')}"
                f" {'is' if limit == 1 else 'are'} taken (by job{'s' if len(holders) != 1 else ''} {names}); it is "
                f"let go when one of them ends.", concurrency_key=key, concurrency_limit=limit,
                slot_holders=holders)


def explain_queued(facts: JobFacts, done: Callable[..., dict[str, Any]], jid: int, queue: str) -> dict[str, Any]:
    """Why a queued job has not started: no live worker serves its queue, or it waits for a slot."""
    workers = facts.workers
    alive = [w for w in workers if w.state is WorkerState.ALIVE]
    position, queued = facts.position or 1, facts.queued or 1
    details = {"position": position, "queued_in_queue": queued, "workers": len(alive)}
    if facts.queue_paused:
        return done("queue_paused", f"job {jid} is queued on {queue}, which is paused: no job of it is handed out "
                                    f"until `orch queue resume {queue}` (position {position} of {queued}).", **details)
    if facts.queue_limit is not None and facts.queue_limit[1] >= facts.queue_limit[0]:
        limit, running = facts.queue_limit
        return done("queue_limited", f"job {jid} is queued on {queue}, whose concurrency limit of {limit} is "
                                     f"reached ({running} running); it starts when one of them ends (position "
                                     f"{position} of {queued}).", queue_concurrency=limit, queue_running=running,
                    **details)
    runner = runner_of(facts.record.spec)
    if alive and not any(runner in w.runners for w in alive):
        has = sorted({r for w in alive for r in w.runners})
        return done("no_runner", f"job {jid} is queued, but no live worker has runner {runner}: "
                                 f"{_plural(len(alive), 'live worker')} serve{'s' if len(alive) == 1 else ''} "
                                 f"{queue} with {', '.join(has)}; start a worker that has it (`orch plugins` on "
                                 "its machine lists what it finds).", runner=runner, **details)
    alive = [w for w in alive if runner in w.runners]
    if not alive:
        draining = len(workers) - len(alive)
        extra = f" ({_plural(draining, 'worker')} serving it {'is' if draining == 1 else 'are'} draining)" if draining else ""
        return done("no_worker", f"job {jid} is queued, but no live worker serves queue {queue}{extra}; start one "
                                 f"with `orch worker --join SCHEDULER --queue {queue}`.", **details)
    slots = sum(w.concurrency for w in alive)
    busy = sum(min(w.busy, w.concurrency) for w in alive)
    free = slots - busy
    details.update(slots=slots, busy_slots=busy)
    served = f"{_plural(len(alive), 'live worker')} serve{'s' if len(alive) == 1 else ''} {queue}"
    if free <= 0:
        msg = (f"job {jid} is waiting for a free slot on queue {queue} (position {position} of {queued}): "
               f"{served} and {'its one slot is' if slots == 1 else f'all {slots} slots are'} busy.")
    elif free < position:
        msg = (f"job {jid} is waiting for a free slot on queue {queue} (position {position} of {queued}): "
               f"{served} with {free} of {_plural(slots, 'slot')} free, and {_plural(position - 1, 'job')} "
               f"{'is' if position == 2 else 'are'} ahead of it.")
    else:
        msg = (f"job {jid} is next in line on queue {queue} (position {position} of {queued}) and "
               f"{free} of {_plural(slots, 'slot')} are free on the {served.split(' serve')[0]}: it should start "
               f"at their next lease request.")
    return done("waiting_for_slot", msg, **details)
