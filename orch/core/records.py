"""What a store hands back: jobs, attempts, events, output, workers and leases, as plain typed values.

They carry domain facts only (times as Unix seconds, states as enums). How the API
writes them as JSON is the API layer's business (``orch/scheduler/wire.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from orch.core.cron import Schedule
from orch.core.rates import Rate
from orch.core.states import JobState, Outcome, WorkerState


class Job(NamedTuple):
    """A job as a listing shows it: everything but its spec (which may be large)."""

    id: int
    state: JobState
    queue: str
    priority: int
    name: str | None
    command: str  # what it runs as a person reads it, cut to COMMAND_SHOWN + 1 characters
    attempt: int  # the current or last attempt's number (0 before the first)
    max_attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    run_at: float | None  # when a scheduled or retrying job is due (after a scheduled one came due: when it was)
    worker_id: str | None  # the worker holding (or that last held) its lease
    cancel_requested: bool
    exit_code: int | None
    error: str | None
    replayed: bool = False  # a submit's answer: an existing job, named by the submit's idempotency key


class Attempt(NamedTuple):
    attempt: int
    worker_id: str | None
    state: Outcome  # running, or how it ended
    started_at: float
    finished_at: float | None
    exit_code: int | None
    error: str | None
    duration: float | None
    stdout_bytes: int  # every byte the worker saw the stream write (kept, trimmed or dropped)
    stderr_bytes: int
    value: str | None = None  # the JSON text the attempt wrote to $ORCH_RESULT_PATH (its result's value)


class Event(NamedTuple):
    """One state change of a job."""

    id: int
    job_id: int
    attempt: int
    from_state: JobState | None  # None for the submit
    to_state: JobState
    at: float
    reason: str


class OutputPiece(NamedTuple):
    """A stored chunk of an attempt's output; ``pos`` is the byte of its stream where it starts."""

    id: int
    attempt: int
    stream: str
    data: str
    pos: int
    size: int


class DepInfo(NamedTuple):
    """One dependency of a job: the job it waits on, what end of it meets it, whether it is met, the ref it had
    in the workflow, and that job's state now (None: it was purged)."""

    job_id: int
    on: str
    met: bool
    ref: str | None
    state: JobState | None


@dataclass(slots=True)
class JobRecord:
    """One job in full: its row, its spec as stored (the submitted form), its attempts, and the output
    kept of its last attempt (None when not asked for); its dependencies and its workflow (the id of the
    workflow's first job), if it has them."""

    job: Job
    spec: dict[str, Any]
    attempts: list[Attempt]
    output: list[OutputPiece] | None = None
    dependencies: list[DepInfo] = field(default_factory=list)
    workflow: int | None = None


class WorkflowNode(NamedTuple):
    """A job of a workflow as its graph shows it: the job, its ref, and its dependencies."""

    job: Job
    ref: str | None
    dependencies: list[DepInfo]


class Lease(NamedTuple):
    """A job handed to a worker: ``spec`` is its stored JSON text, embedded as it is in the answer; ``inputs``,
    for a job with dependencies, the JSON text of what they left (``{ref or id: {state, exit_code, value}}``)."""

    job_id: int
    attempt: int
    spec: str
    queue: str
    queued_at: float
    priority: int
    inputs: str | None = None


class Verdict(NamedTuple):
    """What became of one reported attempt end: ``state`` is the job's new state, None if it was stale."""

    job_id: int
    attempt: int
    state: JobState | None

    @property
    def accepted(self) -> bool:
        return self.state is not None


@dataclass(slots=True)
class Worker:
    id: str
    name: str
    hostname: str
    queues: list[str]
    concurrency: int
    state: WorkerState
    registered_at: float
    heartbeat_age: float  # seconds since it was last heard from (on the lease clock: immune to clock steps)
    running: int  # jobs it runs now (0 unless it is live)
    metrics: str | None  # the URL of its /metrics listener
    runners: tuple[str, ...] = ("exec",)  # the runners it has (it is handed only jobs of those)


@dataclass(slots=True)
class WorkerLoad:
    """A live worker as `why` and the metrics see it."""

    id: str
    name: str
    state: WorkerState
    concurrency: int
    busy: int
    heartbeat_age: float
    runners: tuple[str, ...] = ("exec",)


@dataclass(slots=True)
class JobFacts:
    """What `orch why` needs of one job (times on the wall clock, ``now`` among them)."""

    now: float
    record: JobRecord
    lease_expires_at: float | None  # the wall time it falls at, if the wall clock does not step meanwhile
    last_event: Event | None
    position: int | None = None  # queued: its place in its queue (1 is next)
    queued: int | None = None  # queued: jobs queued in its queue
    workers: list[WorkerLoad] = field(default_factory=list)  # queued, scheduled: live workers serving its queue
    worker: WorkerLoad | None = None  # running: the worker holding its lease, if it is still known
    queue_paused: bool = False  # queued, scheduled, retrying: its queue is paused (it hands out nothing)
    held: bool = False  # queued: held back, its concurrency key's slots all taken (orch/core/concurrency.py)
    slot_holders: list[int] = field(default_factory=list)  # held: the jobs taking its key's slots (some, oldest first)
    queue_limit: tuple[int, int] | None = None  # queued, its queue limited: (its concurrency limit, running there)
    dependencies: list[DepInfo] = field(default_factory=list)  # blocked, skipped: its dependencies


class QueueInfo(NamedTuple):
    """A queue as `orch queues` shows it: its unfinished jobs by state, whether it is paused, and how long its
    oldest queued job has waited (wall clock: the submit, or the due time of a job that was scheduled)."""

    name: str
    queued: int
    running: int
    scheduled: int
    retrying: int
    paused: bool
    oldest_queued_at: float | None
    concurrency: int | None = None  # at most this many of its jobs run at once (orch queue set Q --concurrency N)
    held: int = 0  # of its queued jobs, those held back by their concurrency key


class LimitInfo(NamedTuple):
    """A named rate limit and its bucket: ``tat`` (orch/core/rates.py; None: never used, full)."""

    name: str
    rate: Rate
    tat: float | None


@dataclass(slots=True)
class Snapshot:
    """Counts for the metrics gauges, read once per scrape."""

    jobs: dict[JobState, int]
    queues: dict[tuple[str, JobState], int]  # unfinished jobs by queue and state
    workers: dict[WorkerState, int]
    live_workers: list[WorkerLoad]


class MetricsTarget(NamedTuple):
    worker_id: str
    name: str
    url: str


class Credential(NamedTuple):
    """A worker's credential as the guard checks it: the digest only."""

    worker_id: str
    digest: str
    state: WorkerState
    queues: list[str]


class Leadership(NamedTuple):
    """Whether this scheduler runs the reaper now, and, when it has just taken the role (over, or back after its
    own lease ran out), for how long nobody held it (None: it held the role throughout, or had no predecessor)."""

    held: bool
    vacant_for: float | None = None


@dataclass(slots=True)
class ScheduleInfo:
    """A schedule and what its ticks did: the last tick decided, when the next one falls (None: never), the
    newest job a tick submitted and its state now, and how many ticks fired, were skipped (overlap) or missed
    (past the catch-up window)."""

    schedule: Schedule
    created_at: float
    updated_at: float
    last_tick: float
    next_at: float | None
    last_job: int | None = None
    last_job_state: JobState | None = None
    fired: int = 0
    skipped: int = 0
    missed: int = 0
    last_missed_at: float | None = None
