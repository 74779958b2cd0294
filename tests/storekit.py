"""Shared pieces of the store tests: a fake clock, spec and worker helpers, and opening a store of a backend."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

from orch.core.records import Lease, Verdict
from orch.core.retry import RetryPolicy
from orch.core.spec import JobSpec, parse_spec, view_defaults
from orch.core.states import Outcome
from orch.scheduler import wire
from orch.store.base import AttemptResult, OutputChunk, Store

T0 = 1_700_000_000.0
TTL = 10.0  # lease ttl handed to claim/heartbeat
# No jitter and a fixed rand: every backoff is exactly base * factor ** (attempt - 1).
POLICY = RetryPolicy(max_attempts=3, base=2.0, factor=3.0, cap=100.0, jitter=0.0)

BACKENDS = ("sqlite", "postgres")


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make_store(backend: str, tmp_path: Path, clock: Callable[[], float], **store_kw: Any) -> Store:
    """A store of ``backend`` (not opened) on its own database under ``tmp_path``, on ``clock`` (wall and
    monotonic alike) with a fixed rand."""
    if backend == "sqlite":
        from orch.store.sqlite import SqliteStore

        store_kw.pop("dsn", None)
        return SqliteStore(tmp_path / "orch.db", clock=clock, monotonic=clock, rand=lambda: 0.5, **store_kw)
    if backend == "postgres":
        from orch.store.postgres import PostgresStore

        return PostgresStore(store_kw.pop("dsn"), clock=clock, monotonic=clock, rand=lambda: 0.5, **store_kw)
    raise ValueError(f"no backend {backend!r}")


Body = Callable[[Any, FakeClock], Awaitable[None]]
Run = Callable[..., None]  # the contract suite's fixture: run(tmp_path, body, **store_kw)


def run_on(backend: str, tmp_path: Path, body: Body, **store_kw: Any) -> None:
    """Open a store of ``backend`` with a fake clock, run ``body``, always close."""
    clock = FakeClock()

    async def main() -> None:
        store = make_store(backend, tmp_path, clock, **store_kw)
        await store.open()
        try:
            await body(store, clock)
        finally:
            await store.close()

    asyncio.run(main())


def spec(**kw: Any) -> JobSpec:
    body: dict[str, Any] = {"command": ["true"]}
    body.update(kw)
    return parse_spec(body)


async def worker(store: Store, name: str = "w", queues: tuple[str, ...] = ("default",)) -> str:
    return await store.register_worker(name=name, hostname="test-host", queues=list(queues), concurrency=4)


async def submit_one(store: Store, **kw: Any) -> int:
    jobs = await store.submit([spec(**kw)], POLICY)
    return jobs[0].id


async def claim_one(store: Store, wid: str, queues: tuple[str, ...] = ("default",)) -> Lease:
    jobs, _ = await store.claim(wid, list(queues), 1, TTL)
    assert len(jobs) == 1, jobs
    return jobs[0]


async def finish(store: Store, wid: str, job_id: int, attempt: int, outcome: Outcome,
                 exit_code: int | None = None, output: tuple[OutputChunk, ...] = ()) -> Verdict:
    answers, _ = await store.complete(
        wid, [AttemptResult(job_id, attempt, outcome, exit_code=exit_code, duration=0.1, output=output)], POLICY
    )
    return answers[0]


_VIEW = view_defaults(POLICY)


async def shown(store: Store, job_id: int) -> dict[str, Any]:
    """The job as the API shows it (orch/scheduler/wire.py), output included."""
    return wire.job_json(await store.get_job(job_id), _VIEW, store.output_limit)


def store_of(settings: Any, **kw: Any) -> Store:
    """The store ``settings`` name (as orch.compose builds it) with the test's clocks or rand in ``kw``."""
    if settings["storage.backend"] == "postgres":
        from orch.store.postgres import PostgresStore

        kw.pop("synchronous", None)
        return PostgresStore(settings["storage.dsn"], output_limit=settings["scheduler.output_limit_bytes"], **kw)
    from orch.store.sqlite import SqliteStore

    return SqliteStore(settings.db_path, output_limit=settings["scheduler.output_limit_bytes"], **kw)
