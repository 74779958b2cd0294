"""A step of the scheduler's wall clock (NTP, a VM resumed) never marks live workers lost nor expires a lease.

Liveness (lease expiry, workers' silence, the heartbeat ages people see) is measured on a monotonic clock;
what people read as times (created_at, events, started_at) stays on the wall clock. Both clocks are
injected here, so the wall clock can jump while monotonic time moves on its own.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from storekit import store_of

import orch.config
from helpers import storage_overrides, until
from orch.compose import build_app
from orch.config import load_settings
from orch.core.retry import RetryPolicy
from orch.core.spec import parse_spec
from orch.core.times import iso
from orch.scheduler import wire

T0 = 1_700_000_000.0
TTL = 10.0
POLICY = RetryPolicy(max_attempts=3, base=2.0, factor=3.0, cap=100.0, jitter=0.0)
JUMPS = (60.0, -60.0, -60.0, 60.0)  # the wall clock steps ahead, back, back again, and ahead


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def passed(wall: Clock, mono: Clock, seconds: float, jump: float = 0.0) -> None:
    """``seconds`` of real time pass; the wall clock also steps by ``jump``."""
    mono.advance(seconds)
    wall.advance(seconds + jump)


# --------------------------------------------------------------------------- the store


def where(tmp_path: Path) -> Any:
    """Settings naming the running test's backend (SQLite: a file under tmp_path)."""
    return load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path)}, environ={})


def test_wall_clock_steps_neither_expire_leases_nor_lose_heartbeating_workers(tmp_path: Path) -> None:
    wall, mono = Clock(T0), Clock(500.0)  # a monotonic clock counts from boot: nothing like the wall's

    async def main() -> None:
        store = store_of(where(tmp_path), clock=wall, monotonic=mono, rand=lambda: 0.5)
        await store.open()
        try:
            assert store.lease_clock() == wall()  # anchored: stored deadlines read as times
            a = await store.register_worker(name="a", hostname="h", queues=["default"], concurrency=1)
            b = await store.register_worker(name="b", hostname="h", queues=["default"], concurrency=1)
            ja, jb = (j.id for j in await store.submit([parse_spec({"command": ["true"]})] * 2, POLICY))
            (got_a,), _ = await store.claim(a, ["default"], 1, TTL)
            (got_b,), _ = await store.claim(b, ["default"], 1, TTL)
            assert (got_a.job_id, got_b.job_id) == (ja, jb)

            for jump in JUMPS:
                passed(wall, mono, 2.0, jump)
                # Before the heartbeats: the step alone must expire nothing.
                sweep = await store.sweep(TTL, POLICY)
                assert sweep.lost_workers == [] and sweep.changes == [], (jump, sweep)
                ages = {w.id: w for w in await store.list_workers()}
                for w in ages.values():
                    assert w.heartbeat_age == pytest.approx(2.0), (jump, w)
                    # shown on the wall clock of now
                    assert wire.worker_json(w, store.clock())["last_heartbeat"] == iso(wall() - 2.0)
                snapshot = await store.metrics_snapshot()
                assert [w.heartbeat_age for w in snapshot.live_workers] == [pytest.approx(2.0)] * 2
                facts = await store.why_facts(ja)
                assert facts.lease_expires_at is not None and facts.worker is not None
                assert facts.lease_expires_at - facts.now == pytest.approx(TTL - 2.0)
                assert facts.worker.heartbeat_age == pytest.approx(2.0)
                for wid, jid in ((a, ja), (b, jb)):
                    reply = await store.heartbeat(wid, [(jid, 1)], TTL)
                    assert reply.stale == [] and reply.cancel == []
                assert (await store.sweep(TTL, POLICY)).changes == []

            # What people read stays on the wall clock, wherever it has stepped to.
            (late,) = await store.submit([parse_spec({"command": ["true"]})], POLICY)
            assert late.created_at == wall()

            # b stops heartbeating; the wall clock steps back a minute. b is lost after TTL of
            # monotonic time, neither sooner nor an extra minute later; a, heartbeating, is not.
            wall.advance(-60.0)
            for _ in range(5):
                passed(wall, mono, 2.0)
                await store.heartbeat(a, [(ja, 1)], TTL)
                sweep = await store.sweep(TTL, POLICY)
                assert sweep.lost_workers == [] and sweep.changes == [], sweep  # up to TTL: not yet
            passed(wall, mono, 0.5)
            sweep = await store.sweep(TTL, POLICY)
            assert sweep.lost_workers == [b]
            assert [(c.job_id, c.state) for c in sweep.changes] == [(jb, "retrying")]
            job_b = await store.get_job(jb)
            assert job_b.attempts[0].state == "lost"
            assert job_b.attempts[0].finished_at == wall()  # stamped on the wall clock
            assert job_b.job.run_at == wall() + 2.0  # backoff runs on the wall clock
            assert (await store.get_job(ja)).job.state == "running"
            assert {w.id: w.state for w in await store.list_workers()} == {a: "alive", b: "lost"}
        finally:
            await store.close()

    asyncio.run(main())


def test_a_restart_rebases_deadlines_an_earlier_process_left_ahead(tmp_path: Path) -> None:
    """The first scheduler ran with its wall clock an hour fast, so the deadlines it stored (on its own
    clock, anchored to that wall clock) are an hour ahead; then the machine rebooted, NTP set the clock
    right, and the monotonic clock started again near 0. A worker that died with the first scheduler
    must still be found lost within recovery_grace, not an hour later; one that heartbeats keeps its job."""
    ids: dict[str, Any] = {}

    async def first() -> None:
        wall, mono = Clock(T0 + 3600.0), Clock(90_000.0)
        store = store_of(where(tmp_path), clock=wall, monotonic=mono, rand=lambda: 0.5)
        await store.open()
        try:
            for name in ("dead", "alive"):
                wid = await store.register_worker(name=name, hostname="h", queues=["default"], concurrency=1)
                (jid,) = [j.id for j in await store.submit([parse_spec({"command": ["true"]})], POLICY)]
                await store.claim(wid, ["default"], 1, TTL)
                ids[name] = (wid, jid)
            passed(wall, mono, 1.0)
            for wid, jid in ids.values():
                await store.heartbeat(wid, [(jid, 1)], TTL)
        finally:
            await store.close()

    async def after_reboot() -> None:
        wall, mono = Clock(T0 + 30.0), Clock(3.0)
        store = store_of(where(tmp_path), clock=wall, monotonic=mono, rand=lambda: 0.5)
        await store.open()
        try:
            await store.recover(TTL, TTL)  # as the scheduler does at start
            (dead, dead_job), (alive, alive_job) = ids["dead"], ids["alive"]
            ages = {w.id: w.heartbeat_age for w in await store.list_workers()}
            assert ages == {dead: 0.0, alive: 0.0}  # not an hour in the future, nor in the past
            facts = await store.why_facts(dead_job)
            assert facts.lease_expires_at is not None
            assert facts.lease_expires_at - facts.now == pytest.approx(TTL)
            for _ in range(5):
                passed(wall, mono, 2.0)
                await store.heartbeat(alive, [(alive_job, 1)], TTL)
                assert (await store.sweep(TTL, POLICY)).lost_workers == []
            passed(wall, mono, 0.5)
            sweep = await store.sweep(TTL, POLICY)
            assert sweep.lost_workers == [dead]
            assert [(c.job_id, c.state) for c in sweep.changes] == [(dead_job, "retrying")]
            assert (await store.get_job(alive_job)).job.state == "running"
        finally:
            await store.close()

    asyncio.run(first())
    asyncio.run(after_reboot())


# --------------------------------------------------------------------------- the API, with its reaper

CLIENT_TOKEN = "test-client-token"
JOIN_TOKEN = "test-join-token"


def test_api_wall_clock_steps_leave_heartbeating_workers_alive_and_lose_a_silent_one(tmp_path: Path) -> None:
    """The real reaper sweeps (every 50 ms of real time) while the injected clocks move: the workers,
    jobs, `orch workers` ages, the heartbeat-age gauge and `orch why` are read over HTTP."""
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT_TOKEN,
                                    "auth.join_token": JOIN_TOKEN, "scheduler.heartbeat_interval": 0.1,
                                    "scheduler.lease_ttl": TTL, "scheduler.recovery_grace": TTL}, environ={})
    wall, mono = Clock(T0), Clock(500.0)
    store = store_of(settings, clock=wall, monotonic=mono, rand=lambda: 0.5)
    passes = [0]
    real_sweep = store.sweep

    async def counted_sweep(*args: Any, **kw: Any) -> Any:
        result = await real_sweep(*args, **kw)
        passes[0] += 1
        return result

    store.sweep = counted_sweep  # type: ignore[method-assign]

    async def body(client: TestClient) -> None:
        credentials: dict[str, str] = {}

        async def call(method: str, path: str, data: Any = None, token: str = CLIENT_TOKEN) -> Any:
            async with client.request(method, path, json=data, headers={"Authorization": f"Bearer {token}"}) as r:
                text = await r.text()
                assert r.status < 300, (method, path, r.status, text)
                return json.loads(text) if path != "/metrics" else text

        async def reaper_passes() -> None:
            """Two whole reaper passes after now: the second certainly read the clocks as they are."""
            want = passes[0] + 2
            await until(lambda: passes[0] >= want, 10, "two reaper passes")

        async def heartbeat(wid: str, jid: int) -> None:
            reply = await call("POST", f"/v1/workers/{wid}/heartbeat", {"running": [{"job_id": jid, "attempt": 1}]},
                               credentials[wid])
            assert reply == {"cancel": [], "stale": []}

        for name in ("a", "b"):
            reg = await call("POST", "/v1/workers", {"name": name, "concurrency": 1}, JOIN_TOKEN)
            credentials[reg["worker_id"]] = reg["credential"]
        a, b = credentials
        held = {}
        for wid in (a, b):
            job = await call("POST", "/v1/jobs", {"command": ["true"]})
            (lease,) = (await call("POST", f"/v1/workers/{wid}/lease", {"max": 1}, credentials[wid]))["jobs"]
            assert lease["job_id"] == job["id"]
            held[wid] = job["id"]
            await heartbeat(wid, job["id"])

        for jump in JUMPS:
            passed(wall, mono, 2.0, jump)
            await reaper_passes()
            workers = (await call("GET", "/v1/workers"))["workers"]
            assert [(w["state"], w["heartbeat_age"]) for w in workers] == [("alive", 2.0)] * 2, (jump, workers)
            metrics = await call("GET", "/metrics")
            gauge = [s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                     if s.name == "orch_worker_heartbeat_age_seconds"]
            assert gauge == [2.0, 2.0], (jump, gauge)
            why = await call("GET", f"/v1/jobs/{held[a]}/why")
            assert why["heartbeat_age"] == 2.0 and why["lease_expires_in"] == TTL - 2.0, (jump, why)
            for jid in held.values():
                assert (await call("GET", f"/v1/jobs/{jid}"))["state"] == "running", jump
            for wid, jid in held.items():
                await heartbeat(wid, jid)

        # b goes silent and the wall clock steps back a minute: b is lost after TTL of monotonic time.
        wall.advance(-60.0)
        for _ in range(5):
            passed(wall, mono, 2.0)
            await heartbeat(a, held[a])
            await reaper_passes()
            states = {w["id"]: w["state"] for w in (await call("GET", "/v1/workers"))["workers"]}
            assert states == {a: "alive", b: "alive"}
        passed(wall, mono, 0.5)
        await reaper_passes()
        states = {w["id"]: w["state"] for w in (await call("GET", "/v1/workers"))["workers"]}
        assert states == {a: "alive", b: "lost"}
        assert (await call("GET", f"/v1/jobs/{held[b]}"))["state"] == "retrying"
        assert (await call("GET", f"/v1/jobs/{held[a]}"))["state"] == "running"

    async def main() -> None:
        async with TestClient(TestServer(build_app(settings, store), host="127.0.0.1")) as client:
            await asyncio.wait_for(body(client), 60)

    asyncio.run(main())
