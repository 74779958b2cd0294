"""Integration tests of observability in the scheduler's HTTP API, in process: /metrics, events follow, why."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

import orch.config
from helpers import storage_overrides, until
from orch.compose import build_app
from orch.config import load_settings

Body = Callable[[TestClient], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


# Known tokens (see docs/security.md): the client token by default, the join token to register,
# then each worker's own credential on its routes.
CLIENT_TOKEN = "test-client-token"
JOIN_TOKEN = "test-join-token"
CREDENTIALS: dict[str, str] = {}  # worker id -> its credential


def serve(tmp_path: Path, body: Body, **overrides: Any) -> None:
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT_TOKEN,
                                    "auth.join_token": JOIN_TOKEN, **overrides}, environ={})

    async def main() -> None:
        async with TestClient(TestServer(build_app(settings), host="127.0.0.1"),
                              headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as client:
            await asyncio.wait_for(body(client), 20)

    asyncio.run(main())


async def call(client: TestClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {}
    if path.startswith("/v1/workers/"):
        headers["Authorization"] = f"Bearer {CREDENTIALS.get(path.split('/')[3], JOIN_TOKEN)}"
    elif path == "/v1/workers" and method == "POST":
        headers["Authorization"] = f"Bearer {JOIN_TOKEN}"
    async with client.request(method, path, json=body, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text


async def submit(client: TestClient, **spec: Any) -> dict[str, Any]:
    spec.setdefault("command", ["true"])
    status, job = await call(client, "POST", "/v1/jobs", spec)
    assert status == 201, job
    return job


async def register(client: TestClient, **kw: Any) -> str:
    status, body = await call(client, "POST", "/v1/workers", {"name": "w", "hostname": "h", **kw})
    assert status == 201, body
    CREDENTIALS[body["worker_id"]] = body["credential"]
    return body["worker_id"]


async def lease(client: TestClient, wid: str, n: int = 1, **kw: Any) -> list[dict[str, Any]]:
    status, body = await call(client, "POST", f"/v1/workers/{wid}/lease", {"max": n, "wait": 0, **kw})
    assert status == 200, body
    return body["jobs"]


async def complete(client: TestClient, wid: str, job: dict[str, Any], outcome: str = "succeeded",
                   exit_code: int | None = 0, duration: float = 0.02) -> None:
    status, body = await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
        {"job_id": job["job_id"], "attempt": job["attempt"], "outcome": outcome, "exit_code": exit_code,
         "duration": duration}]})
    assert status == 200 and body["results"][0]["accepted"], body


async def metrics(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, **labels: str) -> float:
    return m.get((metric, tuple(sorted(labels.items()))), 0.0)


async def why(client: TestClient, job_id: int) -> dict[str, Any]:
    status, body = await call(client, "GET", f"/v1/jobs/{job_id}/why")
    assert status == 200, body
    assert body["job_id"] == job_id and body["reason"] and body["message"]
    return body


# --------------------------------------------------------------------------- /metrics


def test_metrics_move_as_jobs_run(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        before = await metrics(client)
        assert get(before, "orch_jobs_submitted_total", queue="q") == 0
        assert get(before, "orch_jobs", state="queued") == 0
        wid = await register(client, queues=["q"], concurrency=4)
        for _ in range(3):
            await submit(client, queue="q")
        flaky = await submit(client, queue="q", max_attempts=2, backoff={"base": 0, "jitter": 0})
        m = await metrics(client)
        assert get(m, "orch_jobs_submitted_total", queue="q") == 4
        assert get(m, "orch_jobs", state="queued") == 4
        assert get(m, "orch_queue_jobs", queue="q", state="queued") == 4
        assert get(m, "orch_workers", state="alive") == 1
        assert get(m, "orch_cluster_slots", state="free") == 4

        jobs = await lease(client, wid, 4, queues=["q"])
        assert len(jobs) == 4
        m = await metrics(client)
        assert get(m, "orch_jobs", state="running") == 4
        assert get(m, "orch_cluster_slots", state="busy") == 4 and get(m, "orch_cluster_slots", state="free") == 0
        assert get(m, "orch_job_queue_wait_seconds_count", queue="q") == 4
        for j in jobs:
            if j["job_id"] == flaky["id"]:
                await complete(client, wid, j, "failed", 3)
            else:
                await complete(client, wid, j)
        retried = await until(lambda: lease(client, wid, 1, queues=["q"]), what="the retry to be queued again")
        await complete(client, wid, retried[0], "failed", 3, duration=0.5)

        m = await metrics(client)
        assert get(m, "orch_jobs_completed_total", queue="q", outcome="succeeded") == 3
        assert get(m, "orch_jobs_completed_total", queue="q", outcome="failed") == 1
        assert get(m, "orch_job_retries_total", queue="q") == 1
        assert get(m, "orch_attempts_ended_total", queue="q", outcome="failed") == 2
        assert get(m, "orch_attempts_started_total", queue="q") == 5
        assert get(m, "orch_job_duration_seconds_count", queue="q") == 5
        assert get(m, "orch_job_duration_seconds_bucket", queue="q", le="0.005") == 0
        assert get(m, "orch_job_duration_seconds_bucket", queue="q", le="0.025") == 4
        assert get(m, "orch_job_duration_seconds_bucket", queue="q", le="3600.0") == 5
        assert get(m, "orch_jobs", state="succeeded") == 3 and get(m, "orch_jobs", state="failed") == 1
        assert get(m, "orch_queue_jobs", queue="q", state="queued") == 0  # emptied queues stay, at 0
        assert ("orch_worker_heartbeat_age_seconds", (("name", "w"), ("worker", wid))) in m
        assert get(m, "orch_store_batches_total") > 0
        # Latency by route template: never the raw path (no job ids in labels).
        route_labels = {dict(k[1]).get("route") for k in m if k[0] == "orch_http_request_duration_seconds_count"}
        assert "/v1/jobs" in route_labels and "/v1/workers/{worker_id}/complete" in route_labels
        assert not any(ch.isdigit() for r in route_labels for ch in r.replace("/v1/", "/")), route_labels
        status, _ = await call(client, "GET", "/no/such/path/123")
        assert status == 404
        m = await metrics(client)
        assert get(m, "orch_http_request_duration_seconds_count", method="GET", route="unmatched", status="404") == 1

    serve(tmp_path, body)


def test_lost_worker_and_lost_attempt_are_counted(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        wid = await register(client)
        job = await submit(client, max_attempts=1)
        assert await lease(client, wid)
        # No heartbeats: the reaper marks the worker lost and the attempt ends lost.
        await until(lambda: _state(client, job["id"], "failed"), 10, "the job to fail as lost")
        m = await metrics(client)
        assert get(m, "orch_workers_lost_total") == 1
        assert get(m, "orch_attempts_ended_total", queue="default", outcome="lost") == 1
        assert get(m, "orch_jobs_completed_total", queue="default", outcome="failed") == 1
        assert get(m, "orch_workers", state="lost") == 1
        assert get(m, "orch_job_duration_seconds_count", queue="default") == 0  # not an execution time

    serve(tmp_path, body, **{"scheduler.heartbeat_interval": 0.05, "scheduler.lease_ttl": 0.3,
                             "scheduler.recovery_grace": 0})


async def _state(client: TestClient, job_id: int, want: str) -> bool:
    status, job = await call(client, "GET", f"/v1/jobs/{job_id}")
    return status == 200 and job["state"] == want


# --------------------------------------------------------------------------- events


def test_events_after_and_follow_stream_until_the_end(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        wid = await register(client)
        job = await submit(client)
        async with client.get(f"/v1/jobs/{job['id']}/events", params={"follow": "1"}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
            first = json.loads(await resp.content.readline())
            assert (first["from"], first["to"], first["reason"]) == (None, "queued", "submitted")
            (leased,) = await lease(client, wid)
            running = json.loads(await resp.content.readline())
            assert (running["from"], running["to"], running["attempt"]) == ("queued", "running", 1)
            assert wid in running["reason"]
            await complete(client, wid, leased)
            done = json.loads(await resp.content.readline())
            assert (done["to"], done["reason"]) == ("succeeded", "exited 0")
            end = json.loads(await resp.content.readline())
            assert end == {"end": True, "job_id": job["id"], "state": "succeeded"}
            assert await resp.content.read() == b""
        status, data = await call(client, "GET", f"/v1/jobs/{job['id']}/events?after={first['id']}")
        assert status == 200 and [e["to"] for e in data["events"]] == ["running", "succeeded"]
        status, data = await call(client, "GET", f"/v1/jobs/{job['id']}/events?after=x")
        assert status == 400 and data["error"]["field"] == "after"
        status, data = await call(client, "GET", "/v1/jobs/999/events?follow=1")
        assert status == 404

    serve(tmp_path, body)


# --------------------------------------------------------------------------- why


def test_why_each_reason(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, data = await call(client, "GET", "/v1/jobs/424242/why")
        assert status == 404 and data["error"]["code"] == "not_found"

        # No live worker serves the queue.
        lonely = await submit(client, queue="nobody")
        w = await why(client, lonely["id"])
        assert w["reason"] == "no_worker" and "no live worker serves queue nobody" in w["message"]

        # Cancelled.
        await call(client, "POST", f"/v1/jobs/{lonely['id']}/cancel")
        w = await why(client, lonely["id"])
        assert w["reason"] == "cancelled" and "cancelled by user" in w["message"]

        # Waiting for a free slot: the only worker's one slot is busy; two jobs queued behind it.
        wid = await register(client, name="solo", queues=["q"], concurrency=1)
        busy = await submit(client, queue="q")
        (held,) = await lease(client, wid, 1, queues=["q"])
        second = await submit(client, queue="q")
        third = await submit(client, queue="q")
        urgent = await submit(client, queue="q", priority=5)
        w = await why(client, third["id"])
        assert w["reason"] == "waiting_for_slot", w
        assert "waiting for a free slot on queue q (position 3 of 3)" in w["message"]
        assert "1 live worker serves q and its one slot is busy" in w["message"]
        assert (await why(client, urgent["id"]))["position"] == 1
        assert (await why(client, second["id"]))["position"] == 2

        # Running, on a worker that heartbeats.
        status, _ = await call(client, "POST", f"/v1/workers/{wid}/heartbeat",
                               {"running": [{"job_id": held["job_id"], "attempt": held["attempt"]}]})
        assert status == 200
        w = await why(client, busy["id"])
        assert w["reason"] == "running" and wid in w["message"] and "last heartbeated" in w["message"]

        # Held by a lease on a worker that went quiet (heartbeat_interval 0.5: quiet after 1 s).
        async def quiet() -> dict[str, Any] | None:
            got = await why(client, busy["id"])
            return got if got["reason"] == "lease_held" else None

        w = await until(quiet, 5, "the lease holder to go quiet")
        assert f"held by a lease on worker {wid} (solo), which last heartbeated" in w["message"]
        assert w["heartbeat_age"] >= 1.0 and w["lease_expires_in"] > 0  # rounded to ms: 1.0004 shows as 1.0

        # Cancel requested on a running job.
        await call(client, "POST", f"/v1/jobs/{busy['id']}/cancel")
        assert (await why(client, busy["id"]))["reason"] == "cancel_requested"
        await complete(client, wid, held, "cancelled", None)
        assert (await why(client, busy["id"]))["reason"] == "cancelled"

        # Backoff: a failure with attempts left waits out its delay.
        other = await register(client, name="other", queues=["b"], concurrency=2)
        flaky = await submit(client, queue="b", max_attempts=3, backoff={"base": 60, "jitter": 0})
        (leased,) = await lease(client, other, 1, queues=["b"])
        await complete(client, other, leased, "failed", 3)
        w = await why(client, flaky["id"])
        assert w["reason"] == "backoff" and "in backoff until" in w["message"]
        assert "after attempt 1 of 3 (exited 3; retry in 60.0s)" in w["message"]
        assert 50 < w["retry_in"] <= 60

        # Finished jobs explain themselves.
        good = await submit(client, queue="b")
        (leased,) = await lease(client, other, 1, queues=["b"])
        await complete(client, other, leased)
        assert (await why(client, good["id"]))["reason"] == "succeeded"
        bad = await submit(client, queue="b", max_attempts=1)
        (leased,) = await lease(client, other, 1, queues=["b"])
        await complete(client, other, leased, "failed", 7)
        w = await why(client, bad["id"])
        assert w["reason"] == "failed" and "exited 7" in w["message"]

    # A long lease TTL: the quiet worker is not marked lost while we look at it.
    serve(tmp_path, body, **{"scheduler.heartbeat_interval": 0.5, "scheduler.lease_ttl": 30})
