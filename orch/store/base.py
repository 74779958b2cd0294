"""The Store contract: the operations the scheduler needs, named for what they mean.

Every implementation keeps these promises:

* a call that returns has committed (durably, at the configured level);
* every job state change goes through ``models.check_transition`` and writes an
  event row in the same transaction;
* a claim hands each job to exactly one worker;
* anything naming an attempt (heartbeat, output, completion) is refused
  unless that attempt is the job's current running one, held by that worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from orch.models import JobSpec, Outcome, RetryPolicy


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


@dataclass
class Change:
    """A job state change committed by a store call; the scheduler wakes waiters from these."""

    job_id: int
    state: str
    queue: str
    attempt: int
    # For metrics and the state-change log line; filled where the store has them at hand.
    worker: str | None = None  # the worker that claimed, ended or handed back the attempt
    outcome: str | None = None  # how the attempt ended (models.Outcome), when this change ends one
    duration: float | None = None  # seconds the attempt ran, when this change ends one
    queue_wait: float | None = None  # seconds from submit to the first start (attempt 1 claims)


@dataclass
class HeartbeatReply:
    cancel: list[dict[str, int]] = field(default_factory=list)
    stale: list[dict[str, int]] = field(default_factory=list)


@dataclass
class Sweep:
    """What one reaper pass did."""

    changes: list[Change] = field(default_factory=list)
    lost_workers: list[str] = field(default_factory=list)
    next_due: float | None = None


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def submit(self, specs: Sequence[JobSpec], defaults: RetryPolicy) -> list[dict[str, Any]]: ...
    async def get_job(self, job_id: int) -> dict[str, Any]: ...
    async def list_jobs(
        self, *, state: str | None, queue: str | None, limit: int, cursor: int | None
    ) -> tuple[list[dict[str, Any]], int | None]: ...
    async def events(self, job_id: int, after: int = 0) -> list[dict[str, Any]]: ...
    async def output_after(self, job_id: int, after: int) -> list[dict[str, Any]]: ...
    async def cancel(self, job_id: int, reason: str) -> tuple[dict[str, Any], list[Change]]: ...

    async def register_worker(
        self, *, name: str, hostname: str, queues: Sequence[str], concurrency: int,
        credential_hash: str | None = None, metrics: str | None = None,
    ) -> str: ...
    async def worker_credentials(self) -> list[tuple[str, str, str, list[str]]]: ...
    async def heartbeat(self, worker_id: str, running: Sequence[tuple[int, int]], lease_ttl: float) -> HeartbeatReply: ...
    async def claim(self, worker_id: str, queues: Sequence[str], limit: int, lease_ttl: float) -> tuple[list[dict[str, Any]], list[Change]]: ...
    async def append_output(self, worker_id: str, chunks: Sequence[OutputChunk]) -> list[bool]: ...
    async def complete(self, worker_id: str, results: Sequence[AttemptResult]) -> tuple[list[dict[str, Any]], list[Change]]: ...
    async def hand_back(self, worker_id: str, attempts: Sequence[tuple[int, int]], stop: bool) -> list[Change]: ...
    async def sweep(self, worker_ttl: float) -> Sweep: ...
    async def recover(self, grace: float) -> None: ...
    async def list_workers(self, retention: float | None = None) -> list[dict[str, Any]]: ...
    async def metrics_targets(self) -> list[dict[str, Any]]: ...
