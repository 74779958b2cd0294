"""The Store contract: every operation the scheduler calls, named for what it means.

A backend (``sqlite.py`` today) implements ``Store``; mypy checks that it does
(``_check`` at the end of each backend's module), and one contract test suite
(tests/contract/) runs against every backend. Every implementation keeps these
promises:

* a call that returns has committed; one whose answer promises durability
  (``submit``, ``complete``, ``cancel``, ``hand_back``) is on disk at the
  configured level (``storage.synchronous``), and ``synced()`` waits for the
  same point for a reader;
* every job state change is a move the core decided (``orch.core.decisions``),
  checked against the one table (``orch.core.states.check_transition``), made
  by a conditional write from the state it was read in, with an event row in
  the same transaction;
* a claim hands each job to exactly one worker, in the policy's order
  (``orch.core.policy``);
* anything naming an attempt (heartbeat, output, completion, hand-back) is
  refused unless that attempt is the job's current running one, held by that
  worker (fencing), and changes nothing when refused;
* liveness (leases, heartbeats) is judged on ``lease_clock()``, which a step of
  the wall clock does not move; what people read is stamped by ``clock()``;
* committed job state changes go to ``on_commit`` once their transaction has
  committed, before any caller is answered.

Records come back as plain values (``orch.core.records``); the API layer
writes them as JSON (``orch/scheduler/wire.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from orch.core import dag
from orch.core.cron import Overlap, Schedule
from orch.core.dag import On
from orch.core.errors import OrchError, ValidationError
from orch.core.rates import Rate
from orch.core.records import (
    Credential,
    DepInfo,
    Event,
    Job,
    JobFacts,
    JobRecord,
    Leadership,
    Lease,
    LimitInfo,
    MetricsTarget,
    OutputPiece,
    QueueInfo,
    ScheduleInfo,
    Snapshot,
    Verdict,
    Worker,
    WorkflowNode,
)
from orch.core.retry import RetryPolicy
from orch.core.spec import JobSpec
from orch.core.states import JobState, Outcome


@dataclass(frozen=True)
class OutputChunk:
    job_id: int
    attempt: int
    stream: str  # "stdout" or "stderr"
    data: str
    skipped: int = 0  # bytes of this stream the worker dropped right before ``data`` (never sent)


@dataclass(frozen=True)
class AttemptResult:
    job_id: int
    attempt: int
    outcome: Outcome
    exit_code: int | None = None
    error: str | None = None
    duration: float | None = None
    output: Sequence[OutputChunk] = ()
    waited: float = 0.0  # seconds the worker held the job before starting it (started_at moves by this)
    value: str | None = None  # the JSON text of the value it wrote to $ORCH_RESULT_PATH (checked by the API)


@dataclass
class Change:
    """A job state change committed by a store call; the scheduler wakes waiters from these."""

    job_id: int
    state: str
    queue: str
    attempt: int
    # For metrics and the state-change log line; filled where the store has them at hand.
    worker: str | None = None  # the worker that claimed, ended or handed back the attempt
    outcome: str | None = None  # how the attempt ended (core.states.Outcome), when this change ends one
    duration: float | None = None  # seconds the attempt ran, when this change ends one
    queue_wait: float | None = None  # seconds from submit (or from its scheduled time) to the first start
    # When a scheduled or retrying job is due (wall clock): the reaper's timer is set again for a sooner one. On
    # the move of a scheduled job that came due to queued: the time it was due (so it is not taken for a submit).
    due: float | None = None
    replay: bool = False  # a replay (orch retry) queued this ended job again
    unheld: bool = False  # a held job let go (its concurrency key has a free slot): queued all along, to be had now
    unblocked: bool = False  # a blocked job whose dependencies are met, or a skipped one a replay un-skipped


def freed_slots(changes: Sequence[Change], limits: Mapping[str, int]) -> list[Change]:
    """For each attempt that ended (or was handed back) in a queue with a concurrency limit: a wake-up of that
    queue's waiters, as for a job queued there (its room grew by one; the jobs were queued all along)."""
    return [Change(c.job_id, _QUEUED, c.queue, c.attempt, unheld=True) for c in changes
            if c.outcome is not None and c.queue in limits]


SLOT_HOLDERS_SHOWN = 20  # of the jobs taking a held job's key's slots, how many orch why names


@dataclass
class Hint:
    """What another scheduler sharing the database committed, as much as a waiter here needs to be woken:
    how many jobs each queue got, the ids of the jobs that changed, and whether a job was given a due time (a
    retry or a scheduled submit: the reaper wants to know), with the earliest of them when all were told.
    Never the truth: the woken read the database."""

    queued: dict[str, int]
    job_ids: list[int]
    retrying: bool = False  # a job went to retrying or scheduled (the leader's reaper may have to look sooner)
    due: float | None = None  # the earliest due time among them (None: not known, look now)


@dataclass
class HeartbeatReply:
    """(job id, attempt) of the attempts the worker must cancel, and of those that are no longer its own."""

    cancel: list[tuple[int, int]] = field(default_factory=list)
    stale: list[tuple[int, int]] = field(default_factory=list)
    drain: bool = False  # it was asked to drain (drain_worker) and has not said it drains


@dataclass
class Sweep:
    """What one reaper pass did."""

    changes: list[Change] = field(default_factory=list)
    lost_workers: list[str] = field(default_factory=list)
    next_due: float | None = None  # the earliest due time of a retrying or scheduled job (wall clock)


def queue_infos(counts: Iterable[tuple[str, str, int, float | None]], paused: dict[str, bool],
                names: Sequence[str] | None, limits: dict[str, int | None] | None = None,
                held: dict[str, int] | None = None) -> list[QueueInfo]:
    """QueueInfo rows, by name, from the unfinished jobs' counts (queue, state, count, and the oldest of that
    state's COALESCE(run_at, created_at)) and the queues table's rows (name: paused; name: concurrency), and the
    held jobs' count per queue: every queue either names, or with ``names``, those alone (a queue nobody has
    used yet is an empty one)."""
    limits, held = limits or {}, held or {}
    by: dict[str, dict[str, Any]] = {}
    for queue, state, n, oldest in counts:
        q = by.setdefault(queue, {})
        q[state] = n
        if state == _QUEUED:
            q["oldest"] = oldest
    known = set(names) if names is not None else set(by) | set(paused) | set(limits)
    out = []
    for name in sorted(known):
        q = by.get(name, {})
        out.append(QueueInfo(name, q.get(_QUEUED, 0), q.get(_RUNNING, 0), q.get(_SCHEDULED, 0), q.get(_RETRYING, 0),
                             paused.get(name, False), q.get("oldest"), limits.get(name), held.get(name, 0)))
    return out


def queue_depths(counts: Iterable[tuple[str, str, int]], settings: Iterable[tuple[str, bool, int | None]]
                 ) -> tuple[dict[JobState, int], list[QueueInfo]]:
    """``Store.queue_depths`` from the counts by (queue, state) of every job and the queues table's rows."""
    by_state: dict[JobState, int] = {}
    unfinished: list[tuple[str, str, int, float | None]] = []
    for queue, state, n in counts:
        st = JobState(state)
        by_state[st] = by_state.get(st, 0) + n
        if not st.terminal:
            unfinished.append((queue, state, n, None))
    rows = list(settings)
    return by_state, queue_infos(unfinished, {name: paused for name, paused, _ in rows}, None,
                                 {name: limit for name, _, limit in rows})


_QUEUED, _RUNNING, _SCHEDULED, _RETRYING = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.SCHEDULED.value,
                                            JobState.RETRYING.value)


def key_reused(key: str | None, job_id: int) -> str:
    """The message of a submit whose idempotency key a kept job of another spec has."""
    return (f"idempotency key {key!r} is job {job_id}'s, which was submitted with another spec: a retried submit "
            "sends the same spec, a new job needs a new key")


SCHEDULE_COLUMNS = ("s.name, s.definition, s.paused, s.created_at, s.updated_at, s.last_tick, s.next_at, s.last_job,"
                    " s.fired, s.skipped, s.missed, s.last_missed_at, j.state")
SCHEDULE_FROM = "schedules s LEFT JOIN jobs j ON j.id = s.last_job"


def schedule_info(r: Sequence[Any]) -> ScheduleInfo:
    """A row of SCHEDULE_COLUMNS as a ScheduleInfo (its definition as stored: checked when it was put)."""
    d = json.loads(r[1])
    s = Schedule(r[0], d["cron"], d["tz"], Overlap(d["overlap"]), float(d["catchup"]), d["job"], bool(r[2]))
    return ScheduleInfo(s, r[3], r[4], r[5], r[6], r[7], JobState(r[12]) if r[12] else None, r[8], r[9], r[10], r[11])


def schedule_json_text(s: Schedule) -> str:
    return json.dumps(s.to_json(), separators=(",", ":"))


@dataclass
class Links:
    """The dependencies of a submit's jobs (core.dag.resolve: by job id, or by batch index for a ref), which a
    backend writes beside them (its ``link``); ``targets``: the batch indexes some job of the batch depends on."""

    specs: Sequence[JobSpec]
    deps: list[list[tuple[int | None, int | None, On]]]
    targets: set[int]

    @classmethod
    def of(cls, specs: Sequence[JobSpec]) -> Any:
        """None for a submit without dependencies or refs (not a workflow)."""
        if not any(s.depends_on or s.ref is not None for s in specs):
            return None
        deps = dag.resolve([s.ref for s in specs], [s.depends_on for s in specs])
        return cls(specs, deps, {k for row in deps for _, k, _ in row if k is not None})


def dep_info(r: Sequence[Any]) -> DepInfo:
    """A row of (dependency id, cond, met, ref, its state or NULL) as a DepInfo."""
    return DepInfo(r[0], r[1], bool(r[2]), r[3], JobState(r[4]) if r[4] else None)


def workflow_nodes(jobs: Iterable[tuple[Job, str]], edges: Iterable[Sequence[Any]]) -> list[WorkflowNode]:
    """A workflow's nodes from its jobs (each with its stored spec's JSON text) and its edges (rows of the
    dependent's id, then a ``dep_info`` row), both in id order."""
    by: dict[int, list[DepInfo]] = {}
    for r in edges:
        by.setdefault(r[0], []).append(dep_info(r[1:]))
    return [WorkflowNode(job, json.loads(spec).get("ref"), by.get(job.id, [])) for job, spec in jobs]


TOKEN_ROLES = ("client", "join")  # the roles of put_tokens (orch.auth.ROLES)
_DIGEST = re.compile(r"[0-9a-f]{64}")


def checked_digests(digests: dict[str, str]) -> list[tuple[str, str]]:
    """``put_tokens``' digests as (role, digest) pairs, checked: known roles, SHA-256 hex (so a token itself is
    never stored by mistake)."""
    for role, value in digests.items():
        if role not in TOKEN_ROLES:
            raise ValidationError(f"no token role {role!r} (roles: {', '.join(TOKEN_ROLES)})", field="role")
        if not isinstance(value, str) or not _DIGEST.fullmatch(value):
            raise ValidationError(f"the {role} token's digest must be 64 lowercase hex digits (a SHA-256), "
                                  "never the token", field=role)
    return sorted(digests.items())


class Store(Protocol):
    """What the scheduler needs of its storage. ``defaults`` is the scheduler's retry policy (a job's own
    spec fields win over it); ``lease_ttl`` and ``worker_ttl`` are seconds on ``lease_clock``."""

    on_commit: Callable[[list[Change]], None] | None  # set by the scheduler: wakes waiters, counts metrics
    output_limit: int  # bytes of output kept per attempt and stream (the tail)
    batches: int  # write transactions committed (group commits), for metrics
    ops: int  # write operations committed, for metrics
    shared: bool  # other schedulers may use the same database at once (then one of them leads: ``lead``)
    on_remote: Callable[[Hint], None] | None  # set by the scheduler: what another scheduler committed

    def clock(self) -> float:
        """The wall clock (Unix seconds): what people read."""
        ...

    def lease_clock(self) -> float:
        """The clock of leases and heartbeats: monotonic, anchored to the wall clock when the store opened."""
        ...

    # ---- lifecycle
    async def open(self) -> None:
        """Connect and bring the schema to the newest version; a damaged or unusable database raises
        a StorageError naming it."""
        ...

    async def close(self) -> None: ...

    async def synced(self) -> None:
        """Return once everything committed so far is durable at the configured level."""
        ...

    async def recover(self, grace: float, worker_ttl: float) -> None:
        """After a start or a stall, give every live lease and worker ``grace`` seconds."""
        ...

    # ---- jobs: clients
    async def submit(self, specs: Sequence[JobSpec], defaults: RetryPolicy,
                     stored: Sequence[tuple[dict[str, Any], str]] | None = None) -> list[Job]:
        """Queue jobs, all or none, with ids increasing in the order given. A job whose spec has a run_at or
        a delay is due at ``spec.due(clock())``, the store's clock at this submit: while that is ahead it starts
        ``scheduled`` (``decisions.submitted``) with its due time in ``Job.run_at``, and ``sweep`` queues it.
        ``stored``: each spec's stored form and its JSON text, when the caller made them
        (``core.spec.stored_spec``).

        A spec with an ``idempotency_key`` that a kept job has already is that job (``Job.replayed``), not a new
        one, when its stored spec is the same; else the whole submit is refused with IdempotencyKeyReused. A unique
        index decides it, so submits at once through any scheduler of the database agree on one job.

        A spec with ``depends_on`` starts ``blocked`` (core.dag): its dependencies (job ids, or refs of jobs of the
        same submit, resolved by ``dag.resolve``) are kept, and every move of a job that ends (or, replayed, ends
        no longer) decides its dependents in the same transaction: a met one is counted, and the job is queued
        (or scheduled) at its last; one that can never be met skips it, and so on down the graph; a replay of a
        dependency un-skips what it skipped. A dependency on no job is a ValidationError naming
        ``jobs[i].depends_on[j]``, and nothing is submitted. A submit with refs or dependencies is a workflow:
        its jobs have the id of its first one (or of the workflow a job it depends on is part of)."""
        ...

    async def get_job(self, job_id: int, *, with_output: bool = True) -> JobRecord:
        """A job in full (NotFound if there is none); ``with_output``: the kept output of its last attempt."""
        ...

    async def job_state(self, job_id: int) -> tuple[JobState, int]:
        """A job's state and attempt, cheaply (NotFound if there is none)."""
        ...

    async def list_jobs(self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50,
                        cursor: int | None = None, name: str | None = None, label: tuple[str, str] | None = None,
                        text: str | None = None, floor: int | None = None) -> tuple[list[Job], int | None]:
        """Newest first, filtered; the cursor of the next page (the id below which it starts) or None.

        ``name``: the job's name exactly; ``label``: (key, value) among its labels; ``text``: in its name or its
        command as listed, any case. Filters combine (and). ``floor``: only ids above it (a bounded scan: the
        next page's cursor is then None when the page ends above it)."""
        ...

    async def count_jobs(self, *, state: JobState | None = None, queue: str | None = None, name: str | None = None,
                         label: tuple[str, str] | None = None, text: str | None = None) -> int:
        """How many jobs the filters of ``list_jobs`` match."""
        ...

    async def ended_per_minute(self, since: float) -> list[tuple[int, JobState, int]]:
        """Jobs that ended (succeeded, failed, cancelled) since ``since`` (wall clock): (minute from ``since``,
        state, how many), by minute."""
        ...

    async def ended_among(self, job_ids: Sequence[int]) -> tuple[list[Job], list[int]]:
        """Of ``job_ids``: the jobs that have ended, and the ids no job has."""
        ...

    async def count_by_state(self) -> dict[JobState, int]: ...
    async def queued_in(self, queues: Sequence[str]) -> list[str]:
        """Those of ``queues`` that have a queued job (the poll that backs up other schedulers' hints)."""
        ...


    async def events(self, job_id: int, after: int = 0) -> list[Event]:
        """A job's state changes after event ``after``, oldest first."""
        ...

    async def output_after(self, job_id: int, after: int = 0) -> list[OutputPiece]:
        """A job's stored output chunks (every attempt) after chunk ``after``, in the order stored."""
        ...

    async def cancel(self, job_id: int) -> tuple[JobRecord, list[Change]]:
        """End a job that is not running (scheduled, queued, retrying) as cancelled; ask a running one's worker
        to stop it. NotFound, or Conflict if it has ended."""
        ...

    async def replay(self, job_ids: Sequence[int], by: str) -> tuple[dict[int, OrchError], list[Change]]:
        """Give each failed or cancelled job of ``job_ids`` a fresh set of attempts (``decisions.replay``): queued
        again, its attempt numbers going on from its last (they fence), its max_attempts its spec's counted from
        there, its queue wait counted from now (run_at), every earlier attempt and event kept, and an event naming
        ``by``. Returns why each id that was not replayed was not (NotFound, or a Conflict naming its state); every
        other id was. All in one transaction."""
        ...

    # ---- retention
    async def purge(self, before: float, states: Sequence[JobState], limit: int) -> tuple[int, float]:
        """Delete up to ``limit`` jobs that ended (in ``states``: ended ones only) before ``before`` (wall clock),
        oldest first, with their attempts, output and events; their idempotency keys are free again. Returns
        how many, and the seconds the write took (the caller sizes its next batch by it)."""
        ...

    # ---- queues
    async def pause_queue(self, queue: str, paused: bool) -> bool:
        """Pause a queue (no claim hands out its jobs from the commit on; running ones go on) or resume it.
        Returns whether that changed anything (pausing a paused queue does not)."""
        ...

    async def set_queue_concurrency(self, queue: str, limit: int | None) -> bool:
        """At most ``limit`` of the queue's jobs run at once (None: no limit), from the commit on: a claim hands
        out no more than the queue has room for; jobs running over a lowered limit go on. Returns whether that
        changed anything."""
        ...

    async def queue_stats(self, names: Sequence[str] | None = None) -> list[QueueInfo]:
        """Every queue that has an unfinished job or a setting (or those ``names``, known or not), by name."""
        ...

    async def queue_depths(self) -> tuple[dict[JobState, int], list[QueueInfo]]:
        """Cheaper than queue_stats (the dashboard's overview and queues page, on a big store): every job counted
        by state, and the queues of queue_stats with their counts and settings but no oldest job (None) and no
        held count (0). One scan of an index of (queue, state), never of the jobs' rows."""
        ...

    # ---- rate limits
    async def set_limit(self, name: str, rate: Rate) -> bool:
        """Make the rate limit ``name``, or change its rate (its bucket goes on as it is). True if it was made."""
        ...

    async def delete_limit(self, name: str) -> bool:
        """Delete a rate limit (jobs it put off keep their times; new submits naming it are refused). False if
        there was none."""
        ...

    async def limits(self) -> list[LimitInfo]:
        """Every rate limit, by name."""
        ...

    # ---- observability
    async def metrics_snapshot(self) -> Snapshot: ...
    async def why_facts(self, job_id: int) -> JobFacts: ...
    async def workflow(self, job_id: int) -> tuple[int, list[WorkflowNode]]:
        """The workflow job ``job_id`` is part of: its id (its first job's) and every job of it, by id, with its
        dependencies; a job submitted alone is a workflow of one. NotFound if there is no such job."""
        ...
    async def queues(self) -> list[str]:
        """Every queue name known: its jobs' and those workers registered for."""
        ...

    # ---- workers
    async def register_worker(self, *, name: str, hostname: str, queues: Sequence[str], concurrency: int,
                              credential_hash: str | None = None, metrics: str | None = None,
                              runners: Sequence[str] = ("exec",)) -> str:
        """A new live worker with the runners it has (it is handed only jobs of those); returns its id."""
        ...

    async def worker_credentials(self) -> list[Credential]: ...
    async def worker_credential(self, worker_id: str) -> Credential | None:
        """One worker's credential (a worker another scheduler of a shared database registered), or None."""
        ...

    async def list_workers(self, retention: float | None = None) -> list[Worker]:
        """In the order they registered; with ``retention``, without the stopped and lost ones silent longer."""
        ...

    async def drain_worker(self, worker_id: str) -> bool:
        """Ask a live worker to drain: from the commit on it is handed no job, and its next heartbeat tells it to
        finish what it runs and stop. True if it was alive (False: draining already); NotFound if it is not live."""
        ...

    async def metrics_targets(self) -> list[MetricsTarget]: ...
    async def deregister(self, worker_id: str) -> None: ...

    async def heartbeat(self, worker_id: str, running: Sequence[tuple[int, int]], lease_ttl: float,
                        draining: bool = False) -> HeartbeatReply:
        """The worker is alive (UnknownWorker if it was marked lost or stopped): extend the leases of the
        attempts it runs, and say which to cancel and which are no longer its own."""
        ...

    async def claim(self, worker_id: str, queues: Sequence[str], limit: int,
                    lease_ttl: float) -> tuple[list[Lease], list[Change]]:
        """Up to ``limit`` queued jobs of ``queues`` for the worker, in dispatch order, each handed out once;
        none for a draining worker."""
        ...

    async def append_output(self, worker_id: str, chunks: Sequence[OutputChunk]) -> list[bool]:
        """Store output of current attempts; for each chunk, whether it was taken (False: stale)."""
        ...

    async def complete(self, worker_id: str, results: Sequence[AttemptResult],
                       defaults: RetryPolicy) -> tuple[list[Verdict], list[Change]]:
        """Record how attempts ended and move their jobs on (decisions.attempt_ended)."""
        ...

    async def complete_and_claim(
        self, worker_id: str, results: Sequence[AttemptResult], defaults: RetryPolicy,
        queues: Sequence[str], limit: int, lease_ttl: float,
    ) -> tuple[list[Verdict], list[Lease]]:
        """``complete`` then ``claim``. A store may commit the two apart: the results stay ended when the
        claim then fails (the worker asks for work again; it never needs to report them twice)."""
        ...

    async def hand_back(self, worker_id: str, attempts: Sequence[tuple[int, int]], stop: bool) -> list[Change]:
        """A stopping worker gives attempts back: queued again at once, not counted; ``stop``: it is gone."""
        ...

    # ---- the client and join tokens (shared by every scheduler of a shared database)
    async def cluster_tokens(self) -> dict[str, str]:
        """The tokens in effect: role (``client``, ``join``) -> SHA-256 hex digest (``auth.digest``); the roles
        nobody has put are missing. Only digests are kept, never a token."""
        ...

    async def put_tokens(self, digests: dict[str, str], *, replace: bool) -> dict[str, str]:
        """Put each role's digest, atomically; returns the digests in effect afterwards (as ``cluster_tokens``).
        ``replace=False`` puts only the roles that have none yet, so schedulers that start at once agree on one
        set: the first to commit; ``replace=True`` (a rotation) overwrites the given roles. A role other than
        ``client`` or ``join``, or a value that is not a digest, is a ValidationError and nothing is put."""
        ...

    # ---- cron schedules (orch/core/cron.py)
    async def save_schedule(self, s: Schedule, *, create: bool, last_tick: float | None,
                            next_at: float | None) -> None:
        """Make schedule ``s`` (``create``: Conflict if one has its name; its ticks are counted from
        ``last_tick``) or change it (NotFound if there is none; ``last_tick`` None keeps where its ticks stand),
        its next tick at ``next_at`` (None: never)."""
        ...

    async def delete_schedule(self, name: str) -> bool:
        """Delete a schedule (the jobs it submitted stay). False if there was none."""
        ...

    async def schedules(self, name: str | None = None) -> list[ScheduleInfo]:
        """Every schedule by name (or the one named: NotFound if there is none)."""
        ...

    async def due_schedules(self, now: float, limit: int) -> list[ScheduleInfo]:
        """Up to ``limit`` schedules not paused whose next tick is due by ``now``, soonest first."""
        ...

    async def next_schedule_at(self) -> float | None:
        """When the soonest next tick of a schedule not paused falls (None: none)."""
        ...

    async def schedule_ticked(self, name: str, frm: float, last_tick: float, next_at: float | None,
                              last_job: int | None, fired: int, skipped: int, missed: int,
                              missed_at: float | None) -> bool:
        """Record what the ticks of ``name`` after ``frm`` up to ``last_tick`` did (counts added; ``last_job``
        None keeps the last one) and when the next falls; only if its ticks still stand at ``frm`` (another
        scheduler did not decide them first). Returns whether it did."""
        ...

    # ---- the reaper
    async def lead(self, holder: str, ttl: float) -> Leadership:
        """Take or keep the reaper's role for ``ttl`` seconds; one holder at a time across every scheduler of
        the database. A store only one scheduler uses always grants it."""
        ...

    async def resign(self, holder: str) -> None:
        """Give the role up (a scheduler that stops), so another takes it at once."""
        ...

    async def sweep(self, worker_ttl: float, defaults: RetryPolicy) -> Sweep:
        """Mark silent workers lost, end their attempts and expired leases as lost, queue due retries
        (``decisions.BACKOFF_OVER``) and scheduled jobs whose time came (``decisions.DUE``), each kind in one
        bulk move with its event rows; ``Sweep.next_due``: the earliest due time of the retrying and scheduled
        jobs left, on ``clock()``."""
        ...


def like_pattern(text: str) -> str:
    """A LIKE pattern that finds ``text`` anywhere, its own % _ and \\ taken literally (ESCAPE '\\')."""
    return "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
