"""Security of the scheduler's HTTP API, in process on loopback: roles, worker credentials, rotation, limits,
strict input. (Real processes and real TLS: tests/e2e/test_security.py; the fuzz test: test_fuzz_api.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import orch.config
from helpers import orch_cmd, storage_overrides, until
from orch import auth
from orch.compose import build_app
from orch.config import load_settings
from orch.scheduler.app import STORE
from orch.scheduler.openapi import operations
from orch.scheduler.security import GUARD

CLIENT = "client-token-for-tests"
JOIN = "join-token-for-tests"
Body = Callable[[TestClient, web.Application], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def serve(tmp_path: Path, body: Body, tokens: bool = True, **overrides: Any) -> None:
    """Run ``body`` against a scheduler app in tmp_path; ``tokens``: known tokens in the configuration
    (else the scheduler makes its own in tmp_path/tokens.json)."""
    known = {"auth.token": CLIENT, "auth.join_token": JOIN} if tokens else {}
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "storage.synchronous": "NORMAL",
                                    **known, **overrides}, environ={})
    app = build_app(settings)

    async def main() -> None:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await asyncio.wait_for(body(client, app), 30)

    asyncio.run(main())


async def req(client: TestClient, method: str, path: str, token: str | None, body: Any = None,
              params: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kw: dict[str, Any] = {"params": params, "headers": headers}
    if raw is not None:
        kw["data"] = raw
        headers["Content-Type"] = "application/json"
    elif body is not None:
        kw["json"] = body
    async with client.request(method, path, **kw) as resp:
        text = await resp.text()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        return resp.status, data, resp.headers


def error(status: int, data: Any, want: int, code: str | None = None) -> None:
    assert status == want, (status, data)
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert data["error"]["message"]
    if code:
        assert data["error"]["code"] == code, data


async def register(client: TestClient, **kw: Any) -> tuple[str, str]:
    status, data, _ = await req(client, "POST", "/v1/workers", JOIN, {"name": "w", **kw})
    assert status == 201, data
    assert data["credential"].startswith("orch_w_") and data["credential"] not in (CLIENT, JOIN)
    return data["worker_id"], data["credential"]


async def submit(client: TestClient, **spec: Any) -> dict[str, Any]:
    spec.setdefault("command", ["true"])
    status, job, _ = await req(client, "POST", "/v1/jobs", CLIENT, spec)
    assert status == 201, job
    return job


def concrete(path: str, job_id: int, worker_id: str) -> str:
    return path.replace("{job_id}", str(job_id)).replace("{worker_id}", worker_id).replace("{queue}", "default").replace("{name}", "api")


BODIES = {
    "/v1/jobs": {"command": ["true"]}, "/job": {"command": ["true"]}, "/v1/jobs/batch": {"jobs": [{"command": ["true"]}]},
    "/v1/workers": {"name": "x"}, "/v1/workers/{worker_id}/heartbeat": {"running": []},
    "/v1/workers/{worker_id}/lease": {"max": 1, "wait": 0}, "/v1/workers/{worker_id}/output": {"chunks": []},
    "/v1/workers/{worker_id}/complete": {"results": [{"job_id": 1, "attempt": 1, "outcome": "succeeded"}]},
    "/v1/workers/{worker_id}/jobs/{job_id}/complete": {"attempt": 1, "outcome": "succeeded"},
    "/v1/workers/{worker_id}/hand-back": {"attempts": []},
    "/v1/jobs/wait": {"ids": [1], "timeout": 0},  # the first job of each test
    "/v1/jobs/retry": {"state": "failed"}, "/v1/limits/{name}": {"rate": "10/s"},
    "/v1/queues/{queue}": {"concurrency": 2},
    "/v1/workers/{worker_id}": {"draining": True},
    "/v1/jobs/purge": {"older_than": 86400},
    "/v1/schedules": {"name": "made", "cron": "0 3 * * *", "job": {"command": ["true"]}},
    "/v1/schedules/{name}": {"overlap": "allow"},
}


# --------------------------------------------------------------------------- 1. tokens and roles


def test_every_route_demands_the_right_role(tmp_path: Path) -> None:
    """No token or a wrong one: 401 (with a Bearer challenge); a real token of the wrong role: 403;
    /healthz is open; a worker's credential is good for its own routes only."""

    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client, ref="first")  # a workflow of one: GET /v1/workflows/{job_id} shows it
        wid, cred = await register(client)
        other, other_cred = await register(client, name="other")
        status, made, _ = await req(client, "PUT", "/v1/limits/api", CLIENT, {"rate": "10/s"})  # DELETE's, first
        assert status == 201, made
        status, made, _ = await req(client, "POST", "/v1/schedules", CLIENT,  # the schedule routes' {name}
                                    {"name": "api", "cron": "0 3 * * *", "job": {"command": ["true"]}})
        assert status == 201, made
        # The dashboard's routes sign in with a session cookie of their own (tests/integration/test_ui.py).
        routes = sorted({(r.method, r.resource.canonical) for r in app.router.routes()
                         if r.method != "HEAD" and not r.resource.canonical.startswith("/ui")})
        assert len(routes) >= 20
        checked = 0
        for method, template in routes:
            path = concrete(template, job["id"], wid)
            payload = BODIES.get(template)
            if template == "/healthz":
                status, data, _ = await req(client, method, path, None)
                assert status == 200, data
                continue
            for bad in (None, "nope", CLIENT + "x", "Basic " + CLIENT):
                status, data, headers = await req(client, method, path, bad, payload)
                error(status, data, 401, "unauthorized")
                assert headers.get("WWW-Authenticate", "").startswith("Bearer"), (method, path)
            if template.startswith("/v1/workers/{worker_id}/"):
                right, wrong = cred, [CLIENT, other_cred]
            elif template == "/v1/workers" and method == "POST":
                right, wrong = JOIN, [CLIENT, cred]
            else:
                right, wrong = CLIENT, [JOIN, cred]
            for token in wrong:
                status, data, _ = await req(client, method, path, token, payload)
                error(status, data, 403, "forbidden")
            params = {"timeout": "0"} if template.endswith("/wait") and method == "GET" else None
            status, data, _ = await req(client, method, path, right, payload, params=params)
            # 409: a worker's report of no current attempt, a replay of a job that has not ended.
            assert status < 400 or (status == 409 and (template.startswith("/v1/workers/{") or template.endswith(
                "/{job_id}/retry"))), (method, path, status, data)
            if (method, template) == ("DELETE", "/v1/schedules/{name}"):  # the next routes name it again
                await req(client, "POST", "/v1/schedules", CLIENT,
                          {"name": "api", "cron": "0 3 * * *", "job": {"command": ["true"]}})
            checked += 1
        assert checked == len(routes) - 1
        # Refused requests changed nothing: only `wid`, with its own credential, ever held the job, and
        # `other` (whose credential was tried on wid's routes) is still alive and holds nothing.
        status, got, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert {a["worker"] for a in got["attempts"]} <= {wid}
        status, data, _ = await req(client, "GET", "/v1/workers", CLIENT)
        assert {w["id"]: (w["state"], w["running"]) for w in data["workers"]}[other] == ("alive", 0)

    serve(tmp_path, body)


def test_metrics_open_or_protected_by_config(tmp_path: Path) -> None:
    async def protected(client: TestClient, app: web.Application) -> None:
        status, data, _ = await req(client, "GET", "/metrics", None)
        error(status, data, 401)
        status, _, _ = await req(client, "GET", "/metrics", CLIENT)
        assert status == 200

    async def open_(client: TestClient, app: web.Application) -> None:
        status, data, _ = await req(client, "GET", "/metrics", None)
        assert status == 200, data
        status, data, _ = await req(client, "GET", "/v1/jobs", None)  # only /metrics opens
        error(status, data, 401)

    serve(tmp_path / "a", protected)
    serve(tmp_path / "b", open_, **{"auth.metrics_open": True})


def test_unauthenticated_request_body_is_never_read(tmp_path: Path) -> None:
    """A caller without a token cannot make the scheduler buffer a body: 401 comes before the body does."""

    async def body(client: TestClient, app: web.Application) -> None:
        server = client.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 401"), head
        writer.close()

    serve(tmp_path, body)


# --------------------------------------------------------------------------- worker credentials, replays


def test_one_worker_cannot_speak_for_another(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client)
        a, a_cred = await register(client, name="a")
        b, b_cred = await register(client, name="b")
        status, leased, _ = await req(client, "POST", f"/v1/workers/{a}/lease", a_cred, {"max": 1})
        assert status == 200 and leased["jobs"][0]["job_id"] == job["id"]
        done = {"attempt": 1, "outcome": "failed", "exit_code": 9}
        # b's credential on a's routes: 403, whatever the route.
        for path, payload in [(f"/v1/workers/{a}/jobs/{job['id']}/complete", done),
                              (f"/v1/workers/{a}/heartbeat", {"running": [{"job_id": job["id"], "attempt": 1}]}),
                              (f"/v1/workers/{a}/hand-back", {"attempts": [{"job_id": job["id"], "attempt": 1}]})]:
            status, data, _ = await req(client, "POST", path, b_cred, payload)
            error(status, data, 403, "forbidden")
        # b on its own routes, naming a's attempt: refused by fencing.
        status, data, _ = await req(client, "POST", f"/v1/workers/{b}/jobs/{job['id']}/complete", b_cred, done)
        error(status, data, 409, "stale_attempt")
        status, data, _ = await req(client, "POST", f"/v1/workers/{b}/complete", b_cred,
                                    {"results": [{"job_id": job["id"], **done}]})
        assert status == 200 and data["results"][0]["accepted"] is False
        status, got, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert got["state"] == "running" and got["worker"] == a and got["attempt"] == 1
        # a itself: accepted once; the same completion replayed: 409, and nothing changes.
        path = f"/v1/workers/{a}/jobs/{job['id']}/complete"
        status, data, _ = await req(client, "POST", path, a_cred, {"attempt": 1, "outcome": "succeeded", "exit_code": 0})
        assert status == 200 and data["accepted"] is True
        status, done_job, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        status, data, _ = await req(client, "POST", path, a_cred, {"attempt": 1, "outcome": "succeeded", "exit_code": 0})
        error(status, data, 409, "stale_attempt")
        status, data, _ = await req(client, "POST", path, a_cred, {"attempt": 1, "outcome": "failed", "exit_code": 1})
        error(status, data, 409, "stale_attempt")
        status, after, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert after == done_job and after["state"] == "succeeded" and after["exit_code"] == 0

    serve(tmp_path, body)


def test_completion_replayed_after_the_attempt_was_superseded_changes_nothing(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client, max_attempts=3, backoff={"base": 0, "jitter": 0})
        a, a_cred = await register(client, name="a")
        b, b_cred = await register(client, name="b")
        await req(client, "POST", f"/v1/workers/{a}/lease", a_cred, {"max": 1})
        first = {"attempt": 1, "outcome": "failed", "exit_code": 3}
        status, _, _ = await req(client, "POST", f"/v1/workers/{a}/jobs/{job['id']}/complete", a_cred, first)
        assert status == 200

        async def leased_by_b() -> Any:
            status, data, _ = await req(client, "POST", f"/v1/workers/{b}/lease", b_cred, {"max": 1})
            return data["jobs"]

        (second,) = await until(leased_by_b, what="the retry to be leased by b")
        assert second["attempt"] == 2
        # a replays its (old) completion, as success this time: refused, the running attempt 2 untouched.
        status, data, _ = await req(client, "POST", f"/v1/workers/{a}/jobs/{job['id']}/complete", a_cred,
                                    {"attempt": 1, "outcome": "succeeded", "exit_code": 0})
        error(status, data, 409, "stale_attempt")
        status, got, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert got["state"] == "running" and got["attempt"] == 2 and got["worker"] == b
        assert [x["state"] for x in got["attempts"]] == ["failed", "running"]

    serve(tmp_path, body)


def test_lost_or_stopped_worker_credential_is_refused_and_it_must_join_again(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client)
        a, a_cred = await register(client, name="a")
        await req(client, "POST", f"/v1/workers/{a}/lease", a_cred, {"max": 1})

        async def lost() -> bool:
            status, data, _ = await req(client, "GET", "/v1/workers", CLIENT)
            return any(w["id"] == a and w["state"] == "lost" for w in data["workers"])

        await until(lost, what="the silent worker to be marked lost")
        # Every route of the lost worker, with its own (once good) credential: 409 unknown_worker, nothing changes.
        for route, payload in [("heartbeat", {"running": [{"job_id": job["id"], "attempt": 1}]}),
                               ("lease", {"max": 1}),
                               ("output", {"chunks": [{"job_id": job["id"], "attempt": 1, "stream": "stdout", "data": "x"}]}),
                               ("complete", {"results": [{"job_id": job["id"], "attempt": 1, "outcome": "succeeded"}]}),
                               (f"jobs/{job['id']}/complete", {"attempt": 1, "outcome": "succeeded"}),
                               ("hand-back", {"attempts": []})]:
            status, data, _ = await req(client, "POST", f"/v1/workers/{a}/{route}", a_cred, payload)
            error(status, data, 409, "unknown_worker")
        status, got, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert got["attempts"][0]["state"] == "lost" and got["state"] != "succeeded"
        # It joins again with the join token and gets a new id and credential; the old credential stays dead
        # on the old id and is worthless on the new one.
        a2, a2_cred = await register(client, name="a")
        assert a2 != a and a2_cred != a_cred
        status, data, _ = await req(client, "POST", f"/v1/workers/{a2}/heartbeat", a_cred, {"running": []})
        error(status, data, 403, "forbidden")
        status, data, _ = await req(client, "POST", f"/v1/workers/{a2}/heartbeat", a2_cred, {"running": []})
        assert status == 200, data
        # A worker that said it stopped: its credential is refused from then on.
        status, _, _ = await req(client, "POST", f"/v1/workers/{a2}/hand-back", a2_cred, {"attempts": [], "stop": True})
        assert status == 200
        status, data, _ = await req(client, "POST", f"/v1/workers/{a2}/lease", a2_cred, {"max": 1})
        error(status, data, 409, "unknown_worker")
        assert app[GUARD].workers[a2][1] is False

    serve(tmp_path, body, **{"scheduler.lease_ttl": 0.3, "scheduler.heartbeat_interval": 0.1,
                             "scheduler.recovery_grace": 0})


def test_worker_credentials_survive_a_scheduler_restart(tmp_path: Path) -> None:
    """Only digests are stored, and they are loaded at start-up: a worker keeps its credential across restarts."""
    saved: dict[str, str] = {}

    async def first(client: TestClient, app: web.Application) -> None:
        wid, cred = await register(client)
        saved.update(wid=wid, cred=cred)

    async def second(client: TestClient, app: web.Application) -> None:
        status, data, _ = await req(client, "POST", f"/v1/workers/{saved['wid']}/heartbeat", saved["cred"],
                                    {"running": []})
        assert status == 200, data
        kept = {c.worker_id: c.digest for c in await app[STORE].worker_credentials()}
        assert kept == {saved["wid"]: auth.digest(saved["cred"])}
        if (tmp_path / "orch.db").exists():  # SQLite: nowhere in the file, not even in free pages
            db = (tmp_path / "orch.db").read_bytes()
            assert saved["cred"].encode() not in db and auth.digest(saved["cred"]).encode() in db

    serve(tmp_path, first)
    serve(tmp_path, second)


# --------------------------------------------------------------------------- rotation


def test_orch_token_rotate_takes_effect_without_a_restart(tmp_path: Path) -> None:
    """The real ``orch token rotate`` (SQLite: it rewrites tokens.json; PostgreSQL: it puts the new digests in
    the database as well), on the data dir of a running scheduler."""

    async def rotate() -> auth.Tokens:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") or k.startswith("ORCH_STORAGE_")}
        env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
        proc = await asyncio.create_subprocess_exec(*orch_cmd(), "token", "rotate", "--data-dir", str(tmp_path),
                                                    env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        new = auth.read_tokens(tmp_path)
        assert new is not None and new.client and new.client in out.decode()
        return new

    async def body(client: TestClient, app: web.Application) -> None:
        old = auth.read_tokens(tmp_path)
        assert old is not None and old.client and old.join
        wid, cred = await register_with(client, old.join)
        status, _, _ = await req(client, "GET", "/v1/jobs", old.client)
        assert status == 200
        new = await rotate()
        assert new.client != old.client and new.join != old.join

        async def switched() -> bool:
            s_old, _, _ = await req(client, "GET", "/v1/jobs", old.client)
            s_new, _, _ = await req(client, "GET", "/v1/jobs", new.client)
            return (s_old, s_new) == (401, 200)

        await until(switched, timeout=5, what="the rotated client token to take effect")
        status, data, _ = await req(client, "POST", "/v1/workers", old.join, {"name": "late"})
        error(status, data, 401, "unauthorized")
        await register_with(client, new.join)
        # A registered worker keeps its own credential through a rotation of the join token.
        status, data, _ = await req(client, "POST", f"/v1/workers/{wid}/heartbeat", cred, {"running": []})
        assert status == 200, data

    serve(tmp_path, body, tokens=False)


@pytest.mark.backend_specific  # a database shared by several schedulers: PostgreSQL's
def test_schedulers_of_a_shared_database_accept_its_tokens_and_a_configured_one_wins_where_set(
        tmp_path_factory: pytest.TempPathFactory, postgres_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The first scheduler puts its file's tokens in the database; a second one with another data dir (another
    machine) accepts those, not its own file's, and says what to do; one with tokens in its configuration keeps
    accepting those (and says so), the database's tokens stay as they were."""
    shared = {"storage.backend": "postgres", "storage.dsn": postgres_server.database()}
    first_dir, second_dir, third_dir = (tmp_path_factory.mktemp(n) for n in ("first", "second", "third"))

    async def first(client: TestClient, app: web.Application) -> None:
        assert await app[STORE].cluster_tokens() == {r: auth.digest(t) for r, t in kept.items()}

    async def second(client: TestClient, app: web.Application) -> None:
        own = auth.read_tokens(second_dir)
        assert own is not None and own.client != kept["client"]
        assert (await req(client, "GET", "/v1/jobs", kept["client"]))[0] == 200
        error(*(await req(client, "GET", "/v1/jobs", own.client))[:2], 401, "unauthorized")
        await register_with(client, kept["join"])
        error(*(await req(client, "POST", "/v1/workers", own.join, {"name": "w"}))[:2], 401, "unauthorized")

    async def third(client: TestClient, app: web.Application) -> None:
        assert (await req(client, "GET", "/v1/jobs", CLIENT))[0] == 200
        error(*(await req(client, "GET", "/v1/jobs", kept["client"]))[:2], 401, "unauthorized")
        await register_with(client, JOIN)
        assert await app[STORE].cluster_tokens() == {r: auth.digest(t) for r, t in kept.items()}

    made, _ = auth.ensure_tokens(first_dir)
    kept = {"client": made.client, "join": made.join}
    serve(first_dir, first, tokens=False, **shared)
    with caplog.at_level(logging.WARNING, logger="orch.scheduler"):
        serve(second_dir, second, tokens=False, **shared)
    assert f"the client and join tokens of {second_dir / 'tokens.json'} are not the ones in effect in the shared " \
           "database" in caplog.text and "Copy tokens.json" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orch.scheduler"):
        serve(third_dir, third, **shared)
    assert "auth.token and auth.join_token (configuration) are not the client and join tokens in effect in the " \
           "shared database: this scheduler accepts auth.token and auth.join_token instead" in caplog.text, caplog.text


async def register_with(client: TestClient, join: str) -> tuple[str, str]:
    status, data, _ = await req(client, "POST", "/v1/workers", join, {"name": "w"})
    assert status == 201, data
    return data["worker_id"], data["credential"]


# --------------------------------------------------------------------------- strict input


def test_strict_input_names_the_field(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client)
        cases: list[tuple[str, str, Any, dict[str, str] | None, int, str]] = [
            ("GET", f"/v1/jobs/{job['id']}", None, {"verbose": "1"}, 400, "verbose"),
            ("GET", f"/v1/jobs/{job['id']}/wait", None, {"timeout": "0", "x": "1"}, 400, "x"),
            ("POST", "/v1/jobs", {"command": ["echo", "\ud800"]}, None, 400, "command[1]"),
            ("POST", "/v1/jobs", {"command": ["x"], "labels": {"team": "a\udfffb"}}, None, 400, "labels.team"),
            ("POST", "/v1/jobs", {"command": ["x"], "env": {f"K{i}": "v" for i in range(300)}}, None, 400, "env"),
            ("POST", "/v1/jobs", {"command": ["x"] * 5000}, None, 400, "command"),
            ("POST", "/v1/jobs", {"command": ["x"], "labels": {f"l{i}": "v" for i in range(65)}}, None, 400, "labels"),
            ("POST", "/v1/jobs", {"command": ["x"], "labels": {"../etc": "v"}}, None, 400, "labels.../etc"),
            ("POST", "/v1/jobs", {"command": ["x"], "queue": "../../tmp"}, None, 400, "queue"),
            ("POST", "/v1/jobs", {"command": ["x"], "name": "n" * 201}, None, 400, "name"),
            ("POST", "/v1/jobs", {"command": ["x"], "priority": 10**30}, None, 400, "priority"),
            ("POST", "/v1/jobs", {"command": ["x"], "timeout": 1e400}, None, 400, "timeout"),
        ]
        for method, path, payload, params, want, field in cases:
            status, data, _ = await req(client, method, path, CLIENT, payload, params=params)
            error(status, data, want)
            assert data["error"].get("field") == field, (path, payload, data)
        status, data, _ = await req(client, "POST", "/v1/workers/..%2F..%2Fetc/lease", JOIN, {"max": 1})
        error(status, data, 404)

    serve(tmp_path, body)


def test_job_ids_and_names_never_reach_a_filesystem_path(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        before = sorted(p.name for p in tmp_path.iterdir())
        for name in ("../../../../tmp/owned", "/etc/passwd", "a/b/c", "..", "~root", "x\\..\\y", "con", "nul"):
            await submit(client, name=name, labels={"path": name})
        for job_id in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "1%00"):
            status, data, _ = await req(client, "GET", f"/v1/jobs/{job_id}", CLIENT)
            assert 400 <= status < 500, data
        after = sorted(p.name for p in tmp_path.iterdir())
        assert set(after) - set(before) <= {"orch.db", "orch.db-wal", "orch.db-shm"}, after
        assert not Path("/tmp/owned").exists()

    serve(tmp_path, body)


def test_openapi_lists_every_route_and_is_served_with_a_token(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        status, data, _ = await req(client, "GET", "/v1/openapi.json", None)
        error(status, data, 401)
        status, doc, _ = await req(client, "GET", "/v1/openapi.json", CLIENT)
        assert status == 200 and doc["openapi"].startswith("3.")
        documented = set(operations(doc))
        registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                      if r.method != "HEAD" and not r.resource.canonical.startswith("/ui")}  # pages, not the API
        assert registered - documented == set(), "routes missing from orch/scheduler/openapi.py"
        assert documented - registered == set(), "documented routes that do not exist"
        for (method, path), op in operations(doc).items():
            assert "4XX" in op["responses"] and op["summary"], (method, path)
            want = [] if path == "/healthz" else None
            if want is not None:
                assert op["security"] == want
            else:
                assert op["security"] and list(op["security"][0])[0] in doc["components"]["securitySchemes"]

    serve(tmp_path, body)


# --------------------------------------------------------------------------- limits


def test_long_polls_of_clients_are_capped_together_and_workers_keep_their_own(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client, queue="nobody")
        wid, cred = await register(client)
        waits = [asyncio.ensure_future(req(client, "GET", f"/v1/jobs/{job['id']}/wait", CLIENT,
                                           params={"timeout": "5"})) for _ in range(3)]
        async def held() -> bool:
            return app[GUARD].long_polls.get("client") == 3

        await until(held, what="three long-polls held")
        status, data, _ = await req(client, "GET", f"/v1/jobs/{job['id']}/wait", CLIENT, params={"timeout": "5"})
        error(status, data, 429, "too_many_requests")
        async with client.get(f"/v1/jobs/{job['id']}/output", params={"follow": "1"},
                              headers={"Authorization": f"Bearer {CLIENT}"}) as resp:
            assert resp.status == 429
        # Short requests are not long-polls, and a worker's lease counts against that worker alone.
        status, _, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert status == 200
        status, data, _ = await req(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 1, "wait": 0.05})
        assert status == 200, data
        status, _, _ = await req(client, "POST", f"/v1/jobs/{job['id']}/cancel", CLIENT)
        assert status == 200
        for w in waits:
            status, data, _ = await w
            assert status == 200 and data["state"] == "cancelled"
        assert app[GUARD].long_polls == {}
        status, data, _ = await req(client, "GET", f"/v1/jobs/{job['id']}/wait", CLIENT, params={"timeout": "0"})
        assert status == 200

    serve(tmp_path, body, **{"scheduler.max_client_long_polls": 3, "scheduler.max_long_polls": 1})


def test_a_slow_body_gets_408_and_others_are_served_meanwhile(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        server = client.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"comm".encode())
        await writer.drain()
        started = time.monotonic()
        job = await submit(client)  # the stalled sender holds up no one
        assert time.monotonic() - started < 0.3 and job["id"]
        head = await asyncio.wait_for(reader.read(4096), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b'"code":"timeout"' in head and b'"field":"body"' in head
        writer.close()
        status, data, _ = await req(client, "GET", "/v1/jobs", CLIENT)
        assert [j["id"] for j in data["jobs"]] == [job["id"]]  # the slow one was never submitted

    serve(tmp_path, body, **{"scheduler.body_timeout": 0.5})


def test_output_bytes_per_attempt_are_bounded(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client)
        wid, cred = await register(client)
        await req(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 1})
        chunk = "x" * 1000 + "\n"
        for i in range(50):
            status, data, _ = await req(client, "POST", f"/v1/workers/{wid}/output", cred, {"chunks": [
                {"job_id": job["id"], "attempt": 1, "stream": "stdout", "data": f"{i:04d}" + chunk}]})
            assert data["accepted"] == [True]
        status, out, _ = await req(client, "GET", f"/v1/jobs/{job['id']}/output", CLIENT)
        assert out["stdout_truncated"] is True
        head, sep, kept = out["stdout"].partition(" bytes of stdout not kept]\n")
        assert head.startswith("[orch: ") and sep, out["stdout"][:80]  # the cut is marked where it is
        assert len(kept.encode()) <= 4096 and kept.endswith("0049" + chunk)  # the tail is kept
        assert int(head[len("[orch: "):].replace(",", "")) + len(kept.encode()) == 50 * (4 + len(chunk))
        status, got, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert got["attempts"][0]["stdout_bytes"] == 50 * (4 + len(chunk))  # counted, not kept

    serve(tmp_path, body, **{"scheduler.output_limit_bytes": 4096})
