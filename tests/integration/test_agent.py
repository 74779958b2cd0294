"""Integration tests of the worker agent against an in-process scheduler on loopback: reports, claims, drain."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

import orch.config
from helpers import storage_overrides, until
from orch.client import Client
from orch.compose import build_app
from orch.config import load_settings
from orch.scheduler.app import STORE
from orch.store.base import Store
from orch.worker.agent import Agent, WorkerOptions

CLIENT_TOKEN = "test-client-token"
JOIN_TOKEN = "test-join-token"


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def serve(tmp_path: Path, body: Callable[[str, Store, Client], Awaitable[None]], **overrides: Any) -> None:
    """A scheduler app on a free loopback port; ``body(url, store, client)``."""
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT_TOKEN,
                                    "auth.join_token": JOIN_TOKEN, **overrides}, environ={})

    async def main() -> None:
        app = build_app(settings)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            url = str(server.make_url("")).rstrip("/")
            async with Client(url, token=CLIENT_TOKEN) as client:
                await asyncio.wait_for(body(url, app[STORE], client), 60)
        finally:
            await server.close()

    asyncio.run(main())


def agent(url: str, concurrency: int) -> Agent:
    return Agent(Client(url, token=JOIN_TOKEN), WorkerOptions(concurrency=concurrency, name="t", hostname="h"))


async def states(store: Store) -> dict[str, int]:
    return await store.count_by_state()


def test_a_busy_worker_reports_in_batches_and_claims_as_it_reports(tmp_path: Path) -> None:
    calls: dict[str, int] = {"reports": 0, "with_claim": 0, "claimed_by_reports": 0}

    async def body(url: str, store: Store, client: Client) -> None:
        real = store.complete_and_claim

        async def counted(*a: Any, **kw: Any) -> Any:
            answers, jobs = await real(*a, **kw)
            calls["with_claim"] += 1
            calls["claimed_by_reports"] += len(jobs)
            return answers, jobs

        store.complete_and_claim = counted  # type: ignore[method-assign]
        real_complete = store.complete

        async def complete(*a: Any, **kw: Any) -> Any:
            calls["reports"] += 1
            return await real_complete(*a, **kw)

        store.complete = complete  # type: ignore[method-assign]
        jobs = await client.submit_many([{"command": ["true"]}] * 120)
        worker = agent(url, 4)
        running = asyncio.ensure_future(worker.run())
        await until(lambda: _all(store, "succeeded", 120), 40, "every job to succeed")
        worker.stop()
        await asyncio.wait_for(running, 20)
        reports = calls["reports"] + calls["with_claim"]
        # Several results per report, and most of the work came with the reports, not by lease requests.
        assert reports < len(jobs) / 2, calls
        assert calls["claimed_by_reports"] > len(jobs) / 2, calls
        done = await client.job(jobs[-1]["id"])
        assert done["state"] == "succeeded" and done["attempt"] == 1

    serve(tmp_path, body)


def test_draining_while_reports_claim_leaves_nothing_leased_to_the_stopped_worker(tmp_path: Path) -> None:
    async def body(url: str, store: Store, client: Client) -> None:
        jobs = await client.submit_many([{"command": ["true"]}] * 300)
        worker = agent(url, 4)
        running = asyncio.ensure_future(worker.run())
        await until(lambda: _at_least(store, "succeeded", 40), 40, "some jobs to succeed")
        worker.stop()  # reports (and the claims they carry) are on their way now and then
        await asyncio.wait_for(running, 30)
        counts = await states(store)
        assert set(counts) <= {"succeeded", "queued"}, counts  # none left running (leased) or lost
        assert sum(counts.values()) == len(jobs)
        (w,) = await client.workers()
        assert w["state"] == "stopped" and w["running"] == 0
        for j in jobs[:: 25]:
            job = await client.job(j["id"])
            assert all(a["state"] in ("succeeded", "handed_back") for a in job["attempts"]), job["attempts"]

    serve(tmp_path, body)


def test_a_drain_during_a_report_that_claims_hands_everything_back(tmp_path: Path) -> None:
    """The worker begins to drain while a report carrying a claim is held up in the scheduler; the claim
    goes through only after that. Whatever it hands out must come back, not run on past the worker's stop."""

    async def body(url: str, store: Store, client: Client) -> None:
        gate, inside, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
        real, real_hand_back = store.complete_and_claim, store.hand_back
        worker = agent(url, 2)

        async def held(*a: Any, **kw: Any) -> Any:
            if inside.is_set():
                return await real(*a, **kw)
            inside.set()
            await gate.wait()
            try:
                return await real(*a, **kw)
            finally:
                answered.set()

        async def hand_back(worker_id: str, attempts: Any, stop: bool) -> Any:
            if stop:  # the drain's goodbye waits until the worker has had the held report's answer
                await answered.wait()
                await until(lambda: not worker._reporting, 10, "the worker to take the answer")
            return await real_hand_back(worker_id, attempts, stop)

        store.complete_and_claim = held  # type: ignore[method-assign]
        store.hand_back = hand_back  # type: ignore[method-assign]
        jobs = await client.submit_many([{"command": ["sleep", "0.3"]}] * 12)
        running = asyncio.ensure_future(worker.run())
        await asyncio.wait_for(inside.wait(), 20)  # a report asking for more work is on its way
        worker.stop()
        await until(lambda: not worker.runs, 20, "the running jobs to end")
        gate.set()  # the report's claim goes through now, for a worker that is stopping
        await asyncio.wait_for(running, 30)
        counts = await states(store)
        assert set(counts) <= {"succeeded", "queued"}, counts  # none left leased to the stopped worker
        assert counts.get("succeeded", 0) >= 1 and sum(counts.values()) == len(jobs)
        (w,) = await client.workers()
        assert w["state"] == "stopped" and w["running"] == 0

    serve(tmp_path, body)


async def _all(store: Store, state: str, n: int) -> bool:
    return (await states(store)).get(state, 0) == n


async def _at_least(store: Store, state: str, n: int) -> bool:
    return (await states(store)).get(state, 0) >= n


def test_heartbeats_fit_a_small_body_limit_and_keep_every_lease(tmp_path: Path) -> None:
    """40 attempts held, a 1 KiB body limit: one heartbeat would be ~1.7 KB, so it goes in parts, and every
    lease lives through jobs that outlast several lease TTLs."""

    async def body(url: str, store: Store, client: Client) -> None:
        jobs = []
        for _ in range(4):  # the body limit holds about 30 such specs
            jobs += await client.submit_many([{"command": ["sleep", "2.5"]}] * 10)
        beats = 0
        real = store.heartbeat

        async def counted(*a: Any, **kw: Any) -> Any:
            nonlocal beats
            beats += 1
            return await real(*a, **kw)

        store.heartbeat = counted  # type: ignore[method-assign]
        worker = agent(url, 40)
        running = asyncio.ensure_future(worker.run())
        await until(lambda: _all(store, "succeeded", 40), 40, "every job to succeed")
        worker.stop()
        await asyncio.wait_for(running, 20)
        for j in jobs:
            done = await client.job(j["id"])
            assert done["state"] == "succeeded" and done["attempt"] == 1, done["attempts"]
        assert beats >= 4  # in parts: more requests than heartbeat intervals

    serve(tmp_path, body, **{"scheduler.max_body_bytes": 1024, "scheduler.heartbeat_interval": 0.3,
                             "scheduler.lease_ttl": 1.0, "scheduler.max_long_polls": 4})
