"""End to end: what the CLI prints for people. Server text shown escaped, answers that are not orch named as
such, bad addresses refused in one line, `orch workers --all`, and `orch up`'s try: line run as printed."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import (
    ROOT,
    URL_RE,
    Proc,
    free_port,
    http,
    job,
    run_cli,
    start_scheduler,
    start_worker,
    wait_until,
    workers_alive,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # how the CLI writes what the API answered: not about storage

TITLE = "\x1b]0;owned\x07"  # sets the terminal's window title
CLEAR = "\x1b[2J\x1b[H"  # clears the screen
RLO = "\u202e"  # right-to-left override: the rest of the line reads backwards


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def raw_controls(text: str) -> list[str]:
    """Characters a terminal would act on, or that reorder a line (newlines end lines, as they should)."""
    return [c for c in text if c != "\n" and not c.isprintable()]


def test_job_fields_reach_the_terminal_escaped(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    worker = start_worker(tmp_path, orch_env, url, "w")
    env = {**orch_env, "ORCH_SERVER": url}
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        evil_argv = [f"{TITLE}{CLEAR}no{RLO}such", "fake\n9   succeeded  default", "x"]
        status, body = http("POST", f"{url}/v1/jobs", {"command": evil_argv, "name": f"{CLEAR}nightly{RLO}",
                                                        "max_attempts": 1})
        assert status == 201, body
        jid = body["id"]
        wait_until(lambda: job(url, jid)["state"] == "failed", 30, "the job to fail (no such command)")

        shown_title, shown_clear = r"\x1b]0;owned\x07", r"\x1b[2J\x1b[H"
        for args, must_show in [
            (["jobs"], [shown_title + shown_clear + r"no\u202esuch", r"fake\n9", "CREATED (UTC)"]),
            (["status", str(jid)], [shown_clear + r"nightly\u202e", shown_title, "command not found", " UTC"]),
            (["events", str(jid)], [" UTC  #1  running -> failed"]),
            (["why", str(jid)], [f"failed: job {jid} failed"]),
        ]:
            r = run_cli(args, env)
            assert r.returncode == 0, (args, r.stderr)
            assert raw_controls(r.stdout + r.stderr) == [], (args, r.stdout)
            for text in must_show:
                assert text in r.stdout, (args, text, r.stdout)
        r = run_cli(["jobs"], env)
        assert len(r.stdout.splitlines()) == 2, r.stdout  # the header and one row: no fake row

        # --json is the exact JSON, to be read by programs.
        r = run_cli(["status", str(jid), "--json"], env)
        data = json.loads(r.stdout)
        assert data["spec"]["command"] == evil_argv and data["name"] == f"{CLEAR}nightly{RLO}"
        assert TITLE in data["error"]

        # The error line of `orch run --wait` too (the job's own output stays its own).
        r = run_cli(["run", "--wait", "--retries", "0", "--", f"{CLEAR}again"], env)
        assert r.returncode == 127, r.stderr
        assert raw_controls(r.stdout + r.stderr) == [] and shown_clear + "again" in r.stderr
    finally:
        worker.stop()
        sched.stop()


class FakeApi:
    """A loopback HTTP server that is not a real scheduler: it answers GET /v1/workers with workers an older
    scheduler let register with any name, and every other path with a web page."""

    WORKERS = [{"id": "w-0123456789ab", "name": f"{TITLE}local-1", "hostname": f"box{CLEAR}\nw-fake  alive",
                "queues": ["default"], "concurrency": 4, "state": "alive", "running": 1, "heartbeat_age": 0.5,
                "registered_at": "2026-01-05T10:00:00.000Z", "last_heartbeat": "2026-01-05T10:00:00.500Z"}]

    def __init__(self) -> None:
        workers = json.dumps({"workers": self.WORKERS}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body, kind = (workers, "application/json") if self.path == "/v1/workers" else \
                    (b"<html><body>It works!\x1b[2J</body></html>", "text/html")
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))  # read, or closing may reset it
                self.do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_worker_names_and_hosts_are_shown_escaped(orch_env: dict[str, str]) -> None:
    with FakeApi() as fake:
        r = run_cli(["workers", "--server", fake.url], orch_env)
        assert r.returncode == 0, r.stderr
        assert raw_controls(r.stdout) == []
        lines = r.stdout.splitlines()
        assert len(lines) == 2, r.stdout  # no fake row
        assert r"\x1b]0;owned\x07local-1" in lines[1] and r"box\x1b[2J\x1b[H\nw-fake  alive" in lines[1]
        r = run_cli(["workers", "--server", fake.url, "--json"], orch_env)
        assert json.loads(r.stdout)["workers"] == FakeApi.WORKERS


def test_an_answer_that_is_not_orch_is_named_so(orch_env: dict[str, str]) -> None:
    with FakeApi() as fake:
        for args in (["jobs"], ["status", "1"], ["run", "echo", "hi"], ["why", "1"]):
            r = run_cli([*args, "--server", fake.url], orch_env)
            assert r.returncode == 3, (args, r.stdout, r.stderr)
            assert r.stderr.count("\n") == 1 and "not an orch API" in r.stderr, (args, r.stderr)
            assert raw_controls(r.stderr) == [] and "Traceback" not in r.stderr


def test_a_metrics_port_given_as_server_says_it_is_not_the_api(tmp_path: Path, orch_env: dict[str, str]) -> None:
    mport, wport = free_port(), free_port()
    sched, url = start_scheduler(tmp_path, orch_env, extra=["--metrics-port", str(mport)])
    worker = start_worker(tmp_path, orch_env, url, "w", extra=["--metrics-port", str(wport)])
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        for port, says in ((mport, "the orch scheduler's metrics listener"), (wport, "workers serve no API")):
            wait_until(lambda p=port: "orch_build_info" in get_text(f"http://127.0.0.1:{p}/metrics"), 30,
                       f"metrics on {port}")
            for args in (["jobs"], ["status", "1"], ["run", "echo", "hi"], ["workers"], ["logs", "--follow", "1"]):
                r = run_cli([*args, "--server", f"127.0.0.1:{port}"], orch_env)
                # Commands that exit with a job's code say orch itself failed with 125 (cli.ORCH_FAILED).
                assert r.returncode == (125 if "--follow" in args else 3), (port, args, r.stderr)
                assert r.stderr.count("\n") == 1 and "not an orch API" in r.stderr and says in r.stderr, r.stderr
        assert "orch_jobs_submitted_total" in get_text(f"http://127.0.0.1:{mport}/metrics")  # still served
    finally:
        worker.stop()
        sched.stop()


@pytest.mark.parametrize("args", [
    ["jobs", "--server", "htp://127.0.0.1:8080"],
    ["run", "--server", "http://127.0.0.1:80a80", "echo", "hi"],
    ["workers", "--server", "http://:8080"],
    ["status", "1", "--server", "http://a b:8080"],
    ["run", "--env", "NOVALUE", "echo", "hi"],
    ["run", "--env", "=x", "echo", "hi"],
])
def test_bad_input_is_one_line_and_exit_2(orch_env: dict[str, str], args: list[str]) -> None:
    r = run_cli(args, orch_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("orch: ") and "Traceback" not in r.stderr, r.stderr


def test_workers_all_shows_stopped_workers_past_the_retention(tmp_path: Path, orch_env: dict[str, str]) -> None:
    env = {**orch_env, "ORCH_SCHEDULER_WORKER_RETENTION": "0"}
    sched, url = start_scheduler(tmp_path, env)
    burst = start_worker(tmp_path, env, url, "burst", extra=["--burst"])
    steady = start_worker(tmp_path, env, url, "steady")
    try:
        assert burst.wait(30) == 0, burst.log()  # no work: it stops at once
        wait_until(lambda: workers_alive(url) == 1, 30, "the steady worker")
        cli_env = {**env, "ORCH_SERVER": url}
        r = run_cli(["workers"], cli_env)
        assert r.returncode == 0 and "steady" in r.stdout and "burst" not in r.stdout, r.stdout
        r = run_cli(["workers", "--all"], cli_env)
        row = next(line.split() for line in r.stdout.splitlines() if "burst" in line)
        assert row[2] == "stopped" and row[5] == "0/4", r.stdout
    finally:
        steady.stop()
        burst.stop()
        sched.stop()


@pytest.fixture
def mini_pyz(tmp_path: Path) -> Iterator[Path]:
    """orch alone as a zipapp (its dependencies come from this venv): enough to be started as a .pyz."""
    stage = tmp_path / "stage"
    shutil.copytree(ROOT / "orch", stage / "orch", ignore=shutil.ignore_patterns("__pycache__"))
    pyz = tmp_path / "orch.pyz"
    subprocess.run([sys.executable, "-m", "zipapp", str(stage), "-m", "orch.cli:main", "-o", str(pyz)], check=True,
                   timeout=60)
    assert zipfile.is_zipfile(pyz)
    yield pyz


def test_up_from_a_zipapp_prints_a_try_line_that_runs(tmp_path: Path, orch_env: dict[str, str], mini_pyz: Path) -> None:
    up = Proc([sys.executable, "-I", str(mini_pyz), "up", "--port", "0"], tmp_path / "up.log", orch_env)
    try:
        url = wait_until(lambda: (m := URL_RE.search(up.log())) and m.group(1), 60, "orch up to print its URL")
        wait_until(lambda: workers_alive(url) == 1, 60, "the local worker (started from the same file)")
        line = next(line for line in up.log().splitlines() if line.startswith("try: "))
        command = line.removeprefix("try: ")
        assert shlex.split(command)[:3] == [sys.executable, "-I", str(mini_pyz)], line
        # Pasted into a shell as printed, by someone with the same data dir.
        tried = subprocess.run(["bash", "-c", command], env=orch_env, capture_output=True, text=True, timeout=60)
        assert (tried.returncode, tried.stdout) == (0, "hello\n"), (line, tried.stderr)
    finally:
        up.stop()
