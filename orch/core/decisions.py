"""The lifecycle decisions: given a job's state and what happened, which move follows.

Pure functions of plain values. A store calls them inside its transaction and
applies the move they return (a conditional UPDATE from the state it read, and
an event row with the move's reason), so every backend makes the same moves for
the same reasons.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from orch.core import dag
from orch.core.concurrency import Concurrency, replaced_reason, skipped_reason
from orch.core.dag import On
from orch.core.errors import Conflict
from orch.core.rates import Rate, reserve
from orch.core.retry import RetryPolicy
from orch.core.states import REPLAYABLE, JobState, Outcome, check_transition
from orch.core.times import iso


@dataclass(frozen=True, slots=True)
class Move:
    """A job's next state, why, and what goes with it."""

    to: JobState
    reason: str
    retry_in: float | None = None  # seconds until a retrying job is due again
    refund: bool = False  # the attempt does not count against the job's max_attempts (a hand-back)

    @property
    def ends(self) -> bool:
        """The job is over: its finished_at is stamped."""
        return self.to.terminal


def reason(outcome: Outcome, exit_code: int | None, error: str | None) -> str:
    """How an attempt ended, in the words its event row keeps."""
    if outcome is Outcome.SUCCEEDED:
        return "exited 0"
    if outcome is Outcome.FAILED:
        return error or f"exited {exit_code}"
    if outcome is Outcome.TIMED_OUT:
        return error or "timed out"
    if outcome is Outcome.LOST:
        return error or "worker lost"
    return error or str(outcome)


SUBMITTED = "submitted"  # the reason of a job's first event
SUCCEEDED = Move(JobState.SUCCEEDED, reason(Outcome.SUCCEEDED, 0, None))
CANCELLED_BY_USER = "cancelled by user"
CANCELLED = Move(JobState.CANCELLED, CANCELLED_BY_USER)  # a cancel of a job that was not running
BACKOFF_OVER = Move(JobState.QUEUED, "backoff over")
DUE = Move(JobState.QUEUED, "scheduled time reached")  # a scheduled job whose run_at or delay came


def submitted(due: float | None, now: float) -> JobState:
    """A new job's first state: scheduled while the time it is due (``JobSpec.due``) is after ``now``, else queued
    (no run_at nor delay, a run_at already past, a delay of 0)."""
    return JobState.SCHEDULED if due is not None and due > now else JobState.QUEUED


def attempt_ended(
    outcome: Outcome, exit_code: int | None, error: str | None, attempt: int, *, cancel_requested: bool,
    policy: Callable[[], RetryPolicy], rand: Callable[[], float],
) -> Move:
    """The move of a running job whose current attempt ended with ``outcome``.

    A success ends the job succeeded even when a cancel was asked meanwhile (it
    finished first: the honest end is the real one). Otherwise a cancel asked
    for, or an attempt that was cancelled, ends it cancelled. Otherwise the
    job's retry policy decides between another attempt after a backoff and
    failing. ``policy`` is called only when a retry is weighed (a store reads
    the job's spec for it), ``rand`` only when a backoff is drawn.
    """
    if outcome is Outcome.SUCCEEDED:
        return SUCCEEDED
    why = reason(outcome, exit_code, error)
    if cancel_requested or outcome is Outcome.CANCELLED:
        return Move(JobState.CANCELLED, CANCELLED_BY_USER if cancel_requested else why)
    p = policy()
    if p.retries(outcome, exit_code, attempt):
        delay = p.delay(attempt, rand())
        return Move(JobState.RETRYING, f"{why}; retry in {delay:.1f}s", retry_in=delay)
    return Move(JobState.FAILED, why)


def lost(worker_id: str | None, worker_lost: bool) -> str:
    """Why a running attempt is taken from its worker: the worker went silent, or the lease ran out."""
    return f"worker {worker_id} lost" if worker_lost else f"lease expired on worker {worker_id}"


class CancelAction(enum.Enum):
    ASK_WORKER = "ask_worker"  # running: the worker is told at its next heartbeat; the job ends when it reports
    END = "end"  # not started (or between attempts): it ends cancelled now


def cancel(job_id: int, state: JobState) -> CancelAction:
    """What a cancel of a job in ``state`` does; Conflict if the job has ended already."""
    if state.terminal:
        raise Conflict(f"job {job_id} already ended {state}", field="id")
    if state is JobState.RUNNING:
        return CancelAction.ASK_WORKER
    check_transition(state, JobState.CANCELLED)
    return CancelAction.END


RATE_HELD = "held by rate limit "  # in a submit's event reason when a limit put its start off (orch why finds it)


def rated(due: float | None, now: float, names: Sequence[str], limits: Mapping[str, Rate],
          tats: Mapping[str, float | None]) -> tuple[JobState, float | None, str, dict[str, float]]:
    """A submit whose start counts against the rate limits ``names``: a start is reserved on each at the first
    time all of them allow it, no sooner than the job is due. Returns its first state, its due time (None:
    queued now), its first event's reason (naming the limit that put it off, if one did) and the limits' new
    ``tat``."""
    at, holder, new = reserve(limits, tats, names, due if due is not None and due > now else now)
    if holder is None:
        state = submitted(due, now)
        return state, due if state is JobState.SCHEDULED else None, SUBMITTED, new
    return JobState.SCHEDULED, at, submitted_held(holder, iso(at) or ""), new


def unknown_limit(name: str) -> str:
    return f"no rate limit {name!r}: make it first (orch limit set {name} --rate COUNT/UNIT)"


def submitted_held(holder: str, until: str) -> str:
    """The event reason of a submit whose start the rate limit ``holder`` puts off until ``until``."""
    return f"{SUBMITTED}; {RATE_HELD}{holder} until {until}"


def skipped(c: Concurrency, taken: int) -> Move:
    """on_limit skip_new: a new job whose key is full ends at once, skipped, saying why (a replay runs it)."""
    check_transition(JobState.QUEUED, JobState.SKIPPED)
    return Move(JobState.SKIPPED, skipped_reason(c, taken))


def dependency_failed(dep_id: int, dep_state: JobState, on: On) -> Move:
    """A blocked job one of whose dependencies ended in a way that cannot meet it: skipped, naming it."""
    return Move(JobState.SKIPPED, dag.skipped_reason(dep_id, dep_state, on))


def dependencies_met(due: float | None, now: float) -> Move:
    """A blocked job whose last dependency is met: queued, or scheduled while its run_at or delay is ahead."""
    return Move(dag.first_state(0, due, now), dag.DEPS_MET)


def unskipped(pending: int, dep_id: int, due: float | None, now: float) -> Move:
    """A job skipped because of dependency ``dep_id``, which a replay queued again: blocked while ``pending`` of
    its dependencies are undecided (that one is, now), else queued."""
    return Move(dag.first_state(pending, due, now), f"{dag.UNSKIPPED}{dep_id}")


def replaced(key: str, new_id: int) -> Move:
    """on_limit cancel_running: a queued job of a full key that a newer one (``new_id``) takes the place of."""
    return Move(JobState.CANCELLED, replaced_reason(key, new_id))


REPLAYED_BY = "replayed by "  # the start of a replay's event reason (orch why finds it there)


def replay(job_id: int, state: JobState, by: str, pending: int = 0, failed_dep: tuple[int, str] | None = None) -> Move:
    """The move of a replay (``orch retry``) asked for by ``by``: a failed, cancelled or skipped job is queued
    again with a fresh set of attempts (the store counts them from its current attempt on), or blocked while
    ``pending`` of its dependencies are undecided; Conflict for any other state, and for a job a dependency of
    which (``failed_dep``: its id and state) ended so that it can never be met (replay that one)."""
    if state not in REPLAYABLE:
        doing = "has succeeded" if state is JobState.SUCCEEDED else f"is {state}, not ended"
        raise Conflict(f"job {job_id} {doing}: only a failed, cancelled or skipped job is replayed", field="id")
    if failed_dep is not None:
        raise Conflict(f"job {job_id} depends on job {failed_dep[0]}, which ended {failed_dep[1]}: replay that one "
                       "(its dependents are un-skipped with it)", field="id")
    return Move(JobState.BLOCKED if pending else JobState.QUEUED, REPLAYED_BY + by)


def claimed(worker_id: str) -> Move:
    return Move(JobState.RUNNING, f"claimed by {worker_id}")


def handed_back(worker_id: str) -> Move:
    """A stopping worker gave its attempt back: queued again at once, and the attempt is not counted."""
    return Move(JobState.QUEUED, f"handed back by {worker_id}", refund=True)


HANDED_BACK_ERROR = "handed back by a stopping worker"  # what the attempt row keeps
