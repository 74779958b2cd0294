"""A worker credential leases only from the queues that worker registered: the lease route and a report's lease."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

import orch.config
from helpers import storage_overrides
from orch.compose import build_app
from orch.config import load_settings

CLIENT = "test-client-token"
JOIN = "test-join-token"


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def serve(tmp_path: Path, body: Callable[[TestClient], Awaitable[None]], **overrides: Any) -> None:
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT, "auth.join_token": JOIN,
                                    **overrides}, environ={})

    async def main() -> None:
        async with TestClient(TestServer(build_app(settings), host="127.0.0.1")) as client:
            await asyncio.wait_for(body(client), 20)

    asyncio.run(main())


async def call(client: TestClient, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, json.loads(await resp.text())


async def submit(client: TestClient, queue: str) -> int:
    status, job = await call(client, "POST", "/v1/jobs", CLIENT, {"command": ["true"], "queue": queue})
    assert status == 201, job
    return job["id"]


async def state(client: TestClient, job_id: int) -> str:
    status, job = await call(client, "GET", f"/v1/jobs/{job_id}", CLIENT)
    assert status == 200, job
    return job["state"]


def forbidden(status: int, body: Any, field: str) -> None:
    assert status == 403, (status, body)
    assert body["error"]["code"] == "forbidden" and body["error"]["field"] == field, body
    assert "registered for queues a, b" in body["error"]["message"], body


@pytest.mark.parametrize("auth", ["on", "off"])
def test_a_worker_leases_only_from_the_queues_it_registered(tmp_path: Path, auth: str) -> None:
    async def body(client: TestClient) -> None:
        in_a, in_c = await submit(client, "a"), await submit(client, "c")
        status, reg = await call(client, "POST", "/v1/workers", JOIN, {"name": "ab", "queues": ["a", "b"]})
        assert status == 201, reg
        wid, cred = reg["worker_id"], reg["credential"]

        # Asking for a queue it did not register is refused whole, naming the queue: nothing is claimed,
        # not even from its own queue in the same request.
        status, data = await call(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 2, "queues": ["a", "c"]})
        forbidden(status, data, "queues[1]")
        status, data = await call(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 1})  # "default"
        forbidden(status, data, "queues[0]")
        assert (await state(client, in_a), await state(client, in_c)) == ("queued", "queued")

        status, data = await call(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 2, "queues": ["b", "a"]})
        assert status == 200 and [j["job_id"] for j in data["jobs"]] == [in_a], data

        # A report that asks for more work from another queue: refused before the completion is written.
        done = {"results": [{"job_id": in_a, "attempt": 1, "outcome": "succeeded", "exit_code": 0}]}
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", cred,
                                  {**done, "lease": {"max": 1, "queues": ["b", "c"]}})
        forbidden(status, data, "lease.queues[1]")
        assert (await state(client, in_a), await state(client, in_c)) == ("running", "queued")
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", cred,
                                  {**done, "lease": {"max": 1, "queues": ["a", "b"]}})
        assert status == 200 and data["results"][0]["accepted"] and data["jobs"] == [], data
        assert (await state(client, in_a), await state(client, in_c)) == ("succeeded", "queued")

    overrides = {"auth.enabled": False} if auth == "off" else {}
    serve(tmp_path, body, **overrides)


def test_the_queues_a_worker_registered_hold_across_a_scheduler_restart(tmp_path: Path) -> None:
    saved: dict[str, Any] = {}

    async def first(client: TestClient) -> None:
        status, reg = await call(client, "POST", "/v1/workers", JOIN, {"name": "ab", "queues": ["a", "b"]})
        assert status == 201, reg
        saved.update(wid=reg["worker_id"], cred=reg["credential"])

    async def again(client: TestClient) -> None:
        wid, cred = saved["wid"], saved["cred"]
        in_c, in_b = await submit(client, "c"), await submit(client, "b")
        status, data = await call(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 1, "queues": ["c"]})
        forbidden(status, data, "queues[0]")
        assert await state(client, in_c) == "queued"
        status, data = await call(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 1, "queues": ["b"]})
        assert status == 200 and [j["job_id"] for j in data["jobs"]] == [in_b], data

    serve(tmp_path, first)
    serve(tmp_path, again)
