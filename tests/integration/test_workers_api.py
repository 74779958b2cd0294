"""GET /v1/workers as an operator reads it, and what POST /v1/workers accepts as a worker's name and host."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from storekit import store_of

import orch.config
from helpers import storage_overrides, until
from orch.compose import build_app
from orch.config import load_settings

CLIENT = "workers-client-token"
JOIN = "workers-join-token"
HOUR = 3600.0


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Scheduler:
    """An in-process scheduler on a clock the test moves; requests with the right token for each route."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.credentials: dict[str, str] = {}

    async def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                   token: str = CLIENT) -> tuple[int, Any]:
        if path.startswith("/v1/workers/"):
            token = self.credentials[path.split("/")[3]]
        async with self.client.request(method, path, json=body, params=params,
                                       headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, json.loads(await resp.text())

    async def register(self, name: str, **kw: Any) -> str:
        status, body = await self.call("POST", "/v1/workers", {"name": name, "hostname": "box1", **kw}, token=JOIN)
        assert status == 201, body
        self.credentials[body["worker_id"]] = body["credential"]
        return body["worker_id"]

    async def workers(self, **params: str) -> dict[str, dict[str, Any]]:
        status, body = await self.call("GET", "/v1/workers", params=params)
        assert status == 200, body
        return {w["name"]: w for w in body["workers"]}


def serve(tmp_path: Path, test: Any, **overrides: Any) -> None:
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT, "auth.join_token": JOIN,
                                    "scheduler.recovery_grace": 0, **overrides}, environ={})
    clock = Clock()
    store = store_of(settings, synchronous="NORMAL", clock=clock, monotonic=clock)  # one time for both

    async def main() -> None:
        async with TestClient(TestServer(build_app(settings, store), host="127.0.0.1")) as client:
            await asyncio.wait_for(test(Scheduler(client), clock), 20)

    asyncio.run(main())


async def _states(s: Scheduler, **params: str) -> dict[str, str] | None:
    """Each worker's state, once the reaper has marked the silent one lost."""
    found = {n: w["state"] for n, w in (await s.workers(**params)).items()}
    return found if found.get("silent") == "lost" else None


def test_stopped_and_lost_workers_leave_the_list_after_the_retention(tmp_path: Path) -> None:
    async def test(s: Scheduler, clock: Clock) -> None:
        stopped = await s.register("stopped")
        await s.register("silent")
        status, _ = await s.call("POST", f"/v1/workers/{stopped}/hand-back", {"attempts": [], "stop": True})
        assert status == 200
        assert (await s.workers())["stopped"]["state"] == "stopped"  # within the retention: still listed

        clock.now += HOUR + 1  # an hour and a second without a heartbeat from either
        await s.register("fresh")
        everyone = await until(lambda: _states(s, all="1"), what="the silent worker to be marked lost")
        assert everyone == {"stopped": "stopped", "silent": "lost", "fresh": "alive"}
        assert {n: w["state"] for n, w in (await s.workers()).items()} == {"fresh": "alive"}
        assert set(await s.workers(all="0")) == {"fresh"}
        assert set(await s.workers(all="true")) == {"stopped", "silent", "fresh"}

        status, body = await s.call("GET", "/v1/workers", params={"all": "maybe"})
        assert status == 400 and body["error"]["field"] == "all"
        status, body = await s.call("GET", "/v1/workers", params={"everyone": "1"})
        assert status == 400 and body["error"]["field"] == "everyone"

    serve(tmp_path, test)


def test_a_live_worker_is_always_listed_however_long_ago_it_heartbeat(tmp_path: Path) -> None:
    async def test(s: Scheduler, clock: Clock) -> None:
        await s.register("steady")
        clock.now += 30  # the reaper's lease_ttl is far longer; the retention (0 s) is not about live workers
        assert (await s.workers())["steady"]["state"] == "alive"

    serve(tmp_path, test, **{"scheduler.worker_retention": 0, "scheduler.lease_ttl": 600})




def test_a_stopped_worker_shows_no_running_jobs(tmp_path: Path) -> None:
    async def test(s: Scheduler, clock: Clock) -> None:
        wid = await s.register("leaving", concurrency=4)
        status, job = await s.call("POST", "/v1/jobs", {"command": ["sleep", "60"]})
        assert status == 201
        status, leased = await s.call("POST", f"/v1/workers/{wid}/lease", {"max": 1, "queues": ["default"], "wait": 0})
        assert status == 200 and [j["job_id"] for j in leased["jobs"]] == [job["id"]]
        assert (await s.workers())["leaving"]["running"] == 1
        # It stops without handing the job back: the job is still marked running until its lease runs out.
        status, _ = await s.call("POST", f"/v1/workers/{wid}/hand-back", {"attempts": [], "stop": True})
        assert status == 200
        status, still = await s.call("GET", f"/v1/jobs/{job['id']}")
        assert still["state"] == "running" and still["worker"] == wid
        gone = (await s.workers())["leaving"]
        assert (gone["state"], gone["running"]) == ("stopped", 0)

    serve(tmp_path, test, **{"scheduler.lease_ttl": 600})


@pytest.mark.parametrize(("field", "value"), [
    ("name", "\x1b]0;owned\x07"), ("name", "local-1\n"), ("name", "\u202eevil"), ("name", "w\x9b2J"),
    ("hostname", "box\x1b[2J"), ("hostname", "box\u2066"), ("hostname", "box\x00"), ("hostname", "tab\there"),
])
def test_registration_refuses_control_characters_in_name_and_host(tmp_path: Path, field: str, value: str) -> None:
    async def test(s: Scheduler, clock: Clock) -> None:
        body = {"name": "w", "hostname": "box1", "queues": ["default"], field: value}
        status, answer = await s.call("POST", "/v1/workers", body, token=JOIN)
        assert status == 400 and answer["error"]["field"] == field, answer
        assert await s.workers(all="1") == {}
        await s.register("Zoë's worker 🎉", hostname="hôte-1.example")  # printable Unicode is welcome

    serve(tmp_path, test)
