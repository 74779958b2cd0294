"""The states of jobs, attempts and workers, and the one table of moves a job may make."""

from __future__ import annotations

import enum

from orch.core.errors import IllegalTransition


class JobState(enum.StrEnum):
    SCHEDULED = "scheduled"  # submitted with a run_at or delay still ahead: queued once it is due
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})  # ended: nothing runs
REPLAYABLE = frozenset({JobState.FAILED, JobState.CANCELLED})  # ended, and a replay may run them again

# The one table of allowed moves. Every writer goes through check_transition().
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SCHEDULED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.RETRYING, JobState.QUEUED, JobState.CANCELLED}
    ),
    JobState.RETRYING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    # A replay (orch retry) gives a failed or cancelled job a fresh set of attempts: ended, but not for good.
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


def check_transition(frm: JobState | str, to: JobState | str) -> None:
    """Raise IllegalTransition unless the table allows ``frm -> to``."""
    f, t = JobState(frm), JobState(to)
    if t not in TRANSITIONS[f]:
        raise IllegalTransition(f"illegal job state transition {f} -> {t}")


def sources_of(to: JobState) -> tuple[str, ...]:
    """Every state from which ``to`` may be reached (for conditional UPDATEs)."""
    return tuple(sorted(s.value for s, targets in TRANSITIONS.items() if to in targets))


class Outcome(enum.StrEnum):
    """How one attempt ended."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    CANCELLED = "cancelled"
    HANDED_BACK = "handed_back"


class WorkerState(enum.StrEnum):
    """What the scheduler knows of a worker: heard from (alive), stopping (draining), silent for too long
    (lost), or gone by its own word (stopped)."""

    ALIVE = "alive"
    DRAINING = "draining"
    LOST = "lost"
    STOPPED = "stopped"

    @property
    def live(self) -> bool:
        return self in LIVE_WORKERS


LIVE_WORKERS = frozenset({WorkerState.ALIVE, WorkerState.DRAINING})
