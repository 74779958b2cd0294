"""Workers tell the scheduler where their metrics are; GET /v1/metrics/targets hands Prometheus the list
(http_sd_config format). In process on loopback; a real Prometheus: tests/e2e/test_metrics_discovery.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import orch.config
from helpers import storage_overrides, until
from orch.client import Client
from orch.compose import build_app
from orch.config import load_settings
from orch.scheduler.app import API
from orch.scheduler.routes import document
from orch.worker.agent import Agent, WorkerOptions

CLIENT = "test-client-token"
JOIN = "test-join-token"


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def serve(tmp_path: Path, body: Callable[[TestClient, web.Application], Awaitable[None]]) -> None:
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "storage.synchronous": "NORMAL",
                                    "auth.token": CLIENT, "auth.join_token": JOIN}, environ={})
    app = build_app(settings)

    async def main() -> None:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await asyncio.wait_for(body(client, app), 30)

    asyncio.run(main())


async def call(client: TestClient, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.request(method, path, json=body, headers=headers) as resp:
        return resp.status, json.loads(await resp.text())


async def register(client: TestClient, name: str, **kw: Any) -> tuple[str, str]:
    status, data = await call(client, "POST", "/v1/workers", JOIN, {"name": name, **kw})
    assert status == 201, data
    return data["worker_id"], data["credential"]


async def workers(client: TestClient) -> dict[str, dict[str, Any]]:
    status, data = await call(client, "GET", "/v1/workers", CLIENT)
    assert status == 200, data
    return {w["name"]: w for w in data["workers"]}


def test_the_metrics_address_is_checked_strictly_and_shown_as_a_url(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        given = {"plain": "127.0.0.1:9092", "named": "box-7.example.com:9091", "v6": "[::1]:9093",
                 "url": "http://10.0.0.7:9091/metrics", "bare-url": "https://box", "path": "http://box:80/orch/m"}
        for name, address in given.items():
            await register(client, name, metrics=address)
        await register(client, "none")
        shown = {name: w["metrics"] for name, w in (await workers(client)).items()}
        assert shown == {"plain": "http://127.0.0.1:9092/metrics", "named": "http://box-7.example.com:9091/metrics",
                         "v6": "http://[::1]:9093/metrics", "url": "http://10.0.0.7:9091/metrics",
                         "bare-url": "https://box:443/metrics", "path": "http://box:80/orch/m", "none": None}
        for bad in ("box", "box:0", "box:65536", "ftp://box:21", "http://box:9/m?x=1", "http://user@box:9",
                    "box:9091/metrics", "-box:9091", "[::zz]:9091", "[1.2.3.4]:9091", "b" * 250 + ".com:9091",
                    "", 9091, ["box:9091"], {"host": "box"}):
            status, data = await call(client, "POST", "/v1/workers", JOIN, {"name": "bad", "metrics": bad})
            assert status == 400 and data["error"]["field"] == "metrics", (bad, status, data)
            assert data["error"]["code"] == "invalid" and data["error"]["message"], data
        assert "bad" not in await workers(client)

    serve(tmp_path, body)


def test_targets_list_the_scheduler_and_every_live_worker_for_prometheus(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        a, _ = await register(client, "a", metrics="127.0.0.1:9101")
        b, _ = await register(client, "b", metrics="https://box:8443/orch/metrics")
        await register(client, "quiet")  # no metrics listener: not a target
        gone, gone_cred = await register(client, "gone", metrics="127.0.0.1:9102")
        status, _ = await call(client, "POST", f"/v1/workers/{gone}/hand-back", gone_cred,
                               {"attempts": [], "stop": True})
        assert status == 200

        status, groups = await call(client, "GET", "/v1/metrics/targets", CLIENT)
        assert status == 200
        assert groups == [
            {"targets": ["127.0.0.1:9101"], "labels": {"role": "worker", "worker": a, "name": "a"}},
            {"targets": ["box:8443"], "labels": {"role": "worker", "worker": b, "name": "b", "__scheme__": "https",
                                                 "__metrics_path__": "/orch/metrics"}},
        ]
        doc = document()
        op = doc["paths"]["/v1/metrics/targets"]["get"]
        assert op["security"] == [{"clientToken": []}]
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        jsonschema.validate(groups, {**schema, "components": doc["components"]})

        # The scheduler's own listener comes first; one that listens everywhere is named by the host
        # Prometheus reached the API on.
        app[API].metrics_listener = ("127.0.0.1", 9100)
        status, groups = await call(client, "GET", "/v1/metrics/targets", CLIENT)
        assert groups[0] == {"targets": ["127.0.0.1:9100"], "labels": {"role": "scheduler"}}
        assert [g["labels"]["role"] for g in groups] == ["scheduler", "worker", "worker"]
        app[API].metrics_listener = ("0.0.0.0", 9100)
        status, groups = await call(client, "GET", "/v1/metrics/targets", CLIENT)
        assert groups[0]["targets"] == ["127.0.0.1:9100"]

        # The client token's route: nothing for a worker's credential or the join token, or no token.
        for token, want in ((None, 401), (JOIN, 403), (gone_cred, 403)):
            status, data = await call(client, "GET", "/v1/metrics/targets", token)
            assert status == want and data["error"]["code"], (token, status, data)

    serve(tmp_path, body)


def test_a_worker_tells_the_scheduler_its_metrics_address_when_it_registers(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        url = str(client.make_url("")).rstrip("/")
        agent = Agent(Client(url, token=JOIN), WorkerOptions(concurrency=1, name="told", hostname="h",
                                                             metrics="127.0.0.1:9555"))
        running = asyncio.ensure_future(agent.run())
        try:
            told = await until(lambda: _worker(client, "told"), what="the agent to register")
            assert told["metrics"] == "http://127.0.0.1:9555/metrics"
            status, groups = await call(client, "GET", "/v1/metrics/targets", CLIENT)
            assert groups == [{"targets": ["127.0.0.1:9555"],
                               "labels": {"role": "worker", "worker": told["id"], "name": "told"}}]
        finally:
            agent.stop()
            await asyncio.wait_for(running, 20)
            await agent.client.close()

    serve(tmp_path, body)


async def _worker(client: TestClient, name: str) -> dict[str, Any] | None:
    return (await workers(client)).get(name)


def test_a_worker_whose_metrics_address_is_refused_still_joins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As with a scheduler from before this field: joining matters more than being discovered."""

    async def body(client: TestClient, app: web.Application) -> None:
        url = str(client.make_url("")).rstrip("/")
        agent = Agent(Client(url, token=JOIN), WorkerOptions(concurrency=1, name="odd", hostname="h",
                                                             metrics="not an address"))
        running = asyncio.ensure_future(agent.run())
        try:
            joined = await until(lambda: _worker(client, "odd"), what="the agent to register")
            assert joined["state"] == "alive" and joined["metrics"] is None
            assert "refused this worker's metrics address" in caplog.text
        finally:
            agent.stop()
            await asyncio.wait_for(running, 20)
            await agent.client.close()

    serve(tmp_path, body)
