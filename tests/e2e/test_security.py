"""Security end to end: real scheduler and worker processes, real tokens, real TLS with certificates made
here, replays, rotation, and a few hundred hostile connections. (In process: tests/integration/
test_security_api.py and test_fuzz_api.py; pure functions: tests/unit/test_auth.py.)"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Proc,
    client_token,
    http,
    job,
    orch_cmd,
    orch_test_env,
    run_cli,
    start_scheduler,
    start_worker,
    wait_until,
    workers_alive,
)

pytestmark = pytest.mark.e2e

TLS_URL_RE = re.compile(r"listening on (https?://[^\s]+)")


def ended(url: str, job_id: int, timeout: float = 30, **kw: Any) -> dict[str, Any]:
    return wait_until(lambda: (j := job(url, job_id, **kw))["state"] in ("succeeded", "failed", "cancelled") and j,
                      timeout, f"job {job_id} to end")


def tokens_of(data: Path) -> dict[str, str]:
    return json.loads((data / "tokens.json").read_text())


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# --------------------------------------------------------------------------- 1. tokens by default, roles


def test_tokens_by_default_0600_and_roles_enforced(tmp_path: Path, orch_env: dict[str, str]) -> None:
    data = Path(orch_env["ORCH_DATA_DIR"])
    sched, url = start_scheduler(tmp_path, orch_env)
    w = None
    try:
        path = data / "tokens.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        tokens = tokens_of(data)
        assert tokens["client"] != tokens["join"] and len(tokens["client"]) > 40
        assert f"tokens: {path}" in sched.log()
        # No token, a wrong one, the wrong role: refused with a JSON error; /healthz stays open.
        assert http("GET", f"{url}/healthz", token=None)[0] == 200
        for token, want in [(None, 401), ("wrong", 401), (tokens["join"], 403)]:
            status, body = http("POST", f"{url}/v1/jobs", {"command": ["true"]}, token=token)
            assert status == want and body["error"]["code"] in ("unauthorized", "forbidden"), body
            assert http("GET", f"{url}/v1/jobs", token=token)[0] == want
        assert http("POST", f"{url}/v1/workers", {"name": "x"}, token=tokens["client"])[0] == 403
        assert http("GET", f"{url}/metrics", token=None)[0] == 401
        assert http("GET", f"{url}/v1/jobs", token=None)[0] == 401
        # The real worker finds the join token in the data dir; a job runs.
        w = start_worker(tmp_path, orch_env, url, "w")
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["echo", "hi"]})
        assert status == 201
        assert ended(url, body["id"])["result"]["stdout"] == "hi\n"
        # The seed's curl form, with the header.
        if shutil.which("curl"):
            out = subprocess.run(["curl", "-s", "-X", "POST", f"{url}/job", "-H", f"Authorization: Bearer {tokens['client']}",
                                  "-d", '{"task": "echo", "args": ["hello"]}'], capture_output=True, text=True, timeout=30)
            seeded = json.loads(out.stdout)
            assert ended(url, seeded["id"])["result"]["stdout"] == "hello\n"
            out = subprocess.run(["curl", "-s", "-X", "POST", f"{url}/job", "-d", '{"task": "echo"}'],
                                 capture_output=True, text=True, timeout=30)
            assert json.loads(out.stdout)["error"]["code"] == "unauthorized"
    finally:
        if w:
            w.stop()
        sched.stop()
    # No token reaches a log.
    for log in tmp_path.glob("*.log"):
        text = log.read_text(errors="replace")
        assert tokens["client"] not in text and tokens["join"] not in text, log.name
        assert "orch_w_" not in text, log.name


# --------------------------------------------------------------------------- 2. zero setup locally


def test_up_local_cli_finds_the_token_and_jobs_never_see_it(tmp_path: Path, orch_env: dict[str, str]) -> None:
    data = Path(orch_env["ORCH_DATA_DIR"])
    up = Proc([*orch_cmd(), "up", "--port", "0"], tmp_path / "up.log", orch_env)
    try:
        url = wait_until(lambda: (m := re.search(r"API (http://\S+)", up.log())) and m.group(1), 30, "orch up's URL")
        assert f"tokens: {data / 'tokens.json'}" in up.log()
        wait_until(lambda: workers_alive(url) == 1, 30, "the local worker")
        tokens = tokens_of(data)
        env = {**orch_env, "ORCH_SERVER": url}
        # The CLI on this machine needs no token: ORCH_DATA_DIR, or --data-dir.
        r = run_cli(["run", "--wait", "--", "sh", "-c", "env"], env)
        assert r.returncode == 0, r.stderr
        job_env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        assert "ORCH_JOB_ID" in job_env and "ORCH_ATTEMPT" in job_env
        # The job's own variables only: who it is, and its result file (ORCH_INPUTS_PATH: a job with dependencies).
        assert job_env["ORCH_RESULT_PATH"].endswith(f"/{job_env['ORCH_JOB_ID']}-1.result.json")
        leaked = {k for k in job_env if k.startswith("ORCH_")
                  and k not in ("ORCH_JOB_ID", "ORCH_ATTEMPT", "ORCH_RESULT_PATH")}
        assert not leaked, leaked
        assert tokens["client"] not in r.stdout and tokens["join"] not in r.stdout and "orch_w_" not in r.stdout
        bare = {k: v for k, v in env.items() if k != "ORCH_DATA_DIR"}
        bare["XDG_DATA_HOME"] = str(tmp_path / "elsewhere")  # the default data dir holds no tokens
        r = run_cli(["jobs"], bare)
        assert r.returncode == 6 and "missing credential" in one_line_error(r) and "orch token show" in r.stderr
        r = run_cli(["jobs", "--data-dir", str(data)], bare)
        assert r.returncode == 0, r.stderr
        r = run_cli(["jobs", "--token", tokens["client"]], bare)
        assert r.returncode == 0, r.stderr
        r = run_cli(["jobs"], {**bare, "ORCH_TOKEN": tokens["client"]})
        assert r.returncode == 0, r.stderr
        r = run_cli(["jobs"], {**env, "ORCH_TOKEN": "revoked-or-wrong"})
        assert r.returncode == 6 and "unknown or revoked token" in one_line_error(r)
        # orch token show, whole and for scripts.
        r = run_cli(["token", "show"], env)
        assert r.returncode == 0 and tokens["client"] in r.stdout and tokens["join"] in r.stdout
        assert run_cli(["token", "show", "--client"], env).stdout == tokens["client"] + "\n"
        assert run_cli(["token", "show", "--worker"], env).stdout == tokens["join"] + "\n"
        # The local worker got the join token in its environment, not in its argv (which ps shows).
        (child,) = children_of(up.pid)
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        assert b"worker" in argv and not any(tokens["join"].encode() in a for a in argv), argv
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        assert f"ORCH_JOIN_TOKEN={tokens['join']}".encode() in environ
    finally:
        up.signal(signal.SIGTERM)
        try:
            assert up.wait(30) == 0, up.log()
        finally:
            up.stop()


def test_remote_worker_joins_with_the_token_flag(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    join = tokens_of(Path(orch_env["ORCH_DATA_DIR"]))["join"]
    # "Another machine": a data dir of its own, without the scheduler's tokens.
    (tmp_path / "remote").mkdir()
    remote = orch_test_env(tmp_path / "remote")
    orch_test_env(Path(orch_env["ORCH_DATA_DIR"]))  # helpers.http keeps using the scheduler's client token
    hostport = url.removeprefix("http://")
    w = None
    try:
        r = subprocess.run([*orch_cmd(), "worker", "--join", hostport, "--burst"], env=remote, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 6, r.stderr
        assert "--token" in r.stderr and "orch token show --worker" in r.stderr and "Traceback" not in r.stderr
        r = subprocess.run([*orch_cmd(), "worker", "--join", hostport, "--burst", "--token", "orch_j_wrong"],
                           env=remote, capture_output=True, text=True, timeout=60)
        assert r.returncode == 6 and "unknown or revoked token" in r.stderr, r.stderr
        w = start_worker(tmp_path, remote, hostport, "remote", extra=["--token", join])
        wait_until(lambda: workers_alive(url) == 1, 30, "the remote worker")
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["echo", "remote"]})
        assert ended(url, body["id"])["result"]["stdout"] == "remote\n"
        # ORCH_JOIN_TOKEN works as well.
        r = subprocess.run([*orch_cmd(), "worker", "--join", hostport, "--burst"], env={**remote, "ORCH_JOIN_TOKEN": join},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        if w:
            w.stop()
        sched.stop()


# --------------------------------------------------------------------------- 3. no silent exposure


def test_auth_off_needs_the_flag_and_is_loud(tmp_path: Path, orch_env: dict[str, str]) -> None:
    r = run_cli(["scheduler", "--port", "0"], {**orch_env, "ORCH_AUTH_ENABLED": "false"}, timeout=60)
    assert r.returncode == 2 and "--no-auth" in one_line_error(r)
    sched, url = start_scheduler(tmp_path, orch_env, extra=["--no-auth"])
    try:
        assert "AUTHENTICATION IS OFF" in sched.log()
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["true"]}, token=None)
        assert status == 201, body
        assert not (Path(orch_env["ORCH_DATA_DIR"]) / "tokens.json").exists()
    finally:
        sched.stop()


# --------------------------------------------------------------------------- 4. TLS


def start_tls_scheduler(tmp: Path, env: dict[str, str], ca: Path, name: str = "tls-scheduler",
                        port: int = 0) -> tuple[Proc, str]:
    proc = Proc([*orch_cmd(), "scheduler", "--port", str(port)], tmp / f"{name}.log", env)

    def url() -> str | None:
        if not proc.alive():
            raise AssertionError(f"scheduler exited: {proc.log()}")
        m = TLS_URL_RE.search(proc.log())
        return m.group(1) if m else None

    found = wait_until(url, 30, f"{name}'s URL")
    ctx = ssl.create_default_context(cafile=str(ca))
    wait_until(lambda: http("GET", found + "/healthz", context=ctx)[0] == 200, 30, f"{name}'s healthz")
    return proc, found


def test_tls_with_certificates_from_orch_certs_init(tmp_path: Path, orch_env: dict[str, str]) -> None:
    pytest.importorskip("cryptography")
    r = run_cli(["certs", "init", "--dir", str(tmp_path / "tls"), "--host", "127.0.0.1"], orch_env)
    assert r.returncode == 0, r.stderr
    ca = tmp_path / "tls" / "ca.pem"
    assert run_cli(["certs", "init", "--dir", str(tmp_path / "other")], orch_env).returncode == 0
    other_ca = tmp_path / "other" / "ca.pem"
    env = {**orch_env, "ORCH_TLS_CERT": str(tmp_path / "tls" / "server.pem"),
           "ORCH_TLS_KEY": str(tmp_path / "tls" / "server-key.pem")}
    sched, url = start_tls_scheduler(tmp_path, env, ca)
    w = None
    try:
        assert url.startswith("https://127.0.0.1:")
        hostport = url.removeprefix("https://")
        ctx = ssl.create_default_context(cafile=str(ca))
        # A worker that trusts the CA joins over TLS (a bare HOST:PORT means https once --ca is given).
        w = start_worker(tmp_path, orch_env, hostport, "tls-worker", extra=["--ca", str(ca)])
        wait_until(lambda: (s := http("GET", url + "/v1/workers", context=ctx))[0] == 200 and
                   any(x["state"] == "alive" for x in s[1]["workers"]), 30, "the TLS worker")
        r = run_cli(["run", "--server", url, "--ca", str(ca), "echo", "over tls", "--wait"], orch_env)
        assert (r.returncode, r.stdout) == (0, "over tls\n"), r.stderr
        r = run_cli(["jobs", "--server", hostport], {**orch_env, "ORCH_TLS_CA": str(ca)})
        assert r.returncode == 0 and "over tls" in r.stdout, r.stderr
        # Verification is on by default: the system's CAs do not know this one; nor does another private CA.
        for args in (["jobs", "--server", url], ["jobs", "--server", url, "--ca", str(other_ca)]):
            r = run_cli(args, orch_env)
            assert r.returncode == 3 and "certificate verify failed" in one_line_error(r), r.stderr
        # Plain HTTP to the TLS port: a clear one-line error pointing at https.
        r = run_cli(["jobs", "--server", f"http://{hostport}"], orch_env)
        assert r.returncode == 3 and f"use https://{hostport}" in one_line_error(r), r.stderr
        assert sched.alive()
        # A worker with the wrong CA says so in its log, and never joins.
        bad = start_worker(tmp_path, orch_env, url, "bad-ca", extra=["--ca", str(other_ca)])
        try:
            wait_until(lambda: "certificate verify failed" in bad.log(), 30, "the bad worker's complaint")
        finally:
            bad.stop()
        names = [x["name"] for x in http("GET", url + "/v1/workers", context=ctx)[1]["workers"]]
        assert "bad-ca" not in names
    finally:
        if w:
            w.stop()
        sched.stop()


def test_https_to_a_plain_http_scheduler_is_a_clear_error(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    try:
        r = run_cli(["jobs", "--server", url.replace("http://", "https://")], orch_env)
        assert r.returncode == 3 and "TLS" in one_line_error(r) and "http://" in r.stderr, r.stderr
    finally:
        sched.stop()


# --------------------------------------------------------------------------- 6. replays, stale credentials, rotation


FAST = {"ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.2", "ORCH_SCHEDULER_LEASE_TTL": "1.5",
        "ORCH_SCHEDULER_RECOVERY_GRACE": "1", "ORCH_RETRY_BACKOFF_BASE": "0.1"}


def test_stale_credentials_and_replays_are_refused_and_change_nothing(tmp_path: Path, orch_env: dict[str, str]) -> None:
    env = {**orch_env, **FAST}
    sched, url = start_scheduler(tmp_path, env)
    join = tokens_of(Path(env["ORCH_DATA_DIR"]))["join"]
    try:
        status, reg = http("POST", f"{url}/v1/workers", {"name": "by-hand"}, token=join)
        wid, cred = reg["worker_id"], reg["credential"]
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["true"], "max_attempts": 2})
        jid = body["id"]
        status, leased = http("POST", f"{url}/v1/workers/{wid}/lease", {"max": 1}, token=cred)
        assert leased["jobs"][0]["job_id"] == jid
        # Silent past the lease TTL: lost. Its credential now earns 409 unknown_worker, everywhere.
        wait_until(lambda: job(url, jid)["attempts"][0]["state"] == "lost", 30, "the attempt to be lost")
        for route, payload in [("heartbeat", {"running": [{"job_id": jid, "attempt": 1}]}),
                               (f"jobs/{jid}/complete", {"attempt": 1, "outcome": "succeeded", "exit_code": 0})]:
            status, body = http("POST", f"{url}/v1/workers/{wid}/{route}", payload, token=cred)
            assert status == 409 and body["error"]["code"] == "unknown_worker", body
        before = job(url, jid)
        # It registers again: a new id and credential; the old credential is worthless on the new id.
        status, reg2 = http("POST", f"{url}/v1/workers", {"name": "by-hand"}, token=join)
        wid2, cred2 = reg2["worker_id"], reg2["credential"]
        status, body = http("POST", f"{url}/v1/workers/{wid2}/heartbeat", {"running": []}, token=cred)
        assert status == 403, body
        leased2 = wait_until(lambda: http("POST", f"{url}/v1/workers/{wid2}/lease", {"max": 1}, token=cred2)[1]["jobs"],
                             30, "the retry")
        assert leased2[0]["attempt"] == 2
        # The first attempt's completion, replayed now, with either credential: refused, nothing changes.
        for w, c in ((wid, cred), (wid2, cred2)):
            status, body = http("POST", f"{url}/v1/workers/{w}/jobs/{jid}/complete",
                                {"attempt": 1, "outcome": "succeeded", "exit_code": 0}, token=c)
            assert status == 409, body
        now = job(url, jid)
        assert now["state"] == "running" and now["attempt"] == 2 and now["worker"] == wid2
        assert now["attempts"][0] == before["attempts"][0]
    finally:
        sched.stop()


def test_a_real_worker_marked_lost_joins_again(tmp_path: Path, orch_env: dict[str, str]) -> None:
    """The agent's re-registration still works with credentials: SIGSTOP past the TTL, SIGCONT, it rejoins."""
    env = {**orch_env, **FAST}
    sched, url = start_scheduler(tmp_path, env)
    w = start_worker(tmp_path, env, url, "sleepy")
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        w.signal(signal.SIGSTOP)
        wait_until(lambda: http("GET", f"{url}/v1/workers")[1]["workers"][0]["state"] == "lost", 30, "it to be lost")
        w.signal(signal.SIGCONT)
        wait_until(lambda: workers_alive(url) == 1 and len(http("GET", f"{url}/v1/workers")[1]["workers"]) == 2, 30,
                   "it to join again")
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["echo", "back"]})
        assert ended(url, body["id"])["result"]["stdout"] == "back\n"
    finally:
        w.signal(signal.SIGCONT)
        w.stop()
        sched.stop()


def test_token_rotation_takes_effect_without_a_restart(tmp_path: Path, orch_env: dict[str, str]) -> None:
    data = Path(orch_env["ORCH_DATA_DIR"])
    sched, url = start_scheduler(tmp_path, orch_env)
    w = start_worker(tmp_path, orch_env, url, "steady")
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        old = tokens_of(data)
        r = run_cli(["token", "rotate", "--client"], orch_env)
        assert r.returncode == 0, r.stderr
        new = tokens_of(data)
        assert new["client"] != old["client"] and new["join"] == old["join"] and new["client"] in r.stdout
        wait_until(lambda: http("GET", f"{url}/v1/jobs", token=old["client"])[0] == 401, 10, "the old token refused")
        assert http("GET", f"{url}/v1/jobs", token=new["client"])[0] == 200
        r = run_cli(["run", "--server", url, "echo", "rotated", "--wait"], orch_env)  # finds the new one
        assert (r.returncode, r.stdout) == (0, "rotated\n"), r.stderr  # and the running worker keeps working
        r = run_cli(["token", "rotate", "--worker"], orch_env)
        assert r.returncode == 0
        wait_until(lambda: http("POST", f"{url}/v1/workers", {"name": "x"}, token=old["join"])[0] == 401, 10,
                   "the old join token refused")
        assert http("POST", f"{url}/v1/workers", {"name": "x"}, token=tokens_of(data)["join"])[0] == 201
        # Logged as the file's change (SQLite) or the shared database's (PostgreSQL, where the digests are).
        assert sched.alive() and re.search(r"(token file changed|tokens rotated in the shared database): "
                                           r"new join token in effect", sched.log()), sched.log()
    finally:
        w.stop()
        sched.stop()


# --------------------------------------------------------------------------- 7. limits under hostile connections


def test_idle_connections_slow_bodies_and_long_polls_do_not_starve_workers(tmp_path: Path,
                                                                          orch_env: dict[str, str]) -> None:
    env = {**orch_env, "ORCH_SCHEDULER_BODY_TIMEOUT": "2", "ORCH_SCHEDULER_IDLE_TIMEOUT": "4",
           "ORCH_SCHEDULER_MAX_CLIENT_LONG_POLLS": "16"}
    sched, url = start_scheduler(tmp_path, env)
    w = start_worker(tmp_path, env, url, "busy", concurrency=4)
    token = client_token()
    host, port = url.removeprefix("http://").split(":")
    socks: list[socket.socket] = []
    polls: list[threading.Thread] = []
    poll_status: list[int] = []
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        status, parked = http("POST", f"{url}/v1/jobs", {"command": ["true"], "queue": "nobody"})
        # 300 connections that never send a byte, 50 that send headers and a bit of body, then stall.
        for _ in range(300):
            socks.append(socket.create_connection((host, int(port)), timeout=10))
        slow = []
        for _ in range(50):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"comm").encode())
            slow.append(s)
        socks += slow

        # 40 long-polls from clients: 16 are held (scheduler.max_client_long_polls), the rest get 429 at once.
        def poll() -> None:
            poll_status.append(http("GET", f"{url}/v1/jobs/{parked['id']}/wait?timeout=8", timeout=30)[0])

        polls = [threading.Thread(target=poll) for _ in range(40)]
        for t in polls:
            t.start()
        wait_until(lambda: poll_status.count(429) == 24, 30, "24 long-polls refused")
        # Meanwhile the worker keeps being served: 40 jobs run and finish.
        started = time.monotonic()
        status, body = http("POST", f"{url}/v1/jobs/batch", {"jobs": [{"command": ["echo", str(i)]} for i in range(40)]})
        assert status == 201, body
        ids = [j["id"] for j in body["jobs"]]
        wait_until(lambda: all(job(url, i)["state"] == "succeeded" for i in ids), 30, "the jobs to run")
        assert time.monotonic() - started < 20
        # The stalled bodies got 408 and their connections were closed; nothing was submitted by them.
        for s in slow:
            s.settimeout(10)
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 408"), head
        status, page = http("GET", f"{url}/v1/jobs?limit=1000")
        assert len(page["jobs"]) == 41
        # Idle connections are closed after scheduler.idle_timeout.
        socks[0].settimeout(15)
        assert socks[0].recv(1) == b""
        for t in polls:
            t.join(30)
        assert poll_status.count(200) == 16 and poll_status.count(429) == 24
        assert sched.alive() and w.alive()
    finally:
        for s in socks:
            s.close()
        for t in polls:
            t.join(30)
        w.stop()
        sched.stop()
