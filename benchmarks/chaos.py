"""Chaos run: real scheduler and workers, kill -9 / SIGSTOP / scheduler restart mid-flight, then audit.

    python -m benchmarks.chaos --jobs 2000 --workers 4

Every job appends one line to a ledger file each time it is executed (its own
token, the name of the worker process that ran it, the shell's pid and, when
the worker provides it, the attempt number). While jobs flow, triggered by
progress, the run

1. kill -9s one worker mid-job (a replacement joins, so capacity stays),
2. SIGSTOPs another for longer than the lease TTL, waits until the scheduler
   shows it ``lost``, then SIGCONTs it (it rejoins under a new id),
3. kill -9s the scheduler and restarts it on the same port and data dir
   (with ``--backend postgres --replicas 2``: kill -9s the replica that runs the
   reaper; the other takes the reaper, the workers, joined to both, fail over;
   the killed one is started again as a follower),
4. kill -9s a third worker mid-job (another replacement joins).

Then it waits until every acknowledged job is terminal and compares the ledger
with the store: nothing acknowledged is missing or unfinished, every extra
execution is explained by an attempt that a disruption ended, and every job's
result is its final attempt's. One summary line goes to stdout; details of any
violation go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

NON_TERMINAL = ("blocked", "scheduled", "queued", "running", "retrying")
ENDED_BY_DISRUPTION = ("lost", "handed_back", "cancelled")


# --------------------------------------------------------------------------- small helpers


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy; raise TimeoutError with what it last saw."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # the check may fail while things (re)start
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; last saw: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_tokens() -> dict[str, str]:
    """Fresh client and join tokens for a scheduler we start, as its environment (its workers inherit them)."""
    return {"ORCH_TOKEN": "orch_c_" + secrets.token_urlsafe(24), "ORCH_JOIN_TOKEN": "orch_j_" + secrets.token_urlsafe(24)}


def auth_header(url: str = "", path: str = "", method: str = "GET",
                credentials: dict[str, str] | None = None) -> dict[str, str]:
    """The Authorization header for a request to a scheduler we started (tokens from ``new_tokens()``, in our
    environment or the process's): a worker's own credential on its routes, the join token to register,
    else the client token."""
    env = _TOKENS or os.environ
    if credentials and path.startswith("/v1/workers/"):
        cred = credentials.get(path.split("/")[3])
        if cred:
            return {"Authorization": f"Bearer {cred}"}
    token = env.get("ORCH_JOIN_TOKEN") if (path.startswith("/v1/workers/") or (path == "/v1/workers" and method == "POST")) \
        else env.get("ORCH_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


_TOKENS: dict[str, str] = {}  # the tokens of the schedulers this process started (one set per process)


def use_tokens(env: dict[str, str]) -> None:
    _TOKENS.update({k: env[k] for k in ("ORCH_TOKEN", "ORCH_JOIN_TOKEN") if k in env})


def http(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One request; HTTP errors come back as (status, body), connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **auth_header()})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw and resp.headers.get_content_type() == "application/json"
                                 else raw.decode(errors="replace"))
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")
    except urllib.error.URLError as e:
        raise OSError(f"{method} {url}: {e.reason}") from None


def parse_ts(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


_STALE_RE = re.compile(r'^orch_stale_reports_total\{kind="([a-z_]+)"\}\s+([0-9.eE+-]+)$', re.M)


def stale_counts(base: str) -> dict[str, float]:
    status, text = http("GET", base + "/metrics", timeout=10)
    if status != 200 or not isinstance(text, str):
        raise OSError(f"GET /metrics answered {status}")
    return {kind: float(v) for kind, v in _STALE_RE.findall(text)}


class Proc:
    """A real orch process in its own process group, output to a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "ab")
        self.p = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def kill9(self) -> None:
        """SIGKILL the process itself (not its jobs, which run in sessions of their own)."""
        self.send(signal.SIGKILL)
        self.p.wait(10)

    def end(self, grace: float) -> None:
        """SIGCONT + SIGTERM, then SIGKILL the whole process group if it lingers."""
        if self.alive():
            with _quiet():
                os.kill(self.p.pid, signal.SIGCONT)
                os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with _quiet():
            os.killpg(self.p.pid, signal.SIGKILL)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


# --------------------------------------------------------------------------- the ledger


@dataclass
class Execution:
    token: str
    worker: str  # the worker process's name (CHAOS_WORKER)
    pid: int
    attempt: int | None  # ORCH_ATTEMPT when the worker passes it on


class Ledger:
    """Reads the append-only ledger incrementally; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rest = b""
        self._lock = threading.Lock()
        self.by_token: dict[str, list[Execution]] = {}
        self.bad_lines: list[str] = []

    def refresh(self) -> dict[str, list[Execution]]:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return self.by_token
            self._offset += len(data)
            data = self._rest + data
            *lines, self._rest = data.split(b"\n")
            for raw in lines:
                parts = raw.decode(errors="replace").split()
                if len(parts) < 3 or not parts[2].isdigit():
                    self.bad_lines.append(raw.decode(errors="replace"))
                    continue
                attempt = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else None
                self.by_token.setdefault(parts[0], []).append(Execution(parts[0], parts[1], int(parts[2]), attempt))
            return self.by_token

    def started(self) -> set[str]:
        return set(self.refresh())


# --------------------------------------------------------------------------- the report


@dataclass
class ChaosReport:
    jobs: int
    workers: int
    acked: int = 0
    unacked_batches: int = 0  # batches whose answer was lost (scheduler down); not counted as acked
    lost: int = 0  # acked jobs missing from the store or not succeeded
    duplicates: int = 0  # acked jobs executed more than once
    extra_executions: int = 0
    explained: dict[str, int] = field(default_factory=dict)  # cause -> extra executions
    unexplained: list[str] = field(default_factory=list)
    stale: dict[str, float] = field(default_factory=dict)  # orch_stale_reports_total by kind, both lifetimes
    max_recovery: float = 0.0  # disruption -> next attempt started, seconds
    max_requeue: float = 0.0  # attempt marked lost -> next attempt started, seconds
    lost_attempts: int = 0
    # Registrations the scheduler marked lost although we never touched their process:
    phantom_registrations: list[str] = field(default_factory=list)  # a resumed worker registering twice
    falsely_lost_workers: list[str] = field(default_factory=list)  # anything else (e.g. slow to come back)
    disruptions: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    wall: float = 0.0

    @property
    def stale_completions(self) -> int:
        return int(self.stale.get("completion", 0))

    def line(self) -> str:
        if self.unexplained:
            why = f"{len(self.unexplained)} NOT explained by a disruption"
        elif set(self.explained) <= {"killed", "stopped"}:
            why = "all on killed/stopped workers"
        else:
            why = "all explained: " + ", ".join(f"{n} {k}" for k, n in sorted(self.explained.items()))
        return (f"jobs acked {self.acked}, lost {self.lost}, duplicates {self.duplicates} ({why}), "
                f"stale completions refused {self.stale_completions}, max recovery {self.max_recovery:.1f} s")


# --------------------------------------------------------------------------- the run


class Chaos:
    def __init__(self, tmp: Path, jobs: int, workers: int, concurrency: int, seed: int, timings: dict[str, str],
                 deadline: float, scheduler_down: float = 0.0, backend: str = "sqlite", dsn: str = "",
                 replicas: int = 1) -> None:
        self.tmp = tmp
        self.backend = backend
        self.replicas = replicas if backend == "postgres" else 1
        self.jobs = jobs
        self.n_workers = workers
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.scheduler_down = scheduler_down
        self.data = tmp / "data"
        self.logs = tmp / "logs"
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(tmp / "ledger.txt")
        self.ports = [free_port() for _ in range(self.replicas)]
        self.port = self.ports[0]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.url = self.urls[0]  # the replica the run talks to (the one left standing, after a kill)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "CHAOS_"))}
        env.update(ORCH_DATA_DIR=str(self.data), XDG_CONFIG_HOME=str(tmp / "xdg-config"), PYTHONUNBUFFERED="1",
                   ORCH_STORAGE_SYNCHRONOUS="FULL", **timings, **new_tokens(),
                   # No metrics listeners on their fixed default ports: several workers share this machine.
                   ORCH_METRICS_SCHEDULER_PORT="0", ORCH_METRICS_WORKER_PORT="0")
        if backend == "postgres":
            env.update(ORCH_STORAGE_BACKEND="postgres", ORCH_STORAGE_DSN=dsn, ORCH_STORAGE_POLL_INTERVAL="0.5")
        use_tokens(env)
        self.env = env
        self.ttl = float(timings["ORCH_SCHEDULER_LEASE_TTL"])
        self.grace = float(timings["ORCH_SCHEDULER_RECOVERY_GRACE"])
        self.procs: list[Proc] = []
        self.scheduler: Proc | None = None
        self.replica_procs: dict[str, Proc] = {}  # label -> process, with replicas
        self.replica_slots: dict[str, int] = {}  # label -> its index in self.ports
        self.workers: dict[str, Proc] = {}
        self.report = ChaosReport(jobs=jobs, workers=workers)
        # submission
        self.batch = max(10, min(200, jobs // 10))
        self.slots = workers * concurrency
        self.topup = 2 * self.slots  # jobs released before each disruption so it lands mid-job
        self.reserve = 4 * self.topup if jobs >= 8 * self.topup else 0
        self.window = max(2 * self.batch, 3 * self.slots)  # most acked-but-not-started jobs kept waiting
        self.next_index = 0
        self.acked: dict[str, int] = {}  # token -> job id
        self.unacked_tokens: set[str] = set()
        self.submit_lock = threading.Lock()  # one batch in flight at a time
        self.state_lock = threading.Lock()  # acked, unacked_tokens, next_index
        self.disruptions_done = threading.Event()
        self.stop = threading.Event()
        self.submit_error: BaseException | None = None
        # what the disruptions did
        self.killed_ids: dict[str, float] = {}  # worker id -> kill time
        self.stopped_ids: dict[str, float] = {}  # worker id -> SIGSTOP time
        self.resumed: dict[str, float] = {}  # name of a stopped worker -> SIGCONT time
        self.phantom_ids: set[str] = set()  # extra registrations of a resumed worker
        self.scheduler_kill: tuple[float, float] | None = None  # (killed at, answering again at)
        self.stale_before: dict[str, float] = {}
        self.hit: set[str] = set()

    # ---- processes

    def start_scheduler(self, label: str, slot: int = 0, fresh: bool = False) -> Proc:
        """Start the scheduler of port slot ``slot``. Its port was free when picked, but anything on this machine
        may take it before the bind (an outgoing connection's local port, say): a first start then moves to
        another free port; a restart, which must keep its port for the workers joined to it, tries it again."""
        deadline = time.monotonic() + 30
        while True:
            port = self.ports[slot]
            log = self.logs / f"{label}.log"
            p = Proc(label, [sys.executable, "-m", "orch", "scheduler", "--port", str(port)], log, self.env)
            self.procs.append(p)
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda p=p, url=url: not p.alive() or http("GET", url + "/healthz", timeout=5)[0] == 200,
                     30, f"{label} to answer /healthz")
            if p.alive():
                self.scheduler = p
                return p
            if "address already in use" not in p.log() or time.monotonic() > deadline:
                raise RuntimeError(f"{label} exited {p.p.returncode}: {p.log()[-2000:]}")
            if fresh:
                self.ports[slot] = free_port()
                self.port = self.ports[0]
                self.urls = [f"http://127.0.0.1:{n}" for n in self.ports]
                self.url = self.urls[0]
            else:
                time.sleep(0.2)

    def start_replicas(self) -> None:
        for i in range(len(self.ports)):
            label = f"scheduler-1{'ab'[i] if i < 2 else i}"
            self.replica_procs[label] = self.start_scheduler(label, i, fresh=True)
            self.replica_slots[label] = i

    def leader(self) -> str | None:
        """The label of the live replica that logged taking the reaper last."""
        for label, p in self.replica_procs.items():
            text = p.log() if p.alive() else ""
            at = text.rfind("this scheduler runs the reaper")
            if at >= 0 and text.rfind("this scheduler no longer runs the reaper") < at:
                return label
        return None

    def start_worker(self, name: str) -> Proc:
        env = {**self.env, "CHAOS_WORKER": name}
        p = Proc(name, [sys.executable, "-m", "orch", "worker", "--join", ",".join(self.urls), "--name", name,
                        "--concurrency", str(self.concurrency)], self.logs / f"{name}.log", env)
        self.procs.append(p)
        self.workers[name] = p
        return p

    def worker_list(self) -> list[dict[str, Any]]:
        status, body = http("GET", self.url + "/v1/workers", timeout=10)
        if status != 200:
            raise OSError(f"GET /v1/workers answered {status}: {body}")
        return body["workers"]

    def alive_worker(self, name: str) -> dict[str, Any] | None:
        for w in self.worker_list():
            if w["name"] == name and w["state"] == "alive":
                return w
        return None

    # ---- submission

    def spec(self, token: str) -> dict[str, Any]:
        ledger = shlex.quote(str(self.ledger.path))
        nap = self.rng.uniform(0.01, 0.3)
        line = f'echo "{token} ${{CHAOS_WORKER:-?}} $$ ${{ORCH_ATTEMPT:-}}" >> {ledger}; sleep {nap:.3f}; echo done'
        return {"shell": line, "env": {"CHAOS_TOKEN": token}, "name": token}

    def submit(self, n: int) -> int:
        """Submit the next ``n`` jobs in one batch; retried with fresh tokens while the scheduler is away."""
        with self.submit_lock:
            n = min(n, self.jobs - self.next_index)
            while n > 0 and not self.stop.is_set():
                tokens = [f"c{self.next_index + i}-{self.rng.getrandbits(32):08x}" for i in range(n)]
                try:
                    status, body = http("POST", self.url + "/v1/jobs/batch", {"jobs": [self.spec(t) for t in tokens]})
                except OSError:
                    status, body = 0, None
                if status == 201:
                    with self.state_lock:
                        for t, j in zip(tokens, body["jobs"], strict=True):
                            self.acked[t] = j["id"]
                        self.next_index += n
                    return n
                # Not acknowledged (the scheduler may have stored it anyway): those tokens do not count.
                with self.state_lock:
                    self.unacked_tokens.update(tokens)
                    self.report.unacked_batches += 1
                if status not in (0, 500, 502, 503):
                    raise RuntimeError(f"batch submit refused: {status} {body}")
                wait_for(lambda: http("GET", self.url + "/healthz", timeout=2)[0] == 200, 60,
                         "the scheduler to come back for submissions")
            return 0

    def acked_tokens(self) -> list[str]:
        with self.state_lock:
            return list(self.acked)

    def backlog(self) -> int:
        started = self.ledger.started()
        return sum(1 for t in self.acked_tokens() if t not in started)

    def progress(self) -> float:
        started = self.ledger.started()
        return sum(1 for t in self.acked_tokens() if t in started) / self.jobs

    def submitter(self) -> None:
        try:
            while not self.stop.is_set() and self.next_index < self.jobs:
                limit = self.jobs if self.disruptions_done.is_set() else self.jobs - self.reserve
                if self.next_index >= limit or self.backlog() >= self.window:
                    self.stop.wait(0.05)
                    continue
                self.submit(min(self.batch, limit - self.next_index))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.submit_error = e

    def top_up(self) -> None:
        """Make sure work is waiting, so the next disruption lands mid-job."""
        if self.backlog() < self.slots:
            with self.state_lock:
                self.reserve = max(0, self.reserve - self.topup)
            self.submit(self.topup)
        wait_for(lambda: self.backlog() > 0 or self.next_index >= self.jobs, 30, "a backlog")

    def when_progress(self, fraction: float, what: str) -> None:
        """Wait until ``fraction`` of the jobs started, or the held-back reserve is all that is left."""
        def ready() -> bool:
            if self.submit_error:
                raise RuntimeError(f"submitter failed: {self.submit_error!r}")
            if self.progress() >= fraction:
                return True
            return self.next_index >= self.jobs - self.reserve and self.backlog() < self.slots

        wait_for(ready, self.deadline, f"progress {fraction:.0%} before {what}", interval=0.05)

    def busy_worker(self, name: str) -> dict[str, Any]:
        self.top_up()
        return wait_for(lambda: (w := self.alive_worker(name)) and w["running"] > 0 and w, 30,
                        f"worker {name} to be running a job")

    # ---- disruptions

    def kill_worker(self, name: str, replacement: str) -> None:
        w = self.busy_worker(name)
        self.workers[name].kill9()
        t = time.time()
        self.killed_ids[w["id"]] = t
        self.report.disruptions.append(f"kill -9 worker {name} ({w['id']}) with {w['running']} running")
        self.start_worker(replacement)

    def stop_worker(self, name: str) -> None:
        w = self.busy_worker(name)
        self.workers[name].send(signal.SIGSTOP)
        t = time.time()
        self.stopped_ids[w["id"]] = t
        wait_for(lambda: any(x["id"] == w["id"] and x["state"] == "lost" for x in self.worker_list()),
                 self.ttl * 4 + 20, f"the scheduler to mark stopped worker {name} lost")
        self.workers[name].send(signal.SIGCONT)
        self.resumed[name] = time.time()
        self.report.disruptions.append(
            f"SIGSTOP worker {name} ({w['id']}) with {w['running']} running for {time.time() - t:.1f}s (marked lost)")

    def kill_leader_replica(self) -> None:
        """kill -9 the replica that runs the reaper; the other must take it; the killed one comes back."""
        self.top_up()
        wait_for(lambda: any(w["running"] > 0 for w in self.worker_list()), 30, "a running job")
        label = wait_for(self.leader, 30, "a replica to run the reaper")
        victim = self.replica_procs[label]
        slot = self.replica_slots[label]
        port = self.ports[slot]
        others = [u for u in self.urls if not u.endswith(f":{port}")]
        self.url = others[0]
        self.stale_before = stale_counts(f"http://127.0.0.1:{port}")  # its counters die with it
        victim.kill9()
        killed = time.time()
        new = wait_for(lambda: (lead := self.leader()) not in (None, label) and lead, self.deadline,
                       "another replica to take the reaper")
        took = time.time()
        self.scheduler_kill = (killed, took)
        again = label + "-again"
        del self.replica_procs[label]
        self.replica_procs[again] = self.start_scheduler(again, slot)
        self.replica_slots[again] = slot
        self.report.disruptions.append(f"kill -9 leader replica {label}; {new} ran the reaper after {took - killed:.1f}s")

    def restart_scheduler(self) -> None:
        if self.replicas > 1:
            self.kill_leader_replica()
            return
        self.top_up()
        wait_for(lambda: any(w["running"] > 0 for w in self.worker_list()), 30, "a running job")
        self.stale_before = stale_counts(self.url)
        assert self.scheduler is not None
        self.scheduler.kill9()
        killed = time.time()
        if self.scheduler_down > 0:  # an outage of a chosen length (default none: restart at once)
            self.stop.wait(self.scheduler_down)
        self.start_scheduler("scheduler-2")
        back = time.time()
        self.scheduler_kill = (killed, back)
        self.report.disruptions.append(f"kill -9 scheduler, answering again after {back - killed:.1f}s")

    # ---- the whole run

    def victim(self) -> str:
        """A live worker not hit yet (the first ones first); with too few workers, any live one."""
        live = [n for n, p in self.workers.items() if p.alive()]
        fresh = [n for n in live if n not in self.hit]
        name = (fresh or live)[0]
        self.hit.add(name)
        return name

    def run(self) -> ChaosReport:
        t0 = time.monotonic()
        submitter = threading.Thread(target=self.submitter, name="submitter", daemon=True)
        try:
            if self.replicas > 1:
                self.start_replicas()
            else:
                self.start_scheduler("scheduler-1", fresh=True)
            names = [f"w{i + 1}" for i in range(self.n_workers)]
            for n in names:
                self.start_worker(n)
            wait_for(lambda: all(self.alive_worker(n) for n in names), 30, "every worker to join")
            submitter.start()
            self.when_progress(0.15, "the first kill")
            self.kill_worker(self.victim(), "r1")
            self.when_progress(0.30, "the SIGSTOP")
            self.stop_worker(self.victim())
            self.when_progress(0.45, "the scheduler kill")
            self.restart_scheduler()
            self.when_progress(0.60, "the second kill")
            self.kill_worker(self.victim(), "r2")
            self.disruptions_done.set()
            wait_for(lambda: self.next_index >= self.jobs or self.submit_error, self.deadline, "every job submitted")
            if self.submit_error:
                raise RuntimeError(f"submitter failed: {self.submit_error!r}")
            self.wait_terminal()
            self.wait_killed_lost()
            self.audit()
        except Exception as e:  # the run could not finish: that is a result too, with the logs kept
            self.report.violations.append(f"run aborted: {type(e).__name__}: {e}")
        finally:
            self.stop.set()
            self.disruptions_done.set()
            if submitter.is_alive():
                submitter.join(timeout=30)
            self.shutdown()
            self.report.wall = time.monotonic() - t0
        return self.report

    def wait_terminal(self) -> None:
        def settled() -> bool:
            for state in NON_TERMINAL:
                status, body = http("GET", f"{self.url}/v1/jobs?state={state}&limit=1", timeout=10)
                if status != 200 or body["jobs"]:
                    return False
            return True

        try:
            wait_for(settled, self.deadline, "every job to end", interval=0.1)
        except TimeoutError as e:
            self.report.violations.append(str(e))

    def wait_killed_lost(self) -> None:
        """Give the reaper its time to mark every killed worker lost before the audit looks.

        The last jobs can end sooner than a killed worker's silence runs out (a
        kill just after its report, or within the grace after a scheduler
        restart): lost is due a lease TTL after its last heartbeat, or after the
        grace, not when the jobs are done. The audit says which ones never were.
        """
        def all_lost() -> bool:
            return all(w["state"] == "lost" for w in self.worker_list() if w["id"] in self.killed_ids)

        with contextlib.suppress(TimeoutError):
            wait_for(all_lost, self.ttl + self.grace + 10, "every killed worker to be marked lost", interval=0.1)

    def shutdown(self) -> None:
        # Workers first, while the scheduler can still hear their goodbye; every process ends.
        schedulers = {id(self.scheduler), *map(id, self.replica_procs.values())}
        live = [p for p in self.procs if id(p) not in schedulers]
        for p in live:
            if p.alive():
                with _quiet():
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGTERM)
        for p in live:
            p.end(grace=10)
        for p in self.procs:
            p.end(grace=10)

    # ---- the audit

    def fetch_jobs(self) -> dict[str, dict[str, Any] | None]:
        def one(item: tuple[str, int]) -> tuple[str, dict[str, Any] | None]:
            token, job_id = item
            status, body = http("GET", f"{self.url}/v1/jobs/{job_id}", timeout=30)
            if status == 404:
                return token, None
            if status != 200:
                raise OSError(f"GET /v1/jobs/{job_id} answered {status}: {body}")
            return token, body

        with ThreadPoolExecutor(8) as pool:
            return dict(pool.map(one, self.acked.items()))

    def audit(self) -> None:
        r = self.report
        r.acked = len(self.acked)
        after: dict[str, float] = {}
        for url in (self.urls if self.replicas > 1 else [self.url]):  # every replica counts its own
            for k, v in stale_counts(url).items():
                after[k] = after.get(k, 0) + v
        r.stale = {k: self.stale_before.get(k, 0) + after.get(k, 0) for k in set(self.stale_before) | set(after)}
        workers = self.worker_list()
        names = {w["id"]: w["name"] for w in workers}
        disrupted = set(self.killed_ids) | set(self.stopped_ids)
        for w in workers:
            if w["id"] in self.killed_ids and w["state"] != "lost":
                r.violations.append(f"killed worker {w['name']} ({w['id']}) is {w['state']}, not lost")
            if w["state"] != "lost" or w["id"] in disrupted:
                continue
            resumed = self.resumed.get(w["name"])
            registered = parse_ts(w["registered_at"]) or 0
            if resumed is not None and resumed - 1 <= registered <= resumed + self.ttl:
                # The resumed process joined again more than once; the spare id never heartbeats.
                r.phantom_registrations.append(f"{w['name']} ({w['id']})")
                self.phantom_ids.add(w["id"])
            else:
                r.falsely_lost_workers.append(f"{w['name']} ({w['id']})")
        executions = self.ledger.refresh()
        if self.ledger.bad_lines:
            r.violations.append(f"{len(self.ledger.bad_lines)} malformed ledger lines, e.g. {self.ledger.bad_lines[0]!r}")
        known = set(self.acked) | self.unacked_tokens
        strangers = [t for t in executions if t not in known]
        if strangers:
            r.violations.append(f"{len(strangers)} ledger tokens that were never submitted, e.g. {strangers[0]}")
        jobs = self.fetch_jobs()
        for token, job in jobs.items():
            job_id = self.acked[token]
            if job is None:
                r.lost += 1
                r.violations.append(f"job {job_id} ({token}) was acknowledged but is not in the store")
                continue
            if job["state"] != "succeeded":
                r.lost += 1
                r.violations.append(f"job {job_id} ended {job['state']} (attempt {job['attempt']}): {job['error']}")
                if job["state"] in NON_TERMINAL:
                    continue
            self.audit_job(token, job, executions.get(token, []), names)

    def cause(self, a: dict[str, Any]) -> str | None:
        """Which disruption ended this attempt early, if any."""
        if a["state"] not in ENDED_BY_DISRUPTION:
            return None
        if a["worker"] in self.killed_ids:
            return "killed"
        if a["worker"] in self.stopped_ids:
            return "stopped"
        if self.scheduler_kill:
            started, finished = parse_ts(a["started_at"]), parse_ts(a["finished_at"])
            if started is not None and started <= self.scheduler_kill[1] and (finished is None or finished >= self.scheduler_kill[0]):
                return "scheduler restart"
        return None

    def disruption_time(self, a: dict[str, Any]) -> float | None:
        if a["worker"] in self.killed_ids:
            return self.killed_ids[a["worker"]]
        if a["worker"] in self.stopped_ids:
            return self.stopped_ids[a["worker"]]
        if self.scheduler_kill and (parse_ts(a["started_at"]) or 0) <= self.scheduler_kill[0]:
            return self.scheduler_kill[0]
        return None

    def audit_job(self, token: str, job: dict[str, Any], runs: list[Execution], names: dict[str, str]) -> None:
        r = self.report
        jid = job["id"]
        attempts = job["attempts"]
        if not attempts:
            r.violations.append(f"job {jid} is {job['state']} without any attempt")
            return
        final = attempts[-1]
        res = job["result"] or {}
        if final["attempt"] != job["attempt"] or res.get("attempt") != job["attempt"]:
            r.violations.append(f"job {jid}: result is from attempt {res.get('attempt')}, job is at attempt "
                                f"{job['attempt']}, last attempt row {final['attempt']}")
        if job["state"] == "succeeded":
            if final["state"] != "succeeded":
                r.violations.append(f"job {jid} succeeded but its final attempt {final['attempt']} is {final['state']}")
            if job["worker"] != final["worker"]:
                r.violations.append(f"job {jid}: worker {job['worker']} but final attempt ran on {final['worker']}")
            if res.get("exit_code") != 0 or res.get("stdout") != "done\n":
                r.violations.append(f"job {jid}: final result {res!r} is not the success of attempt {final['attempt']}")
        for a in attempts[:-1]:
            if a["state"] not in ENDED_BY_DISRUPTION + ("failed", "timed_out"):
                r.violations.append(f"job {jid}: superseded attempt {a['attempt']} is {a['state']}")
        for prev, nxt in zip(attempts, attempts[1:], strict=False):
            if prev["state"] != "lost":
                continue
            r.lost_attempts += 1
            started = parse_ts(nxt["started_at"])
            finished = parse_ts(prev["finished_at"])
            if started is None:
                continue
            if finished is not None:
                r.max_requeue = max(r.max_requeue, started - finished)
            ref = self.disruption_time(prev) or finished
            if ref is not None:
                r.max_recovery = max(r.max_recovery, started - ref)
        if len(runs) > 1:
            r.duplicates += 1
        # Match every execution to an attempt: the final one first, then attempts a disruption ended.
        free = {a["attempt"]: a for a in attempts}
        unmatched: list[Execution] = []
        for e in sorted(runs, key=lambda e: e.attempt is None):
            if e.attempt is not None:
                a = free.pop(e.attempt, None)
                if a is None or names.get(a["worker"]) != e.worker:
                    r.violations.append(f"job {jid}: execution on {e.worker} claims attempt {e.attempt}, "
                                        f"which {'ran on ' + str(names.get(a['worker'])) if a else 'is not free'}")
                    continue
                if a is not final:
                    self.explain(jid, a, e, r)
                continue
            unmatched.append(e)
        if unmatched and final["attempt"] in free and any(e.worker == names.get(final["worker"]) for e in unmatched):
            e = next(e for e in unmatched if e.worker == names.get(final["worker"]))
            unmatched.remove(e)
            del free[final["attempt"]]
        for e in unmatched:
            candidates = [a for a in free.values() if names.get(a["worker"]) == e.worker]
            candidates.sort(key=lambda a: self.cause(a) is None)
            if not candidates:
                r.unexplained.append(f"job {jid}: an execution on {e.worker} (pid {e.pid}) matches no attempt")
                r.extra_executions += 1
                continue
            a = free.pop(candidates[0]["attempt"])
            self.explain(jid, a, e, r)
        if job["state"] == "succeeded" and final["attempt"] in free:
            r.violations.append(f"job {jid} succeeded on {names.get(final['worker'])} attempt {final['attempt']} "
                                "without a ledger line from it")

    def explain(self, jid: int, a: dict[str, Any], e: Execution, r: ChaosReport) -> None:
        r.extra_executions += 1
        cause = self.cause(a)
        if cause is None:
            r.unexplained.append(f"job {jid}: attempt {a['attempt']} on {e.worker} ({a['worker']}) ran and ended "
                                 f"{a['state']} ({a['error']}) without a disruption to explain it")
        else:
            r.explained[cause] = r.explained.get(cause, 0) + 1


DEFAULT_TIMINGS = {
    "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.4",
    "ORCH_SCHEDULER_LEASE_TTL": "2.5",
    "ORCH_SCHEDULER_RECOVERY_GRACE": "3",
    "ORCH_RETRY_BACKOFF_BASE": "0.1",
    "ORCH_RETRY_MAX_ATTEMPTS": "10",
    "ORCH_WORKER_DRAIN_GRACE": "5",
    "ORCH_WORKER_KILL_GRACE": "1",
}


def run_chaos(tmp_dir: Path, jobs: int, workers: int, *, concurrency: int = 4, seed: int | None = None,
              timings: dict[str, str] | None = None, deadline: float = 300.0,
              scheduler_down: float = 0.0, backend: str = "sqlite", dsn: str = "", replicas: int = 1) -> ChaosReport:
    """Run the chaos scenario with all state in ``tmp_dir`` (PostgreSQL: in ``dsn``); every process it starts
    is ended."""
    if jobs < 1 or workers < 1:
        raise ValueError("jobs and workers must be at least 1")
    if backend == "postgres" and not dsn:
        raise ValueError("--backend postgres needs --dsn (an empty database)")
    chaos = Chaos(Path(tmp_dir), jobs, workers, concurrency, seed if seed is not None else random.randrange(1 << 30),
                  {**DEFAULT_TIMINGS, **(timings or {})}, deadline, scheduler_down, backend, dsn, replicas)
    report = chaos.run()
    if report.unexplained:
        report.violations.append(f"{len(report.unexplained)} duplicate executions not explained by a disruption")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4, help="jobs each worker runs at once")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", type=Path, default=None, help="keep all state and logs here (default: a temp dir)")
    ap.add_argument("--deadline", type=float, default=600.0, help="longest wait for any one phase, in seconds")
    ap.add_argument("--scheduler-down", type=float, default=0.0,
                    help="seconds the killed scheduler stays down before its restart (default: restart at once)")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--dsn", default="", help="with --backend postgres: an empty PostgreSQL database")
    ap.add_argument("--replicas", type=int, default=1, help="with --backend postgres: schedulers sharing it")
    args = ap.parse_args(argv)
    more = {"backend": args.backend, "dsn": args.dsn, "replicas": args.replicas}
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(args.dir, args.jobs, args.workers, concurrency=args.concurrency, seed=args.seed,
                           deadline=args.deadline,
                           scheduler_down=args.scheduler_down, **more)
        where = args.dir
    else:
        where = Path(tempfile.mkdtemp(prefix="orch-chaos-"))
        report = run_chaos(where, args.jobs, args.workers, concurrency=args.concurrency, seed=args.seed,
                           deadline=args.deadline,
                           scheduler_down=args.scheduler_down, **more)
    print(f"{args.backend}, {args.replicas if args.backend == 'postgres' else 1} scheduler(s): {report.line()}", flush=True)
    for d in report.disruptions:
        print(f"  disruption: {d}", file=sys.stderr)
    print(f"  extra executions {report.extra_executions} ({report.explained}), lost attempts {report.lost_attempts}, "
          f"max requeue {report.max_requeue:.1f} s, stale reports {report.stale}, wall {report.wall:.1f} s",
          file=sys.stderr)
    if report.phantom_registrations:
        print(f"  a resumed worker registered more than once; spare ids marked lost: "
              f"{', '.join(report.phantom_registrations)}", file=sys.stderr)
    if report.falsely_lost_workers:
        print(f"  workers marked lost that were never disrupted: {', '.join(report.falsely_lost_workers)}",
              file=sys.stderr)
    for v in report.violations[:50]:
        print(f"  VIOLATION: {v}", file=sys.stderr)
    for u in report.unexplained[:50]:
        print(f"  UNEXPLAINED: {u}", file=sys.stderr)
    if report.violations:
        print(f"  state and logs kept in {where}", file=sys.stderr)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
