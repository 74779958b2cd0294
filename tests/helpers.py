"""Test helpers: wait on conditions with a deadline, and run real orch processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def wait_until(check: Callable[[], T], timeout: float = 20.0, what: str = "condition", interval: float = 0.02) -> T:
    """Call ``check`` until it returns something truthy; fail with what it last saw after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # the check may fail while things start up
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw: {last!r}")
        time.sleep(interval)


def orch_cmd() -> list[str]:
    return [sys.executable, "-m", "orch"]


# The data dir of the current test's orch_env, and of each scheduler start_scheduler() started: http()
# sends the client token the scheduler keeps there.
_DATA_DIR: Path | None = None
_SCHEDULER_DATA: dict[str, tuple[Path, Proc]] = {}  # a scheduler's URL: its data dir, its process
AUTO: Any = object()


def client_token(data_dir: Path | None = None, role: str = "client") -> str | None:
    """The client (or ``role="join"``) token in a data dir's tokens.json (default: the current test's)."""
    folder = data_dir or _DATA_DIR
    if folder is None:
        return None
    try:
        return json.loads((Path(folder) / "tokens.json").read_text()).get(role)
    except (OSError, ValueError):
        return None


STORAGE_ENV: dict[str, str] = {}  # the storage backend of the running test (tests/conftest.py: storage_backend)


def storage_overrides() -> dict[str, str]:
    """Settings that put an in-process scheduler on the running test's backend (empty: SQLite, the default)."""
    if not STORAGE_ENV:
        return {}
    return {"storage.backend": STORAGE_ENV["ORCH_STORAGE_BACKEND"], "storage.dsn": STORAGE_ENV["ORCH_STORAGE_DSN"]}


def database_shown(env: dict[str, str]) -> str:
    """How a scheduler started with ``env`` names its database (`database: ...`)."""
    if env.get("ORCH_STORAGE_BACKEND") == "postgres":
        return env["ORCH_STORAGE_DSN"]
    return str(Path(env["ORCH_DATA_DIR"]) / "orch.db")


def db_rows(env: dict[str, str], sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows of ``sql`` (with ? for parameters) read straight from the database a scheduler with ``env`` uses."""
    if env.get("ORCH_STORAGE_BACKEND") == "postgres":
        import psycopg

        with psycopg.connect(env["ORCH_STORAGE_DSN"]) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), params).fetchall()]
    import sqlite3

    conn = sqlite3.connect(Path(env["ORCH_DATA_DIR"]) / "orch.db")
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def orch_test_env(data_dir: Path, **extra: str) -> dict[str, str]:
    global _DATA_DIR
    _DATA_DIR = Path(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(STORAGE_ENV)
    # No metrics listeners on the fixed default ports (9090, 9091): tests that want them pass free ports.
    env.update(ORCH_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", ORCH_METRICS_SCHEDULER_PORT="0",
               ORCH_METRICS_WORKER_PORT="0")
    env.update(extra)
    # A config file in the user's home must not leak into tests.
    env["XDG_CONFIG_HOME"] = str(data_dir / "xdg-config")
    return env


class Proc:
    """A real orch process; its output goes to a log file the test can read on failure."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], stdin: Any = subprocess.DEVNULL) -> None:
        self.args = args
        self.log_path = log
        self._log = open(log, "ab")
        self.p = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, stdin=stdin,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.p.wait(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL the whole process group if it lingers."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.p.wait(10)


URL_RE = re.compile(r"(?:listening on|API) (https?://[^\s]+)")


def start_scheduler(tmp: Path, env: dict[str, str], port: int = 0, name: str = "scheduler", extra: list[str] | None = None) -> tuple[Proc, str]:
    proc = Proc([*orch_cmd(), "scheduler", "--port", str(port), *(extra or [])], tmp / f"{name}.log", env)
    url = wait_until(lambda: _url(proc), 30, f"{name} to print its URL")
    if env.get("ORCH_DATA_DIR"):
        _SCHEDULER_DATA[url] = (Path(env["ORCH_DATA_DIR"]), proc)  # http() to this URL sends its client token
    wait_until(lambda: http("GET", url + "/healthz")[0] == 200, 30, f"{name} healthz")
    return proc, url


def _url(proc: Proc) -> str | None:
    if not proc.alive():
        raise AssertionError(f"process exited {proc.p.returncode}: {proc.log()}")
    m = URL_RE.search(proc.log())
    return m.group(1) if m else None


def start_worker(tmp: Path, env: dict[str, str], url: str, name: str, concurrency: int = 4, extra: list[str] | None = None) -> Proc:
    return Proc([*orch_cmd(), "worker", "--join", url, "--name", name, "--concurrency", str(concurrency), *(extra or [])],
                tmp / f"{name}.log", env)


def http(method: str, url: str, body: Any = None, timeout: float = 30.0, token: Any = AUTO,
         context: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request; ``token``: by default the current test's client token (None: send none); ``headers``: more."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **(headers or {})}
    if token is AUTO:
        # The scheduler started at this URL, while it runs: a port an ended scheduler (of an earlier test) had
        # may be another's now, and its token the wrong one (that gave an `orch up` on a recycled port 401s).
        found = next((d for u, (d, proc) in _SCHEDULER_DATA.items() if url.startswith(u + "/") and proc.alive()), None)
        token = client_token(found)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*orch_cmd(), *args], env=env, capture_output=True, text=True, timeout=timeout, input=input)


def workers_alive(url: str) -> int:
    status, body = http("GET", url + "/v1/workers")
    return sum(1 for w in body["workers"] if w["state"] == "alive") if status == 200 else 0


async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.01) -> Any:
    """The event-loop form of wait_until: ``check`` may be sync or async; fails saying what it last saw."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {got!r}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A loopback port nobody listens on now (for a process that must restart on the same port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(url: str, job_id: int, **kw: Any) -> dict[str, Any]:
    """GET a job; the request must succeed."""
    status, body = http("GET", f"{url}/v1/jobs/{job_id}", **kw)
    assert status == 200, body
    return body


def submit(url: str, spec: dict[str, Any]) -> int:
    """POST one job spec; the request must succeed. Its id."""
    status, body = http("POST", f"{url}/v1/jobs", spec)
    assert status == 201, body
    return body["id"]


def events(url: str, job_id: int) -> list[dict[str, Any]]:
    """A job's state changes (GET .../events); the request must succeed."""
    status, body = http("GET", f"{url}/v1/jobs/{job_id}/events")
    assert status == 200, body
    return body["events"]


@contextmanager
def one_worker_cluster(tmp: Path, env: dict[str, str], concurrency: int = 4,
                       queues: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, str]]]:
    """A scheduler and its worker w1 (serving ``queues``, or default), once the worker is alive: the URL, and the
    environment with ORCH_SERVER for the CLI. Both are ended on the way out."""
    sched, url = start_scheduler(tmp, env)
    worker = start_worker(tmp, env, url, "w1", concurrency=concurrency,
                          extra=[a for q in queues for a in ("--queue", q)])
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        yield url, {**env, "ORCH_SERVER": url}
    finally:
        worker.stop()
        sched.stop()


def ended(url: str, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
    """The job once it has ended (succeeded, failed or cancelled), waited for up to ``timeout``."""
    return wait_until(lambda: (j := job(url, job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
                      timeout, f"job {job_id} to end")


def hold_fsyncs(monkeypatch: Any) -> Any:
    """Make os.fdatasync wait (up to 10 s) until the returned threading.Event is set: a disk that takes its time."""
    import threading

    real = os.fdatasync
    gate = threading.Event()

    def held(fd: int) -> None:
        gate.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    return gate
