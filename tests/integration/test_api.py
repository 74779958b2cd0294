"""Integration tests of the scheduler's HTTP API, in process on loopback: jobs, workers, long polls, errors."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

import orch.config
from helpers import storage_overrides, until
from orch.compose import build_app
from orch.config import load_settings
from orch.scheduler.app import HUB

Body = Callable[[TestClient], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


# Known tokens: the client sends the client token, the join token to register, then each worker's own credential.
CLIENT_TOKEN = "test-client-token"
JOIN_TOKEN = "test-join-token"
CREDENTIALS: dict[str, str] = {}  # worker id -> its credential (ids are random: one dict serves every test)


def serve(tmp_path: Path, body: Body, **overrides: Any) -> None:
    """Run ``body`` against a scheduler app whose state lives in tmp_path."""
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT_TOKEN,
                                    "auth.join_token": JOIN_TOKEN, **overrides}, environ={})

    async def main() -> None:
        async with TestClient(TestServer(build_app(settings), host="127.0.0.1"),
                              headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as client:
            await asyncio.wait_for(body(client), 20)

    asyncio.run(main())


async def call(client: TestClient, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
               params: dict[str, str] | None = None) -> tuple[int, Any]:
    kw: dict[str, Any] = {"params": params, "headers": {}}
    if raw is not None:
        kw["data"] = raw
        kw["headers"]["Content-Type"] = "application/json"
    elif body is not None:
        kw["json"] = body
    if path.startswith("/v1/workers/"):  # a worker's own routes: its credential (else the join token)
        kw["headers"]["Authorization"] = f"Bearer {CREDENTIALS.get(path.split('/')[3], JOIN_TOKEN)}"
    elif path == "/v1/workers" and method == "POST":
        kw["headers"]["Authorization"] = f"Bearer {JOIN_TOKEN}"
    async with client.request(method, path, **kw) as resp:
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
    assert body["heartbeat_interval"] > 0 and body["lease_ttl"] > 0
    CREDENTIALS[body["worker_id"]] = body["credential"]
    return body["worker_id"]


async def lease(client: TestClient, wid: str, n: int = 1, wait: float = 0, **kw: Any) -> list[dict[str, Any]]:
    status, body = await call(client, "POST", f"/v1/workers/{wid}/lease", {"max": n, "wait": wait, **kw})
    assert status == 200, body
    return body["jobs"]


async def lease_one(client: TestClient, wid: str) -> dict[str, Any]:
    """The first job a lease hands the worker, asking until one comes (a submit in flight commits meanwhile)."""
    leased: list[dict[str, Any]] = []

    async def asked() -> bool:
        leased.extend(await lease(client, wid))
        return bool(leased)

    await until(asked, what="a job to be handed out")
    return leased[0]


async def job_count(client: TestClient) -> int:
    status, body = await call(client, "GET", "/v1/jobs", params={"limit": "1000"})
    assert status == 200
    return len(body["jobs"])


def assert_error(status: int, body: Any, want_status: int, field: str | None = None, code: str | None = None) -> None:
    assert status == want_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"]
    assert isinstance(err.get("message"), str) and err["message"]
    if field is not None:
        assert err.get("field") == field, err
    if code is not None:
        assert err["code"] == code, err


# --------------------------------------------------------------------------- jobs


def test_healthz(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, data = await call(client, "GET", "/healthz")
        assert status == 200 and data == {"status": "ok"}

    serve(tmp_path, body)


def test_a_delayed_job_is_scheduled_then_handed_to_a_waiting_lease_once_due(tmp_path: Path) -> None:
    """A delay (or a run_at ahead) answers 201 scheduled with when it is due; listings and why show it; a lease
    long-polling on its queue gets nothing before its time and gets it once due: the reaper's timer queues it
    and the queue's waiter is woken (no poll)."""
    async def body(client: TestClient) -> None:
        wid = await register(client, queues=["later"])
        started = time.time()
        job = await submit(client, command=["echo", "later"], queue="later", delay=0.5)
        assert job["state"] == "scheduled" and job["spec"]["delay"] == 0.5 and job["spec"]["run_at"] is None
        due = job["scheduled_for"]
        assert due is not None and job["retry_at"] is None
        status, page = await call(client, "GET", "/v1/jobs", params={"state": "scheduled"})
        assert status == 200 and [j["id"] for j in page["jobs"]] == [job["id"]]
        assert page["jobs"][0]["scheduled_for"] == due
        status, why = await call(client, "GET", f"/v1/jobs/{job['id']}/why")
        assert status == 200 and why["reason"] == "scheduled" and f"scheduled for {due}" in why["message"], why
        got = await lease(client, wid, wait=5, queues=["later"])
        assert [j["job_id"] for j in got] == [job["id"]]
        assert time.time() - started >= 0.5 - 0.01, "claimed before it was due"
        status, events = await call(client, "GET", f"/v1/jobs/{job['id']}/events")
        assert [(e["from"], e["to"]) for e in events["events"]] == [
            (None, "scheduled"), ("scheduled", "queued"), ("queued", "running")]
        assert events["events"][1]["at"] >= due

        later = await submit(client, run_at="2999-01-01T00:00:00+01:00")
        assert later["state"] == "scheduled" and later["scheduled_for"] == "2998-12-31T23:00:00.000Z"
        assert later["spec"]["run_at"] == "2999-01-01T00:00:00+01:00"  # as written
        past = await submit(client, run_at="2001-01-01T00:00:00Z")
        assert past["state"] == "queued" and past["scheduled_for"] is None
        status, cancelled = await call(client, "POST", f"/v1/jobs/{later['id']}/cancel")
        assert status == 200 and cancelled["state"] == "cancelled" and cancelled["scheduled_for"] is None

    serve(tmp_path, body)


@pytest.mark.parametrize(("spec", "field"), [
    ({"run_at": "2026-12-24T08:00:00"}, "run_at"),
    ({"run_at": "soon"}, "run_at"),
    ({"run_at": 1798095600}, "run_at"),
    ({"delay": -1}, "delay"),
    ({"delay": 10**9}, "delay"),
    ({"delay": "10m"}, "delay"),
    ({"delay": 10, "run_at": "2026-12-24T08:00:00Z"}, "delay"),
])
def test_a_bad_run_at_or_delay_is_400_naming_it(tmp_path: Path, spec: dict[str, Any], field: str) -> None:
    async def body(client: TestClient) -> None:
        status, err = await call(client, "POST", "/v1/jobs", {"command": ["true"], **spec})
        assert_error(status, err, 400, field, "invalid")
        status, err = await call(client, "POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"]},
                                                                             {"command": ["true"], **spec}]})
        assert_error(status, err, 400, f"jobs[1].{field}", "invalid")
        assert await job_count(client) == 0

    serve(tmp_path, body)


def test_submit_and_get_job(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, job = await call(client, "POST", "/v1/jobs", {"command": ["echo", "hi"], "name": "greet"})
        assert status == 201
        assert isinstance(job["id"], int)
        assert job["state"] == "queued"
        assert job["created_at"] and job["created_at"].endswith("Z")
        assert job["name"] == "greet" and job["command"] == "echo hi" and job["command_truncated"] is False
        # The spec in the form it was submitted in, every field there with the defaults filled in.
        assert job["spec"] == {
            "command": ["echo", "hi"], "queue": "default", "priority": 0, "env": {}, "cwd": None, "timeout": None,
            "max_attempts": 3, "labels": {}, "name": "greet",
            "backoff": {"base": 1.0, "factor": 2.0, "cap": 300.0, "jitter": 0.2}, "retry_on_exit": None,
            "run_at": None, "delay": None, "idempotency_key": None, "rate_keys": [], "concurrency": None,
            "depends_on": [], "ref": None}
        status, got = await call(client, "GET", f"/v1/jobs/{job['id']}")
        assert status == 200 and got["spec"] == job["spec"]
        assert got["id"] == job["id"] and got["state"] == "queued" and got["created_at"] == job["created_at"]
        assert got["attempts"] == [] and got["result"] is None

    serve(tmp_path, body)


def test_seed_form_job_route(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, job = await call(client, "POST", "/job", {"task": "echo", "args": ["hello"]})
        assert status == 201, job
        assert job["state"] == "queued"
        assert job["spec"]["task"] == "echo" and job["spec"]["args"] == ["hello"]
        assert "argv" not in job["spec"] and "kind" not in job["spec"] and "command" not in job["spec"]
        status, got = await call(client, "GET", f"/job/{job['id']}")
        assert status == 200 and got["id"] == job["id"]

    serve(tmp_path, body)


def test_list_jobs_pages_cover_every_job_once(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, data = await call(client, "POST", "/v1/jobs/batch",
                                  {"jobs": [{"command": ["true"], "name": f"j{i}"} for i in range(23)]})
        assert status == 201
        ids = [j["id"] for j in data["jobs"]]
        seen: list[int] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = {"limit": "5"} | ({"cursor": cursor} if cursor else {})
            status, page = await call(client, "GET", "/v1/jobs", params=params)
            assert status == 200, page
            assert len(page["jobs"]) <= 5
            seen += [j["id"] for j in page["jobs"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 10, "pagination does not end"
        assert pages == 5
        assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))

    serve(tmp_path, body)


def test_list_jobs_filters_by_state_and_queue(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        a1 = await submit(client, queue="alpha")
        a2 = await submit(client, queue="alpha")
        b1 = await submit(client, queue="beta")
        wid = await register(client, queues=["alpha"])
        got = await lease(client, wid, 1, queues=["alpha"])
        assert [j["job_id"] for j in got] == [a1["id"]]

        async def ids(**params: str) -> set[int]:
            status, data = await call(client, "GET", "/v1/jobs", params=params)
            assert status == 200, data
            return {j["id"] for j in data["jobs"]}

        assert await ids(queue="alpha") == {a1["id"], a2["id"]}
        assert await ids(queue="beta") == {b1["id"]}
        assert await ids(state="running") == {a1["id"]}
        assert await ids(state="queued") == {a2["id"], b1["id"]}
        assert await ids(state="queued", queue="alpha") == {a2["id"]}
        assert await ids(state="failed") == set()

    serve(tmp_path, body)


def test_cancel_queued_job(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        status, got = await call(client, "POST", f"/v1/jobs/{job['id']}/cancel")
        assert status == 200, got
        assert got["state"] == "cancelled" and got["finished_at"]
        status, got = await call(client, "GET", f"/v1/jobs/{job['id']}")
        assert got["state"] == "cancelled"
        # Nothing left to hand out.
        wid = await register(client)
        assert await lease(client, wid) == []
        status, again = await call(client, "POST", f"/v1/jobs/{job['id']}/cancel")
        assert_error(status, again, 409, code="conflict")

    serve(tmp_path, body)


def test_cancel_running_job_ends_when_the_worker_reports(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        wid = await register(client)
        await lease(client, wid)
        status, got = await call(client, "POST", f"/v1/jobs/{job['id']}/cancel")
        assert status == 200 and got["state"] == "running" and got["cancel_requested"] is True
        status, hb = await call(client, "POST", f"/v1/workers/{wid}/heartbeat",
                                {"running": [{"job_id": job["id"], "attempt": 1}]})
        assert hb["cancel"] == [{"job_id": job["id"], "attempt": 1}]
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": job["id"], "attempt": 1, "outcome": "cancelled", "exit_code": -15}]})
        assert data["results"][0]["state"] == "cancelled"
        status, got = await call(client, "GET", f"/v1/jobs/{job['id']}")
        assert got["state"] == "cancelled" and got["finished_at"]

    serve(tmp_path, body)


def test_batch_with_one_bad_job_creates_nothing(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        jobs: list[Any] = [{"command": ["true"]} for _ in range(5)]
        jobs[3] = {"command": []}
        status, data = await call(client, "POST", "/v1/jobs/batch", {"jobs": jobs})
        assert_error(status, data, 400, field="jobs[3].command")
        assert await job_count(client) == 0
        jobs[3] = {"command": ["true"], "priority": "high"}
        status, data = await call(client, "POST", "/v1/jobs/batch", {"jobs": jobs})
        assert_error(status, data, 400, field="jobs[3].priority")
        assert await job_count(client) == 0
        # The same batch, made right, creates all five.
        jobs[3] = {"command": ["true"]}
        status, data = await call(client, "POST", "/v1/jobs/batch", {"jobs": jobs})
        assert status == 201 and len(data["jobs"]) == 5
        assert await job_count(client) == 5

    serve(tmp_path, body)


# --------------------------------------------------------------------------- a worker over HTTP


def test_worker_flow_register_lease_output_complete(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client, command=["echo", "hello"])
        other = await submit(client, command=["echo", "other"])
        wid = await register(client, queues=["default"], concurrency=2)
        got = await lease(client, wid, 2)
        assert [j["job_id"] for j in got] == [job["id"], other["id"]]
        assert got[0]["attempt"] == 1 and got[0]["spec"] == {"command": ["echo", "hello"], "max_attempts": 3}
        status, running = await call(client, "GET", f"/v1/jobs/{job['id']}")
        assert running["state"] == "running" and running["worker"] == wid and running["started_at"]

        status, data = await call(client, "POST", f"/v1/workers/{wid}/output", {"chunks": [
            {"job_id": job["id"], "attempt": 1, "stream": "stdout", "data": "hel"},
            {"job_id": job["id"], "attempt": 1, "stream": "stderr", "data": "note\n"},
        ]})
        assert status == 200 and data == {"accepted": [True, True]}
        status, data = await call(client, "POST", f"/v1/workers/{wid}/heartbeat",
                                  {"running": [{"job_id": job["id"], "attempt": 1}]})
        assert status == 200 and data == {"cancel": [], "stale": []}

        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [{
            "job_id": job["id"], "attempt": 1, "outcome": "succeeded", "exit_code": 0, "duration": 0.01,
            "output": [{"job_id": job["id"], "attempt": 1, "stream": "stdout", "data": "lo\n"}],
        }]})
        assert status == 200, data
        assert data["results"] == [{"job_id": job["id"], "attempt": 1, "accepted": True, "state": "succeeded"}]

        status, done = await call(client, "GET", f"/v1/jobs/{job['id']}")
        assert status == 200
        assert done["state"] == "succeeded"
        assert done["exit_code"] == 0
        assert done["result"]["stdout"] == "hello\n"
        assert done["result"]["stderr"] == "note\n"
        assert done["created_at"] and done["started_at"] and done["finished_at"]
        assert done["created_at"] <= done["started_at"] <= done["finished_at"]
        assert done["duration"] == 0.01
        status, events = await call(client, "GET", f"/v1/jobs/{job['id']}/events")
        assert [e["to"] for e in events["events"]] == ["queued", "running", "succeeded"]
        status, out = await call(client, "GET", f"/v1/jobs/{job['id']}/output")
        assert status == 200 and out["stdout"] == "hello\n" and out["state"] == "succeeded"
        status, workers = await call(client, "GET", "/v1/workers")
        assert [(w["id"], w["state"], w["running"]) for w in workers["workers"]] == [(wid, "alive", 1)]

    serve(tmp_path, body)


def test_a_report_can_ask_for_more_work_in_the_same_round_trip(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        first = await submit(client, command=["echo", "one"])
        queued = [await submit(client, command=["echo", str(i)], queue="q2") for i in range(3)]
        wid = await register(client, queues=["default", "q2"], concurrency=4)
        (got,) = await lease(client, wid, 1)
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {
            "results": [{"job_id": got["job_id"], "attempt": 1, "outcome": "succeeded", "exit_code": 0,
                         "output": [{"job_id": got["job_id"], "attempt": 1, "stream": "stdout", "data": "one\n"}]}],
            "lease": {"max": 2, "queues": ["q2"]}})
        assert status == 200, data
        assert data["results"] == [{"job_id": first["id"], "attempt": 1, "accepted": True, "state": "succeeded"}]
        # The oldest two of q2, each with its spec as an object, as from the lease route.
        assert [(j["job_id"], j["attempt"], j["queue"]) for j in data["jobs"]] == [
            (queued[0]["id"], 1, "q2"), (queued[1]["id"], 1, "q2")]
        assert data["jobs"][0]["spec"]["command"] == ["echo", "0"] and data["jobs"][0]["queued_at"] > 0
        for job, state in ((first, "succeeded"), (queued[0], "running"), (queued[1], "running"), (queued[2], "queued")):
            status, now = await call(client, "GET", f"/v1/jobs/{job['id']}")
            assert now["state"] == state, (job["id"], now["state"])
        status, done = await call(client, "GET", f"/v1/jobs/{first['id']}")
        assert done["result"]["stdout"] == "one\n"
        # Nothing left to claim: the report's answer says so at once, with an empty list.
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {
            "results": [{"job_id": j["id"], "attempt": 1, "outcome": "failed", "exit_code": 3} for j in queued[:2]],
            "lease": {"max": 5, "queues": ["default"]}})
        assert status == 200 and data["jobs"] == [] and [a["state"] for a in data["results"]] == ["retrying"] * 2

        for bad, field in (({"max": 0, "queues": ["q2"]}, "lease.max"), ({"max": 1, "queues": ["bad name"]}, "lease.queues[0]"),
                           ({"max": 1, "wait": 5}, "lease.wait"), ([1], "lease")):
            status, err = await call(client, "POST", f"/v1/workers/{wid}/complete", {
                "results": [{"job_id": queued[2]["id"], "attempt": 1, "outcome": "succeeded"}], "lease": bad})
            assert_error(status, err, 400, field)
        status, now = await call(client, "GET", f"/v1/jobs/{queued[2]['id']}")
        assert now["state"] == "queued"  # a refused request changed nothing

    serve(tmp_path, body)


def test_long_poll_lease_is_woken_by_a_submit(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        wid = await register(client)
        hub = client.server.app[HUB]
        started = time.monotonic()
        task = asyncio.ensure_future(lease(client, wid, 1, wait=10))
        await until(lambda: hub.waiting("default") == 1, what="the lease to wait on the queue")
        assert not task.done()
        job = await submit(client)
        got = await asyncio.wait_for(task, 5)
        assert [j["job_id"] for j in got] == [job["id"]]
        assert time.monotonic() - started < 5, "the lease was not woken by the submit"

    serve(tmp_path, body)


def test_lease_with_wait_returns_empty_after_its_wait(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        wid = await register(client)
        started = time.monotonic()
        assert await lease(client, wid, 1, wait=0.2) == []
        assert 0.15 <= time.monotonic() - started < 3

    serve(tmp_path, body)


def test_wait_returns_when_the_job_completes(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        wid = await register(client)
        await lease(client, wid)
        hub = client.server.app[HUB]
        assert job["id"] not in hub._jobs  # nobody waits on it yet
        started = time.monotonic()
        task = asyncio.ensure_future(call(client, "GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": "5"}))
        await until(lambda: job["id"] in hub._jobs, what="the wait to start")
        assert not task.done()
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": job["id"], "attempt": 1, "outcome": "succeeded", "exit_code": 0}]})
        assert status == 200 and data["results"][0]["accepted"]
        status, waited = await asyncio.wait_for(task, 5)
        assert status == 200 and waited["state"] == "succeeded" and waited["exit_code"] == 0
        assert time.monotonic() - started < 4, "the wait was not woken by the completion"

    serve(tmp_path, body)


@pytest.mark.backend_specific  # (PostgreSQL: a commit that returned is on disk)
def test_wait_tells_of_an_end_only_once_it_is_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters are woken at the commit of a job's end, but answered only after its fsync (synchronous FULL)."""
    import os
    import threading

    real_fdatasync = os.fdatasync
    gate = threading.Event()
    gate.set()
    synced: list[int] = []

    def gated(fd: int) -> None:
        gate.wait(10)
        real_fdatasync(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fdatasync", gated)

    async def body(client: TestClient) -> None:
        from orch.scheduler.app import STORE

        store = client.server.app[STORE]
        job = await submit(client)
        wid = await register(client)
        await lease(client, wid)
        hub = client.server.app[HUB]
        waiter = asyncio.ensure_future(call(client, "GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": "10"}))
        followed: list[dict[str, Any]] = []

        async def follow() -> None:
            async with client.get(f"/v1/jobs/{job['id']}/events", params={"follow": "1"}) as resp:
                async for line in resp.content:
                    if line.strip():
                        followed.append(json.loads(line))

        follower = asyncio.ensure_future(follow())
        await until(lambda: job["id"] in hub._jobs and [e.get("to") for e in followed] == ["queued", "running"],
                    what="the wait and the follower to start")
        gate.clear()  # from here the disk "takes its time"
        done = asyncio.ensure_future(call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": job["id"], "attempt": 1, "outcome": "succeeded", "exit_code": 0}]}))
        await until(lambda: _state_is(store, job["id"], "succeeded"), what="the end to be committed")
        for _ in range(50):  # let the woken wait run as far as it will
            await asyncio.sleep(0)
        assert not waiter.done() and not done.done(), "answered before the end reached the disk"
        assert [e.get("to") for e in followed] == ["queued", "running"], "the follower heard of the end too soon"
        flushes = len(synced)
        gate.set()
        status, waited = await asyncio.wait_for(waiter, 5)
        assert status == 200 and waited["state"] == "succeeded"
        status, answer = await asyncio.wait_for(done, 5)
        assert status == 200 and answer["results"][0]["accepted"]
        await asyncio.wait_for(follower, 5)
        assert [e.get("to") for e in followed] == ["queued", "running", "succeeded", None] and followed[-1]["end"]
        assert len(synced) > flushes

    serve(tmp_path, body)


async def _state_is(store: Any, job_id: int, state: str) -> bool:
    return (await store.job_state(job_id))[0] == state


def test_a_submit_with_wait_answers_with_the_job_once_it_has_ended(tmp_path: Path) -> None:
    """POST /v1/jobs?wait=S: one request submits the job and answers with it once it has ended (the SDK's run), or
    as it is when S passes; a replayed idempotency key waits for that job; a bad wait is a 400 naming it."""
    async def body(client: TestClient) -> None:
        wid = await register(client)
        hub = client.server.app[HUB]
        started = time.monotonic()
        task = asyncio.ensure_future(call(client, "POST", "/v1/jobs", {"command": ["true"], "idempotency_key": "k1"},
                                          params={"wait": "10"}))
        job_id = (await lease_one(client, wid))["job_id"]
        await until(lambda: job_id in hub._jobs, what="the submit to wait on its job")
        assert not task.done(), "answered before the job ended"
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": job_id, "attempt": 1, "outcome": "succeeded", "exit_code": 0, "value": {"n": 7}}]})
        assert status == 200 and data["results"][0]["accepted"], data
        status, done = await asyncio.wait_for(task, 5)
        assert status == 201, done
        assert done["id"] == job_id and done["state"] == "succeeded" and done["exit_code"] == 0
        assert done["result"]["value"] == {"n": 7} and [a["state"] for a in done["attempts"]] == ["succeeded"]
        assert time.monotonic() - started < 8

        # The same key again: that job, already ended, at once (200, as a replay without wait is).
        status, again = await call(client, "POST", "/v1/jobs", {"command": ["true"], "idempotency_key": "k1"},
                                   params={"wait": "10"})
        assert status == 200 and again["id"] == job_id and again["idempotent_replay"] is True
        assert again["state"] == "succeeded" and again["result"]["value"] == {"n": 7}

        # Nobody takes it within the wait: the job as it is then, submitted (201), and still there.
        started = time.monotonic()
        status, queued = await call(client, "POST", "/v1/jobs", {"command": ["true"], "queue": "nobody"},
                                    params={"wait": "0.3"})
        assert status == 201 and queued["state"] == "queued" and queued["attempts"] == []
        assert time.monotonic() - started >= 0.25
        status, there = await call(client, "GET", f"/v1/jobs/{queued['id']}")
        assert status == 200 and there["state"] == "queued"
        # wait=0 is a plain submit.
        status, plain = await call(client, "POST", "/v1/jobs", {"command": ["true"]}, params={"wait": "0"})
        assert status == 201 and plain["state"] == "queued"

        before = await job_count(client)
        for bad in ("soon", "-1", "99999", "inf", "nan"):
            status, data = await call(client, "POST", "/v1/jobs", {"command": ["true"]}, params={"wait": bad})
            assert_error(status, data, 400, field="wait")
        assert await job_count(client) == before, "a refused submit wrote a job"

    serve(tmp_path, body)


@pytest.mark.backend_specific  # (PostgreSQL: a commit that returned is on disk)
def test_a_submit_that_waits_answers_only_once_its_jobs_end_is_on_disk(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A submit that waits is answered only once the end of its job is on disk (synchronous FULL); the job runs
    meanwhile (a claim waits for no fsync)."""
    import os
    import threading

    real_fdatasync = os.fdatasync
    gate = threading.Event()
    gate.set()

    def gated(fd: int) -> None:
        gate.wait(10)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", gated)

    async def body(client: TestClient) -> None:
        from orch.scheduler.app import STORE

        store = client.server.app[STORE]
        wid = await register(client)
        gate.clear()  # from here the disk "takes its time"
        task = asyncio.ensure_future(call(client, "POST", "/v1/jobs", {"command": ["true"]}, params={"wait": "10"}))
        # The job is handed out while the submit's own fsync is still held.
        job_id = (await lease_one(client, wid))["job_id"]
        done = asyncio.ensure_future(call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": job_id, "attempt": 1, "outcome": "succeeded", "exit_code": 0}]}))
        await until(lambda: _state_is(store, job_id, "succeeded"), what="the end to be committed")
        for _ in range(50):  # let the woken submit run as far as it will
            await asyncio.sleep(0)
        assert not task.done() and not done.done(), "answered before the end reached the disk"
        gate.set()
        status, answer = await asyncio.wait_for(task, 5)
        assert status == 201 and answer["state"] == "succeeded" and answer["id"] == job_id
        status, reply = await asyncio.wait_for(done, 5)
        assert status == 200 and reply["results"][0]["accepted"]

    serve(tmp_path, body)


def test_a_submit_with_wait_zero_is_no_long_poll(tmp_path: Path) -> None:
    """wait=0 (as 0, 0.0 or 00) is a plain submit: it takes no long-poll slot, so it is not refused when they are
    all held; a submit that does wait takes one."""
    async def body(client: TestClient) -> None:
        job = await submit(client, queue="nobody")
        held = asyncio.ensure_future(call(client, "GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": "5"}))
        hub = client.server.app[HUB]
        await until(lambda: job["id"] in hub._jobs, what="the wait to hold the one slot")
        for zero in ("0", "0.0", "00"):
            status, plain = await call(client, "POST", "/v1/jobs", {"command": ["true"]}, params={"wait": zero})
            assert status == 201 and plain["state"] == "queued", (zero, plain)
        status, data = await call(client, "POST", "/v1/jobs", {"command": ["true"]}, params={"wait": "1"})
        assert status == 429, data
        held.cancel()

    serve(tmp_path, body, **{"scheduler.max_client_long_polls": 1})


def test_short_wait_returns_the_current_state(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        first = await submit(client)
        second = await submit(client)
        wid = await register(client)
        await lease(client, wid)  # takes the older job only
        for job, state in ((first, "running"), (second, "queued")):
            started = time.monotonic()
            status, now = await call(client, "GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": "0.1"})
            assert status == 200 and now["state"] == state and now["id"] == job["id"]
            assert 0.05 <= time.monotonic() - started < 3
        status, now = await call(client, "GET", f"/v1/jobs/{first['id']}/wait", params={"timeout": "0"})
        assert status == 200 and now["state"] == "running"

    serve(tmp_path, body)


def test_wait_stays_open_while_the_job_is_retrying(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client, max_attempts=2, backoff={"base": 30})
        wid = await register(client)
        await lease(client, wid)
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": job["id"], "attempt": 1, "outcome": "failed", "exit_code": 2}]})
        assert data["results"][0]["state"] == "retrying"
        started = time.monotonic()
        status, waited = await call(client, "GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": "0.3"})
        assert status == 200 and waited["state"] == "retrying"
        assert time.monotonic() - started >= 0.25, "a retrying job is not finished: the wait must hold"

    serve(tmp_path, body)


def test_follow_output_streams_lines_then_an_end_line(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        wid = await register(client)
        await lease(client, wid)
        jid = job["id"]
        lines: list[dict[str, Any]] = []

        async def follow() -> None:
            async with client.get(f"/v1/jobs/{jid}/output", params={"follow": "1"}) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("application/x-ndjson")
                async for raw in resp.content:
                    if raw.strip():
                        lines.append(json.loads(raw))

        task = asyncio.ensure_future(follow())
        await call(client, "POST", f"/v1/workers/{wid}/output", {"chunks": [
            {"job_id": jid, "attempt": 1, "stream": "stdout", "data": "first\n"}]})
        await until(lambda: lines, what="the first streamed line")
        assert not task.done()
        await call(client, "POST", f"/v1/workers/{wid}/output", {"chunks": [
            {"job_id": jid, "attempt": 1, "stream": "stderr", "data": "second\n"}]})
        await until(lambda: len(lines) >= 2, what="the second streamed line")
        status, _ = await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": jid, "attempt": 1, "outcome": "failed", "exit_code": 7,
             "output": [{"job_id": jid, "attempt": 1, "stream": "stdout", "data": "last\n"}]}]})
        assert status == 200
        # Failed with attempts left is retrying, not an end; finish the job for good by cancelling it.
        status, _ = await call(client, "POST", f"/v1/jobs/{jid}/cancel")
        assert status == 200
        await asyncio.wait_for(task, 5)
        assert lines[:3] == [
            {"attempt": 1, "stream": "stdout", "data": "first\n"},
            {"attempt": 1, "stream": "stderr", "data": "second\n"},
            {"attempt": 1, "stream": "stdout", "data": "last\n"},
        ]
        end = lines[-1]
        assert len(lines) == 4
        assert end["end"] is True and end["state"] == "cancelled" and end["exit_code"] == 7

    serve(tmp_path, body)


def test_follow_output_of_a_finished_job_ends_at_once(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        wid = await register(client)
        await lease(client, wid)
        await call(client, "POST", f"/v1/workers/{wid}/complete", {"results": [
            {"job_id": job["id"], "attempt": 1, "outcome": "succeeded", "exit_code": 0,
             "output": [{"job_id": job["id"], "attempt": 1, "stream": "stdout", "data": "hello\n"}]}]})
        async with client.get(f"/v1/jobs/{job['id']}/output", params={"follow": "1"}) as resp:
            text = await asyncio.wait_for(resp.text(), 5)
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        assert lines[0] == {"attempt": 1, "stream": "stdout", "data": "hello\n"}
        assert lines[-1]["end"] is True and lines[-1]["state"] == "succeeded" and lines[-1]["exit_code"] == 0

    serve(tmp_path, body)


def test_single_completion_route_refuses_a_stale_attempt(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        wid = await register(client)
        other = await register(client, name="other")
        await lease(client, wid)
        path = f"/v1/workers/{wid}/jobs/{job['id']}/complete"
        status, data = await call(client, "POST", path, {"attempt": 1, "outcome": "succeeded", "exit_code": 0})
        assert status == 200 and data["accepted"] is True and data["state"] == "succeeded"
        status, again = await call(client, "POST", path, {"attempt": 1, "outcome": "failed", "exit_code": 1})
        assert_error(status, again, 409, field="attempt", code="stale_attempt")
        status, wrong = await call(client, "POST", f"/v1/workers/{other}/jobs/{job['id']}/complete",
                                   {"attempt": 1, "outcome": "failed", "exit_code": 1})
        assert_error(status, wrong, 409, code="stale_attempt")
        status, got = await call(client, "GET", f"/v1/jobs/{job['id']}")
        assert got["state"] == "succeeded" and got["exit_code"] == 0

    serve(tmp_path, body)


def test_unknown_worker_must_register_again(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        await submit(client)
        for path, payload in [("lease", {"max": 1}), ("heartbeat", {"running": []})]:
            status, data = await call(client, "POST", f"/v1/workers/w-000000000000/{path}", payload)
            assert_error(status, data, 409, field="worker_id", code="unknown_worker")
        status, data = await call(client, "POST", "/v1/workers/bad%20id/lease", {"max": 1})
        assert_error(status, data, 404, code="not_found")

    serve(tmp_path, body)


# --------------------------------------------------------------------------- bad input


def test_bad_submit_bodies_are_4xx_json_naming_the_field(tmp_path: Path) -> None:
    cases: list[tuple[bytes, int, str | None]] = [
        (b"{not json", 400, "body"),
        (b"", 400, "body"),
        (b"[1, 2]", 400, "body"),
        (b'"echo hi"', 400, "body"),
        (b"\xff\xfe", 400, "body"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body"),
        (json.dumps({"command": "echo hi"}).encode(), 400, "command"),
        (json.dumps({"command": []}).encode(), 400, "command"),
        (json.dumps({"command": ["echo", 1]}).encode(), 400, "command[1]"),
        (json.dumps({"command": ["x"], "colour": "red"}).encode(), 400, "colour"),
        (json.dumps({"command": ["x"], "priority": "high"}).encode(), 400, "priority"),
        (json.dumps({"command": ["x"], "timeout": 0}).encode(), 400, "timeout"),
        (json.dumps({"command": ["x"], "queue": "no spaces"}).encode(), 400, "queue"),
        (json.dumps({"command": ["x"], "env": {"1X": "y"}}).encode(), 400, "env.1X"),
        (json.dumps({"command": ["x"], "backoff": {"factor": "2"}}).encode(), 400, "backoff.factor"),
        (json.dumps({"task": "echo", "args": "hello"}).encode(), 400, "args"),
    ]

    async def body(client: TestClient) -> None:
        wrong = []
        for raw, want, field in cases:
            for path in ("/v1/jobs", "/job"):
                status, data = await call(client, "POST", path, raw=raw)
                try:
                    assert_error(status, data, want, field=field)
                except AssertionError as e:
                    wrong.append(f"POST {path} {raw[:50]!r}: {e}")
        assert not wrong, "\n".join(wrong)
        assert await job_count(client) == 0

    serve(tmp_path, body)


def test_bad_batch_bodies(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        for payload, field in [({}, "jobs"), ({"jobs": []}, "jobs"), ({"jobs": {"command": ["x"]}}, "jobs"),
                               ({"jobs": [{"command": ["x"]}], "extra": 1}, "extra"),
                               ({"jobs": [{"command": ["x"]}, 5]}, "jobs[1]")]:
            status, data = await call(client, "POST", "/v1/jobs/batch", payload)
            assert_error(status, data, 400, field=field)
        assert await job_count(client) == 0

    serve(tmp_path, body)


def test_oversize_body_is_413_json_and_writes_nothing(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        big = {"command": ["echo", "x" * 4096]}
        status, data = await call(client, "POST", "/v1/jobs", big)
        assert_error(status, data, 413, code="too_large")
        assert "2048" in data["error"]["message"]
        status, data = await call(client, "POST", "/v1/jobs/batch", {"jobs": [big]})
        assert_error(status, data, 413, code="too_large")
        assert await job_count(client) == 0
        await submit(client)  # a small body still goes through
        assert await job_count(client) == 1

    serve(tmp_path, body, **{"scheduler.max_body_bytes": 2048})


@pytest.mark.parametrize("job_id", ["999999", "abc", "1e3", "-1", "²", "12345678901234567890"])
def test_unknown_or_malformed_job_id_is_404_json(tmp_path: Path, job_id: str) -> None:
    async def body(client: TestClient) -> None:
        await submit(client)
        for method, suffix in [("GET", ""), ("GET", "/wait?timeout=0"), ("GET", "/events"), ("GET", "/output"),
                               ("GET", "/output?follow=1"), ("POST", "/cancel")]:
            status, data = await call(client, method, f"/v1/jobs/{job_id}{suffix}")
            assert_error(status, data, 404, field="id", code="not_found")
        status, data = await call(client, "GET", f"/job/{job_id}")
        assert_error(status, data, 404, code="not_found")

    serve(tmp_path, body)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "abc"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "100000"}, "limit"),
        ({"limit": "nan"}, "limit"),
        ({"state": "bogus"}, "state"),
        ({"queue": "no spaces"}, "queue"),
        ({"cursor": "xyz"}, "cursor"),
        ({"cursor": "²"}, "cursor"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_list_query_is_400(tmp_path: Path, params: dict[str, str], field: str) -> None:
    async def body(client: TestClient) -> None:
        status, data = await call(client, "GET", "/v1/jobs", params=params)
        assert_error(status, data, 400, field=field)

    serve(tmp_path, body)


def test_bad_wait_timeout_is_400(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        for bad in ("soon", "-1", "99999", "inf"):
            status, data = await call(client, "GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": bad})
            assert_error(status, data, 400, field="timeout")

    serve(tmp_path, body)


def test_bad_worker_requests_are_4xx_json_naming_the_field(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        job = await submit(client)
        wid = await register(client)
        w = f"/v1/workers/{wid}"
        cases: list[tuple[str, Any, str]] = [
            ("/v1/workers", [], "body"),
            ("/v1/workers", {"queues": "default"}, "queues"),
            ("/v1/workers", {"queues": ["bad name"]}, "queues[0]"),
            ("/v1/workers", {"concurrency": 0}, "concurrency"),
            ("/v1/workers", {"concurrency": "4"}, "concurrency"),
            ("/v1/workers", {"nickname": "x"}, "nickname"),
            (f"{w}/lease", {"max": "2"}, "max"),
            (f"{w}/lease", {"max": 0}, "max"),
            (f"{w}/lease", {"max": 1, "wait": -1}, "wait"),
            (f"{w}/lease", {"max": 1, "wait": 10_000}, "wait"),
            (f"{w}/lease", {"max": 1, "queues": []}, "queues"),
            (f"{w}/lease", {"max": 1, "greedy": True}, "greedy"),
            (f"{w}/heartbeat", {"running": "all"}, "running"),
            (f"{w}/heartbeat", {"running": [{"job_id": "1", "attempt": 1}]}, "running[0].job_id"),
            (f"{w}/heartbeat", {"draining": "yes"}, "draining"),
            (f"{w}/output", {"chunks": "text"}, "chunks"),
            (f"{w}/output", {"chunks": [{"job_id": job["id"], "attempt": 1, "stream": "stdin", "data": "x"}]},
             "chunks[0].stream"),
            (f"{w}/output", {"chunks": [{"job_id": job["id"], "attempt": 1, "stream": "stdout", "data": 5}]},
             "chunks[0].data"),
            (f"{w}/complete", {"results": []}, "results"),
            (f"{w}/complete", {"results": [{"job_id": job["id"], "attempt": 1, "outcome": "lost"}]},
             "results[0].outcome"),
            (f"{w}/complete", {"results": [{"job_id": job["id"], "attempt": 1, "outcome": {"a": 1}}]},
             "results[0].outcome"),
            (f"{w}/complete", {"results": [{"job_id": job["id"], "attempt": 1, "outcome": ["succeeded"]}]},
             "results[0].outcome"),
            (f"{w}/complete", {"results": [{"job_id": job["id"], "attempt": 1, "outcome": "succeeded",
                                            "exit_code": "0"}]}, "results[0].exit_code"),
            (f"{w}/complete", {"results": [{"job_id": job["id"], "attempt": True, "outcome": "succeeded"}]},
             "results[0].attempt"),
            (f"{w}/complete", {"results": [{"job_id": job["id"], "attempt": 1, "outcome": "succeeded",
                                            "duration": -1}]}, "results[0].duration"),
            (f"{w}/complete", {"results": [{"job_id": job["id"], "attempt": 1, "outcome": "succeeded",
                                            "output": [{"stream": "stdout"}]}]}, "results[0].output[0].data"),
            (f"{w}/jobs/{job['id']}/complete", {"attempt": 1, "outcome": "done"}, "outcome"),
            (f"{w}/jobs/{job['id']}/complete", {"attempt": 1, "outcome": "succeeded", "why": "x"}, "why"),
            (f"{w}/hand-back", {"attempts": {}}, "attempts"),
            (f"{w}/hand-back", {"attempts": [], "stop": "yes"}, "stop"),
        ]
        for path, payload, field in cases:
            status, data = await call(client, "POST", path, payload)
            assert 400 <= status < 500, (path, payload, status, data)
            assert_error(status, data, 400, field=field)
        for path in (f"{w}/lease", f"{w}/complete", f"{w}/heartbeat", "/v1/workers"):
            status, data = await call(client, "POST", path, raw=b"{oops")
            assert_error(status, data, 400, field="body")
        # None of it changed the job.
        status, got = await call(client, "GET", f"/v1/jobs/{job['id']}")
        assert got["state"] == "queued" and got["attempt"] == 0

    serve(tmp_path, body)


def test_unknown_route_and_wrong_method_are_json(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, data = await call(client, "GET", "/v1/nothing-here")
        assert_error(status, data, 404)
        status, data = await call(client, "DELETE", "/v1/jobs")
        assert_error(status, data, 405, code="method_not_allowed")

    serve(tmp_path, body)
