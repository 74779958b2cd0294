"""The dashboard's server side, in process on loopback: signing in (cookie attributes, forged and expired
sessions, another site's form, one-time links), CSRF and the read-only role on the API's actions, escaping of
what users wrote on every page, bulk actions with their count, the live event stream, and drain.
(The pages in a real browser: tests/e2e/test_dashboard.py.)"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from test_security_api import CLIENT, JOIN, register, req, serve, submit

from orch.scheduler.security import GUARD
from orch.scheduler.ui.session import COOKIE, CSRF_HEADER, Sessions

READ = "read-token-for-tests"
PAGES = ["/ui", "/ui/jobs", "/ui/workers", "/ui/queues", "/ui/schedules"]
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


async def login(client: TestClient, token: str = CLIENT) -> str:
    """Sign in with ``token``; the CSRF token of the session, as its pages carry it."""
    async with client.post("/ui/login", data={"token": token}, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == "/ui"
    async with client.get("/ui") as resp:
        assert resp.status == 200
        text = await resp.text()
    found = re.search(r'<meta name="orch-csrf" content="([^"]+)">', text)
    assert found, text[:500]
    return found.group(1)


async def page(client: TestClient, path: str, **headers: str) -> tuple[int, str, Any]:
    async with client.get(path, allow_redirects=False, headers=headers) as resp:
        return resp.status, await resp.text(), resp.headers


async def api(client: TestClient, method: str, path: str, csrf: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {CSRF_HEADER: csrf} if csrf is not None else {}
    async with client.request(method, path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def test_pages_need_a_sign_in_whose_cookie_is_http_only_strict_and_expiring(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        for path in PAGES + ["/ui/jobs/1"]:
            status, _, headers = await page(client, path)
            assert status == 303 and headers["Location"] == "/ui/login", (path, status)
        status, text, _ = await page(client, "/ui/login")
        assert status == 200 and 'name="token"' in text
        async with client.post("/ui/login", data={"token": "wrong"}, allow_redirects=False) as resp:
            assert resp.status == 401
            assert "not the client token" in await resp.text()
            assert COOKIE not in resp.cookies
        async with client.post("/ui/login", data={"token": CLIENT}, allow_redirects=False) as resp:
            assert resp.status == 303
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=43200" in cookie, cookie
        assert "Secure" not in cookie  # no TLS here (tests/e2e/test_dashboard.py: Secure under TLS)
        job = await submit(client, name="first", labels={"team": "blue"})
        for path in PAGES + [f"/ui/jobs/{job['id']}", f"/ui/workflows/{job['id']}", "/ui/jobs?state=queued"]:
            status, text, headers = await page(client, path)
            assert status == 200, (path, status, text[:300])
            assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
            assert text.startswith("<!doctype html>") and "<script>" not in text  # no inline script, ever
            status, fragment, _ = await page(client, path, **{"X-Orch-Fragment": "1"})
            assert status == 200 and "<html" not in fragment and "<h1>" in fragment, path
        status, text, _ = await page(client, "/ui/jobs/999999")
        assert status == 404 and "no job 999999" in text
        status, text, _ = await page(client, "/ui/jobs?state=bogus&label=nolabel")
        assert status == 400 and "state must be one of" in text and 'value="nolabel"' in text
        # Sign out: the cookie is gone, the pages want a sign-in again.
        csrf = await login(client)
        async with client.post("/ui/logout", data={"csrf": csrf}, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/ui/login"
        status, _, headers = await page(client, "/ui")
        assert status == 303 and headers["Location"] == "/ui/login"

    serve(tmp_path, body)


def test_a_forged_expired_or_foreign_session_is_refused(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        guard = app[GUARD]
        good = guard.sessions.issue("read")
        assert good is not None
        role, expires, nonce, mac = good.split(".")
        forged = ".".join(["admin", expires, nonce, mac])  # a read session made admin
        later = ".".join([role, str(int(expires) + 999999), nonce, mac])  # made to last longer
        old = Sessions(guard.sessions.key_of, 60, clock=lambda: 0.0).issue("admin")  # expired long ago
        other = Sessions(lambda: b"another scheduler's key", 3600).issue("admin")
        for value in (forged, later, old, other, "admin", "", "x" * 5000):
            client.session.cookie_jar.update_cookies({COOKIE: value})
            status, _, headers = await page(client, "/ui")
            assert status == 303 and headers["Location"] == "/ui/login", value
            status, data = await api(client, "GET", "/v1/jobs", "anything")
            assert status == 401, (value, data)
        client.session.cookie_jar.update_cookies({COOKIE: good})
        status, text, _ = await page(client, "/ui")
        assert status == 200 and "read-only" in text
        # A form of another site cannot sign a browser in (login CSRF).
        async with client.post("/ui/login", data={"token": CLIENT}, allow_redirects=False,
                               headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403

    serve(tmp_path, body)


def test_actions_need_the_csrf_token_and_a_read_only_session_only_reads(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        job = await submit(client)
        csrf = await login(client)
        status, data = await api(client, "POST", f"/v1/jobs/{job['id']}/cancel", None)
        assert status == 403 and data["error"]["field"] == CSRF_HEADER, data
        status, data = await api(client, "POST", f"/v1/jobs/{job['id']}/cancel", csrf[:-1] + "A")
        assert status == 403, data
        status, data = await api(client, "POST", f"/v1/jobs/{job['id']}/cancel", csrf)
        assert status == 200 and data["state"] == "cancelled", data
        status, data = await api(client, "POST", f"/v1/jobs/{job['id']}/retry", csrf, {"by": "dashboard"})
        assert status == 200 and data["state"] == "queued", data

        # The read token: a dashboard without buttons, GETs of the API, nothing else.
        client.session.cookie_jar.clear()
        read_csrf = await login(client, READ)
        status, text, _ = await page(client, f"/ui/jobs/{job['id']}")
        assert status == 200 and "data-act" not in text and "data-bulk" not in text and "read-only" in text
        status, text, _ = await page(client, "/ui/queues")
        assert "Pause" not in text
        status, data = await api(client, "GET", f"/v1/jobs/{job['id']}", read_csrf)
        assert status == 200 and data["id"] == job["id"]
        for method, path, payload in (("POST", f"/v1/jobs/{job['id']}/cancel", None),
                                      ("POST", "/v1/queues/default/pause", None),
                                      ("POST", "/ui/bulk", {"action": "cancel", "filters": {}})):
            status, data = await api(client, method, path, read_csrf, payload)
            assert status == 403 and "read-only" in data["error"]["message"], (path, data)
        client.session.cookie_jar.clear()
        status, data, _ = await req(client, "GET", "/v1/jobs", READ)
        assert status == 200 and data["jobs"]
        status, data, _ = await req(client, "POST", f"/v1/jobs/{job['id']}/cancel", READ)
        assert status == 403 and "may only read" in data["error"]["message"]
        status, data, _ = await req(client, "POST", "/v1/ui/link", READ)
        assert status == 403
        status, data, _ = await req(client, "GET", f"/v1/jobs/{job['id']}", CLIENT)
        assert data["state"] == "queued"  # what the read token tried changed nothing

    serve(tmp_path, body, **{"auth.read_token": READ})


def test_a_one_time_link_signs_in_once(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        status, data, _ = await req(client, "POST", "/v1/ui/link", CLIENT)
        assert status == 201 and data["path"].startswith("/ui/link?code=") and data["expires_in"] == 60, data
        status, _, headers = await page(client, data["path"])
        assert status == 303 and headers["Location"] == "/ui" and COOKIE in headers["Set-Cookie"]
        status, text, _ = await page(client, "/ui")
        assert status == 200 and "admin" in text
        client.session.cookie_jar.clear()
        status, text, _ = await page(client, data["path"])  # the same link again
        assert status == 401 and "used already or has expired" in text
        status, text, _ = await page(client, "/ui/link?code=admin.99999999999.abc.def")
        assert status == 401

    serve(tmp_path, body)


def test_what_users_wrote_is_escaped_on_every_page(tmp_path: Path) -> None:
    """HTML and script in a job's name, command, labels, output, error and result value, a workflow ref and a
    schedule: shown as text everywhere, never as markup."""

    async def body(client: TestClient, app: web.Application) -> None:
        status, batch, _ = await req(client, "POST", "/v1/jobs/batch", CLIENT, {"jobs": [
            {"ref": "a", "name": HOSTILE, "shell": f"echo '{HOSTILE}'", "labels": {"x": HOSTILE}},
            {"ref": "b", "name": "then", "command": ["true"], "depends_on": ["a"]}]})
        assert status == 201, batch
        first = batch["jobs"][0]["id"]
        status, made, _ = await req(client, "POST", "/v1/schedules", CLIENT,
                                    {"name": "nightly", "cron": "0 3 * * *", "job": {"shell": f"echo '{HOSTILE}'"}})
        assert status == 201, made
        # A worker runs it: output, an error and a result value with the payload.
        wid, cred = await register(client)
        status, leases, _ = await req(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 1, "wait": 0})
        assert status == 200 and leases["jobs"], leases
        status, ack, _ = await req(client, "POST", f"/v1/workers/{wid}/output", cred, {"chunks": [
            {"job_id": first, "attempt": 1, "stream": "stdout", "data": HOSTILE + "\n"}]})
        assert status == 200, ack
        status, done, _ = await req(client, "POST", f"/v1/workers/{wid}/jobs/{first}/complete", cred, {
            "attempt": 1, "outcome": "failed", "exit_code": 1, "error": HOSTILE, "value": {"v": HOSTILE}})
        assert status == 200, done
        await login(client)
        for path in PAGES + [f"/ui/jobs/{first}", f"/ui/workflows/{first}", "/ui/jobs?q=" + "%3Cscript%3E",
                             "/ui/jobs?name=" + "%3Cscript%3E"]:
            status, text, _ = await page(client, path)
            assert status == 200, (path, text[:300])
            assert "<script>alert" not in text and "<img src=x" not in text, path
            if path.startswith(f"/ui/jobs/{first}"):
                assert text.count("&lt;script&gt;alert(") >= 3, path  # the name, the output, the error, ...

    serve(tmp_path, body)


def test_bulk_actions_count_first_then_act_on_every_job_the_filter_matches(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        for i in range(7):
            await submit(client, labels={"team": "a" if i < 5 else "b"}, queue="bulk")
        csrf = await login(client)
        filters = {"label": "team=a", "queue": "bulk"}
        status, data = await api(client, "POST", "/ui/bulk", None, {"action": "cancel", "filters": filters})
        assert status == 403, data
        status, data = await api(client, "POST", "/ui/bulk", csrf, {"action": "cancel", "filters": filters})
        assert status == 200 and data["count"] == 5 and "label team=a" in data["filters"], data
        status, listed, _ = await req(client, "GET", "/v1/jobs?queue=bulk&state=queued", CLIENT)
        assert len(listed["jobs"]) == 7  # counting changed nothing
        status, data = await api(client, "POST", "/ui/bulk", csrf, {"action": "cancel", "filters": filters,
                                                                   "confirm": 5})
        assert status == 200 and data["done"] == 5 and data["refused"] == 0, data
        status, listed, _ = await req(client, "GET", "/v1/jobs?queue=bulk&state=cancelled", CLIENT)
        assert len(listed["jobs"]) == 5
        status, data = await api(client, "POST", "/ui/bulk", csrf, {"action": "retry", "filters": filters})
        assert data["count"] == 5
        status, data = await api(client, "POST", "/ui/bulk", csrf, {"action": "retry", "filters": filters, "confirm": 5})
        assert data["done"] == 5, data
        status, listed, _ = await req(client, "GET", "/v1/jobs?queue=bulk&state=queued", CLIENT)
        assert len(listed["jobs"]) == 7
        for bad, field in (({"action": "delete", "filters": {}}, "action"),
                           ({"action": "cancel", "filters": {"state": "nope"}}, "state"),
                           ({"action": "cancel", "filters": {"label": "=x"}}, "label"),
                           ({"action": "cancel", "filters": []}, "filters")):
            status, data = await api(client, "POST", "/ui/bulk", csrf, bad)
            assert status == 400 and data["error"]["field"] == field, (bad, data)

    serve(tmp_path, body)


async def read_event(resp: Any, deadline: float = 5.0) -> dict[str, str]:
    """The next event of an SSE stream (its fields), comments skipped."""
    fields: dict[str, str] = {}

    async def one() -> dict[str, str]:
        while True:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value

    return await asyncio.wait_for(one(), deadline)


def test_the_event_stream_tells_each_change_and_resumes_from_an_event_id(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        async with client.get("/ui/events") as resp:
            assert resp.status == 401
        await login(client)
        async with client.get("/ui/events") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            assert (await read_event(resp)) == {"retry": "1000"}
            await submit(client)
            ev = await read_event(resp)
            assert ev["event"] == "change" and ev["id"].endswith("-" + ev["data"]), ev
            seen = ev["id"]
        await submit(client)  # while no stream is open
        async with client.get("/ui/events", headers={"Last-Event-ID": seen}) as resp:
            await read_event(resp)  # retry
            ev = await read_event(resp)  # at once: it missed the submit
            assert ev["event"] == "change" and int(ev["data"]) > int(seen.rpartition("-")[2]), ev
            current = ev["id"]
        async with client.get("/ui/events", headers={"Last-Event-ID": current}) as resp:
            await read_event(resp)
            job = await submit(client)  # nothing was missed: the first change is this submit's
            ev = await read_event(resp)
            assert int(ev["data"]) > int(current.rpartition("-")[2])
        # A job page's stream also tells its job's new output.
        async with client.get(f"/ui/events?job={job['id']}") as resp:
            await read_event(resp)
            status, _, _ = await req(client, "POST", f"/v1/jobs/{job['id']}/cancel", CLIENT)
            assert (await read_event(resp))["event"] == "change"

    serve(tmp_path, body)


def test_a_drained_worker_is_handed_nothing_and_its_heartbeat_says_drain(tmp_path: Path) -> None:
    async def body(client: TestClient, app: web.Application) -> None:
        wid, cred = await register(client)
        status, data, _ = await req(client, "PATCH", f"/v1/workers/{wid}", CLIENT, {"draining": False})
        assert status == 400 and data["error"]["field"] == "draining"
        status, data, _ = await req(client, "PATCH", "/v1/workers/w-nobody", CLIENT, {"draining": True})
        assert status == 404, data
        await submit(client)
        status, data, _ = await req(client, "PATCH", f"/v1/workers/{wid}", CLIENT, {"draining": True})
        assert status == 200 and data["state"] == "draining", data
        status, beat, _ = await req(client, "POST", f"/v1/workers/{wid}/heartbeat", cred, {"running": []})
        assert status == 200 and beat.get("drain") is True, beat
        status, leases, _ = await req(client, "POST", f"/v1/workers/{wid}/lease", cred, {"max": 1, "wait": 0})
        assert status == 200 and leases["jobs"] == [], leases
        status, beat, _ = await req(client, "POST", f"/v1/workers/{wid}/heartbeat", cred,
                                    {"running": [], "draining": True})
        assert "drain" not in beat  # it said it drains: nothing more to tell

    serve(tmp_path, body, **{"auth.join_token": JOIN})


def test_under_tls_the_session_cookie_is_secure(tmp_path: Path) -> None:
    """The cookie's Secure flag follows tls.cert and tls.key (the TLS itself: tests/e2e/test_security.py)."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("not read by the app itself\n")
    key.write_text("not read by the app itself\n")

    async def body(client: TestClient, app: web.Application) -> None:
        async with client.post("/ui/login", data={"token": CLIENT}, allow_redirects=False) as resp:
            assert resp.status == 303
            assert "Secure" in resp.headers["Set-Cookie"] and "HttpOnly" in resp.headers["Set-Cookie"]

    serve(tmp_path, body, **{"tls.cert": str(cert), "tls.key": str(key)})
