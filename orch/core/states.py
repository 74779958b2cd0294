"""The states of jobs, attempts and workers, and the one table of moves a job may make."""

from __future__ import annotations

import enum

from orch.core.errors import IllegalTransition


class JobState(enum.StrEnum):
    BLOCKED = "blocked"  # waits on its dependencies (depends_on): queued (or scheduled) once they are met
    SCHEDULED = "scheduled"  # submitted with a run_at or delay still ahead: queued once it is due
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # never ran: a dependency ended in a way that cannot meet it (or its key was full)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED})  # ended
REPLAYABLE = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED})  # ended; a replay may run them

# The one table of allowed moves. Every writer goes through check_transition().
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # Its dependencies met: queued, or scheduled while its run_at or delay is still ahead; one that cannot be
    # met: skipped (and so its own dependents, in turn).
    JobState.BLOCKED: frozenset({JobState.QUEUED, JobState.SCHEDULED, JobState.SKIPPED, JobState.CANCELLED}),
    JobState.SCHEDULED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    # (skipped: on_limit skip_new, a submit to a full concurrency key)
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.SKIPPED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.RETRYING, JobState.QUEUED, JobState.CANCELLED}
    ),
    JobState.RETRYING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    # A replay (orch retry) gives a failed or cancelled job a fresh set of attempts: ended, but not for good. A
    # job with dependencies not all met again (one of them replayed too) waits on them, blocked.
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.BLOCKED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.BLOCKED}),
    # A skipped job is un-skipped when the dependency that skipped it is replayed (and by a replay of its own).
    JobState.SKIPPED: frozenset({JobState.QUEUED, JobState.BLOCKED}),
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
