"""The benchmarks themselves. Each one starts its own processes in fresh temp dirs and returns table rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp

from benchmarks.chaos import auth_header
from benchmarks.common import (
    NON_TERMINAL,
    TERMINAL,
    Cluster,
    Row,
    Workdir,
    median,
    percentile,
    python_cmd,
    read_json_line,
)
from benchmarks.peer import Huey

# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    repeats: int  # runs of each timed figure; the table shows the median
    shell_jobs: int
    concurrency: int  # the worker's slots, Huey's threads, the raw limit's processes in flight
    control_jobs: int
    submit_clients: int
    submit_requests: int
    latency_runs: int
    idle_s: float
    scale_jobs: int
    scale_probe_batches: int  # batches of 1,000 for the submit rate against the big and the empty store
    claim_samples: int
    sim_workers: int
    sim_settle: float
    sim_window: float
    sim_jobs: int
    sim_rate: float
    list_samples: int  # job listings timed per filter (scale)
    big_jobs: int  # jobs with a spec near scheduler.max_spec_bytes and megabytes of output (big)
    big_seconds: float  # how long the big requests are served while /healthz is probed
    deep_queue: int  # jobs queued for the backends' claim latency (--backend postgres)
    delayed_jobs: int = 200  # delayed jobs per run (delayed): half run_at in one batch, half delays one by one
    delayed_window: float = 10.0  # seconds their due times are spread over
    dag_chain: int = 100  # jobs of the chain (dag): each needs the one before
    dag_fan: int = 10_000  # jobs of the fan-out/fan-in (dag): a root, its legs, a join that needs them all
    cron_schedules: int = 1000  # schedules every minute (cron), whose firing's CPU is measured
    cron_minutes: int = 2  # whole minutes they are measured over
    cron_fast: int = 20  # schedules every second, for lateness
    cron_seconds: float = 10.0
    python_jobs: int = 5000  # no-op Python tasks (python), against as many Huey function tasks
    docker_runs: int = 20  # `true` containers per run (docker), orch's and bare docker run's


FULL = Sizes(repeats=3, shell_jobs=2000, concurrency=8, control_jobs=20_000, submit_clients=64, submit_requests=12_800,
             latency_runs=300, idle_s=60.0, scale_jobs=1_000_000, scale_probe_batches=10, claim_samples=200,
             sim_workers=500, sim_settle=4.0, sim_window=20.0, sim_jobs=200, sim_rate=20.0,
             list_samples=100, big_jobs=40, big_seconds=10.0, deep_queue=100_000)
SMOKE = Sizes(repeats=1, shell_jobs=50, concurrency=8, control_jobs=500, submit_clients=8, submit_requests=200,
              latency_runs=20, idle_s=1.0, scale_jobs=10_000, scale_probe_batches=2, claim_samples=20,
              sim_workers=20, sim_settle=0.5, sim_window=2.0, sim_jobs=10, sim_rate=10.0,
              list_samples=5, big_jobs=3, big_seconds=1.0, deep_queue=2_000, delayed_jobs=20, delayed_window=1.0,
              dag_chain=10, dag_fan=200, cron_schedules=20, cron_minutes=0, cron_fast=3, cron_seconds=2.0,
              python_jobs=200, docker_runs=3)
SIZES = {"full": FULL, "smoke": SMOKE}


@dataclass
class Context:
    sizes: Sizes
    size_name: str
    huey: Huey
    keep: bool = False
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)

    def workdir(self, name: str) -> Workdir:
        return Workdir(name, keep=self.keep)


# --------------------------------------------------------------------------- HTTP


class Http:
    """A small aiohttp client for the benchmarks: JSON in, JSON out, any error status raises."""

    def __init__(self, url: str, connections: int = 0) -> None:
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=120))
        self.credentials: dict[str, str] = {}  # worker id -> the credential its registration returned

    async def __aenter__(self) -> Http:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body, separators=(",", ":")) if body is not None else None
        headers = {"Content-Type": "application/json", **auth_header(self.url, path, method, self.credentials)}
        async with self.session.request(method, self.url + path, data=data, params=params, headers=headers) as r:
            raw = await r.read()
            if r.status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {r.status}: {raw[:300]!r}")
            reply = json.loads(raw) if raw else None
            if path == "/v1/workers" and method == "POST" and isinstance(reply, dict) and reply.get("credential"):
                self.credentials[reply["worker_id"]] = reply["credential"]
            return reply

    async def submit_batches(self, spec: dict[str, Any], n: int, batch: int, in_flight: int = 1) -> list[int]:
        """Submit ``n`` copies of ``spec`` in batches, ``in_flight`` requests at a time; their ids in order."""
        sizes = [min(batch, n - i) for i in range(0, n, batch)]
        out: list[list[int]] = [[] for _ in sizes]
        sem = asyncio.Semaphore(in_flight)

        async def one(k: int) -> None:
            async with sem:
                reply = await self.call("POST", "/v1/jobs/batch", {"jobs": [spec] * sizes[k]})
                out[k] = [j["id"] for j in reply["jobs"]]

        await asyncio.gather(*(one(k) for k in range(len(sizes))))
        return [i for ids in out for i in ids]

    async def wait_job(self, job_id: int, timeout: float = 30.0) -> dict[str, Any]:
        while True:
            job = await self.call("GET", f"/v1/jobs/{job_id}/wait", params={"timeout": str(timeout)})
            if job["state"] in TERMINAL:
                return job

    async def states_in(self, states: tuple[str, ...], lo: int, hi: int,
                        queue: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Jobs with ids in [lo, hi] in each of ``states``, paged newest first through GET /v1/jobs."""
        found: dict[str, list[dict[str, Any]]] = {}
        for state in states:
            rows: list[dict[str, Any]] = []
            cursor: str | None = str(hi + 1)
            while cursor is not None:
                params = {"state": state, "limit": "1000", "cursor": cursor, **({"queue": queue} if queue else {})}
                page = await self.call("GET", "/v1/jobs", params=params)
                rows += [j for j in page["jobs"] if lo <= j["id"] <= hi]
                cursor = page["next_cursor"]
                if page["jobs"] and page["jobs"][-1]["id"] < lo:
                    break
            found[state] = rows
        return found

    async def wait_all(self, ids: list[int]) -> dict[str, int]:
        """Wait until every job in ``ids`` (a contiguous range) ended, without polling hard.

        Long-poll the newest job's wait, then read the jobs' end states back by
        pages; if some are still going, long-poll the oldest of them and look again.
        A job seen ended stays ended, so the count of ended jobs is exact.
        """
        lo, hi = min(ids), max(ids)
        await self.wait_job(hi)
        while True:
            ended = await self.states_in(TERMINAL, lo, hi)
            counts = {s: len(rows) for s, rows in ended.items()}
            if sum(counts.values()) >= len(ids):
                return counts
            going = await self.states_in(NON_TERMINAL, lo, hi)
            pending = [j["id"] for rows in going.values() for j in rows]
            if pending:
                await self.wait_job(min(pending))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- shell throughput and the raw limit


ECHO = {"command": ["echo", "hello"]}


async def _orch_shell(url: str, n: int) -> dict[str, Any]:
    async with Http(url) as api:
        t0 = time.perf_counter()
        ids = await api.submit_batches(ECHO, n, 1000)
        submitted = time.perf_counter() - t0
        counts = await api.wait_all(ids)
        elapsed = time.perf_counter() - t0
        if counts.get("succeeded") != n:
            raise RuntimeError(f"not every echo job succeeded: {counts}")
        sample = await api.call("GET", f"/v1/jobs/{ids[-1]}")
        if (sample["result"] or {}).get("stdout") != "hello\n":
            raise RuntimeError(f"job {ids[-1]} did not print hello: {sample['result']}")
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "submit_s": submitted}


def orch_shell_once(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    with ctx.workdir("shell") as tmp, Cluster(tmp) as c:
        c.start_scheduler()
        worker = c.start_worker("w1", s.concurrency)
        c.wait_workers(1)
        assert c.scheduler is not None
        cpu0 = (_cpu(c.scheduler.pid), _cpu(worker.pid))
        out = run(_orch_shell(c.url, s.shell_jobs))
        out["scheduler_cpu_s"] = _cpu(c.scheduler.pid) - cpu0[0]
        out["worker_cpu_s"] = _cpu(worker.pid) - cpu0[1]  # its own, not its jobs' (those are its children)
        return out


def raw_once(ctx: Context) -> dict[str, Any]:
    import subprocess

    s = ctx.sizes
    p = subprocess.run([*python_cmd(), "-m", "benchmarks.raw", "--n", str(s.shell_jobs), "--inflight",
                        str(s.concurrency)], capture_output=True, text=True, timeout=600,
                       cwd=str(Path(__file__).resolve().parent.parent))
    if p.returncode != 0:
        raise RuntimeError(f"benchmarks.raw exited {p.returncode}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["raw"]


def huey_once(ctx: Context, mode: str, n: int) -> dict[str, Any] | None:
    """One run of the Huey peer (benchmarks/peer_huey.py MODE): its figures, or None if it is unavailable or
    failed (the peer failing must not cost orch's figures)."""
    if not ctx.huey.ensure(ctx.log):
        return None
    with ctx.workdir(f"huey-{mode}") as tmp:
        try:
            lines = ctx.huey.run(mode, tmp, ["--n", str(n), "--threads", str(ctx.sizes.concurrency)], timeout=900)
            return next(line[mode] for line in lines if mode in line)
        except (RuntimeError, StopIteration) as e:
            ctx.log(f"{mode}: the Huey run failed: {e}")
            return None


def huey_shell_once(ctx: Context) -> dict[str, Any] | None:
    return huey_once(ctx, "shell", ctx.sizes.shell_jobs)


def bench_shell(ctx: Context) -> list[Row]:
    s = ctx.sizes
    orch_runs, huey_runs, raw_runs = [], [], []
    for i in range(s.repeats):
        ctx.log(f"shell: run {i + 1}/{s.repeats}: raw spawns")
        raw_runs.append(raw_once(ctx))
        ctx.log(f"shell: run {i + 1}/{s.repeats}: orch")
        orch_runs.append(orch_shell_once(ctx))
        ctx.log(f"shell: run {i + 1}/{s.repeats}: huey")
        h = huey_shell_once(ctx)
        if h is not None:
            huey_runs.append(h)
    orch_rate = median([r["rate"] for r in orch_runs])
    raw_rate = median([r["rate"] for r in raw_runs])
    huey_rate = median([r["rate"] for r in huey_runs]) if huey_runs else None
    n = f"{s.shell_jobs:,}"
    rows = [
        Row(f"shell throughput: {n} x echo hello, 1 worker x {s.concurrency}", ">= 1.6x Huey", orch_rate, "/s",
            peer=huey_rate, peer_label=f"Huey {ctx.huey.version}".strip(),
            peer_note="" if huey_rate is not None else (ctx.huey.unavailable or "peer failed: see the log"),
            ratio_goal=1.6, detail={"orch": orch_runs, "huey": huey_runs}),
        Row(f"overhead vs raw spawn limit ({s.concurrency} in flight)", ">= 85 % of raw", orch_rate, "/s",
            peer=raw_rate, peer_label="raw", ratio_goal=0.85, detail={"raw": raw_runs}),
    ]
    return rows


# --------------------------------------------------------------------------- control plane


async def _control_plane(url: str, n: int, batch: int = 1000, lease_max: int = 1000,
                         queue: str = "default") -> dict[str, Any]:
    async with Http(url) as api:
        reg = await api.call("POST", "/v1/workers", {"name": "bench", "hostname": "bench", "queues": [queue],
                                                     "concurrency": 10_000})
        wid = reg["worker_id"]
        interval = float(reg["heartbeat_interval"])
        holding: dict[tuple[int, int], None] = {}
        completed = 0
        refused = 0
        requests = {"submit": 0, "lease": 0, "complete": 0, "heartbeat": 0}
        done = asyncio.Event()

        async def heartbeat() -> None:
            while not done.is_set():
                await asyncio.sleep(interval)
                running = [{"job_id": j, "attempt": a} for j, a in holding]
                await api.call("POST", f"/v1/workers/{wid}/heartbeat", {"running": running, "draining": False})
                requests["heartbeat"] += 1

        async def complete(jobs: list[dict[str, Any]]) -> None:
            nonlocal completed, refused
            results = [{"job_id": j["job_id"], "attempt": j["attempt"], "outcome": "succeeded", "exit_code": 0,
                        "duration": 0.0} for j in jobs]
            answers = (await api.call("POST", f"/v1/workers/{wid}/complete", {"results": results}))["results"]
            requests["complete"] += 1
            refused += sum(1 for a in answers if not a["accepted"])
            for j in jobs:
                holding.pop((j["job_id"], j["attempt"]), None)
            completed += len(jobs)
            if completed >= n:
                done.set()

        async def submitter() -> None:
            for i in range(0, n, batch):
                await api.call("POST", "/v1/jobs/batch",
                               {"jobs": [{"command": ["true"], "queue": queue}] * min(batch, n - i)})
                requests["submit"] += 1

        async def leaser() -> None:
            leased = 0
            pending: set[asyncio.Task[None]] = set()
            while leased < n:
                jobs = (await api.call("POST", f"/v1/workers/{wid}/lease",
                                       {"max": lease_max, "queues": [queue], "wait": 5}))["jobs"]
                requests["lease"] += 1
                leased += len(jobs)
                for j in jobs:
                    holding[(j["job_id"], j["attempt"])] = None
                if jobs:
                    t = asyncio.create_task(complete(jobs))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                    if len(pending) >= 4:
                        await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
            if pending:
                await asyncio.gather(*pending)

        beat = asyncio.create_task(heartbeat())
        t0 = time.perf_counter()
        try:
            await asyncio.gather(submitter(), leaser())
            elapsed = time.perf_counter() - t0
        finally:
            done.set()
            beat.cancel()
        if refused:
            raise RuntimeError(f"{refused} completions were refused")
        left = await api.states_in(("queued", "running"), 1, 10**12, queue=queue)
        if any(left.values()):
            raise RuntimeError(f"jobs left unfinished: { {k: len(v) for k, v in left.items()} }")
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "requests": requests}


def bench_control(ctx: Context) -> list[Row]:
    s = ctx.sizes
    runs = []
    for i in range(s.repeats):
        ctx.log(f"control plane: run {i + 1}/{s.repeats}")
        with ctx.workdir("control") as tmp, Cluster(tmp) as c:
            c.start_scheduler()
            assert c.scheduler is not None
            cpu0 = _cpu(c.scheduler.pid)
            out = run(_control_plane(c.url, s.control_jobs))
            out["scheduler_cpu_s"] = _cpu(c.scheduler.pid) - cpu0
            runs.append(out)
    rate = median([r["rate"] for r in runs])
    return [Row(f"control plane: {s.control_jobs:,} jobs submit -> lease -> complete", ">= 10,000/s", rate, "/s",
                goal=10_000, detail={"runs": runs})]


def _cpu(pid: int) -> float:
    from benchmarks.common import cpu_seconds

    return cpu_seconds(pid)


# --------------------------------------------------------------------------- single submits


async def _single_submits(url: str, clients: int, total: int) -> dict[str, Any]:
    per = total // clients
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(clients)]
    body = json.dumps({"command": ["true"], "queue": "parked"}).encode()
    headers = {"Content-Type": "application/json", **auth_header(url, "/v1/jobs", "POST")}
    acked = 0
    errors: list[str] = []

    async def one(s: aiohttp.ClientSession) -> None:
        nonlocal acked
        async with s.post(url + "/v1/jobs", data=body, headers=headers) as r:
            await r.read()
            if r.status == 201:
                acked += 1
            else:
                errors.append(f"HTTP {r.status}")

    async def client(s: aiohttp.ClientSession) -> None:
        for _ in range(per):
            await one(s)

    try:
        await asyncio.gather(*(one(s) for s in sessions))  # connect every client first
        acked = 0
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.gather(*(client(s) for s in sessions))
        elapsed = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    if errors:
        raise RuntimeError(f"{len(errors)} submits failed, e.g. {errors[0]}")
    client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return {"clients": clients, "requests": per * clients, "acked": acked, "elapsed": elapsed,
            "rate": acked / elapsed, "client_cpu_pct": 100 * client_cpu / elapsed}


def bench_submits(ctx: Context) -> list[Row]:
    s = ctx.sizes
    runs = []
    for i in range(s.repeats):
        ctx.log(f"single submits: run {i + 1}/{s.repeats}")
        with ctx.workdir("submits") as tmp, Cluster(tmp) as c:
            c.start_scheduler()
            assert c.scheduler is not None
            cpu0 = _cpu(c.scheduler.pid)
            out = run(_single_submits(c.url, s.submit_clients, s.submit_requests))
            out["scheduler_cpu_s"] = _cpu(c.scheduler.pid) - cpu0
            runs.append(out)
    rate = median([r["rate"] for r in runs])
    return [Row(f"single submits: {s.submit_clients} clients, 1 job per request", ">= 3,000/s", rate, "/s",
                goal=3000, detail={"runs": runs})]


# --------------------------------------------------------------------------- latency at idle


async def _round_trip(api: Http) -> float:
    t0 = time.perf_counter()
    job = await api.call("POST", "/v1/jobs", {"command": ["true"]})
    done = await api.call("GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": "30"})
    ms = (time.perf_counter() - t0) * 1000
    if done["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {done['state']}: {done.get('error')}")
    return ms


async def _orch_latency(url: str, n: int) -> list[float]:
    async with Http(url) as api:
        for _ in range(10):
            await _round_trip(api)
        return [await _round_trip(api) for _ in range(n)]


async def _orch_after_idle(url: str) -> float:
    async with Http(url) as api:  # a new client, as `orch run --wait` would be
        return await _round_trip(api)


def bench_latency(ctx: Context) -> list[Row]:
    s = ctx.sizes
    huey_ok = ctx.huey.ensure(ctx.log)
    huey_lat: list[float] = []
    huey_idle: float | None = None
    with ctx.workdir("latency") as tmp, Cluster(tmp) as c:
        c.start_scheduler()
        c.start_worker("w1", s.concurrency)
        c.wait_workers(1)
        ctx.log(f"latency: {s.latency_runs} sequential round trips (orch)")
        samples = run(_orch_latency(c.url, s.latency_runs))
        idle_from = time.monotonic()
        peer = None
        if huey_ok:
            # Huey's round trips run while orch idles; both then idle the same time before their last one.
            ctx.log(f"latency: {s.latency_runs} sequential round trips (huey), then {s.idle_s:g} s idle")
            peer = ctx.huey.start("latency", tmp / "huey", ["--n", str(s.latency_runs), "--idle", str(s.idle_s),
                                                             "--threads", str(s.concurrency)])
        try:
            if peer is not None:
                assert peer.stdout is not None
                first = json.loads(peer.stdout.readline() or "{}")
                huey_lat = first.get("latencies_ms", [])
            left = s.idle_s - (time.monotonic() - idle_from)
            if left > 0:
                ctx.log(f"latency: idling {left:.0f} s")
                time.sleep(left)  # the figure is the round trip after this idle time
            after = run(_orch_after_idle(c.url))
            if peer is not None:
                assert peer.stdout is not None
                second = json.loads(peer.stdout.readline() or "{}")
                huey_idle = second.get("after_idle_ms")
                peer.wait(60)
                if not huey_lat or huey_idle is None:  # the peer failing must not cost orch's figures
                    ctx.log("latency: the Huey run failed: "
                            + (tmp / "huey" / "peer.err").read_text(errors="replace")[-2000:])
                    huey_ok = False
        finally:
            if peer is not None and peer.poll() is None:
                import signal

                os.killpg(peer.pid, signal.SIGKILL)
                peer.wait()
    note = "" if huey_ok else (ctx.huey.unavailable or "peer failed: see the log")
    if not huey_ok:
        huey_lat, huey_idle = [], None
    label = f"Huey {ctx.huey.version}".strip()
    idle_name = f"after {s.idle_s:g} s idle" + (" (smoke: not 60 s)" if s.idle_s < 60 else "")
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    hp50 = percentile(huey_lat, 50) if huey_lat else None
    hp99 = percentile(huey_lat, 99) if huey_lat else None
    detail = {"orch_ms": samples, "huey_ms": huey_lat}
    return [
        Row(f"latency at idle: submit -> result, p50 of {s.latency_runs}", "<= 4 ms", p50, "ms", goal=4,
            higher_better=False, peer=hp50, peer_label=label, peer_note=note, detail=detail),
        Row(f"latency at idle: submit -> result, p99 of {s.latency_runs}", "<= 10 ms", p99, "ms", goal=10,
            higher_better=False, peer=hp99, peer_label=label, peer_note=note),
        Row(f"latency: one round trip {idle_name}", "<= 10 ms", after, "ms", goal=10, higher_better=False,
            peer=huey_idle, peer_label=label, peer_note=note, detail={"idle_s": s.idle_s}),
    ]


# --------------------------------------------------------------------------- scale


BIG_QUEUE = "parked"


async def _fill(url: str, n: int) -> dict[str, Any]:
    async with Http(url) as api:
        t0 = time.perf_counter()
        ids = await api.submit_batches({"command": ["true"], "queue": BIG_QUEUE}, n, 10_000, in_flight=2)
        elapsed = time.perf_counter() - t0
    if len(ids) != n:
        raise RuntimeError(f"filled {len(ids)} of {n}")
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed}


async def _probe(url: str, batches: int, claims: int, repeats: int, big: bool, list_samples: int) -> dict[str, Any]:
    """Lease latency from a small queue (and, with ``big``, from the big one), then the batched submit rate.

    Each is measured ``repeats`` times; the figures are medians of the runs' p50s (and of the rates).
    """
    async with Http(url) as api:
        out: dict[str, Any] = {}
        await api.submit_batches({"command": ["true"], "queue": "work"}, (claims + 10) * repeats, 1000)
        for label, queue in (("other", "work"), ("big", BIG_QUEUE)) if big else (("other", "work"),):
            reg = await api.call("POST", "/v1/workers", {"name": f"probe-{label}", "hostname": "bench",
                                                         "queues": [queue], "concurrency": 1})
            path = f"/v1/workers/{reg['worker_id']}/lease"
            body = {"max": 1, "queues": [queue], "wait": 0}
            runs = []
            for _ in range(repeats):
                for _ in range(10):  # warm up: connection, caches
                    await api.call("POST", path, body)
                samples = []
                for _ in range(claims):
                    t0 = time.perf_counter()
                    jobs = (await api.call("POST", path, body))["jobs"]
                    samples.append((time.perf_counter() - t0) * 1000)
                    if len(jobs) != 1:
                        raise RuntimeError(f"lease from {queue} returned {len(jobs)} jobs")
                runs.append(samples)
            out[f"claim_{label}_p50s"] = [percentile(r, 50) for r in runs]
            out[f"claim_{label}_p99s"] = [percentile(r, 99) for r in runs]
            out[f"claim_{label}_p50"] = median(out[f"claim_{label}_p50s"])
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await api.submit_batches({"command": ["true"], "queue": BIG_QUEUE}, batches * 1000, 1000)
            rates.append(batches * 1000 / (time.perf_counter() - t0))
        out.update(submit_rates=rates, submit_rate=median(rates))
        # A page of jobs by each kind of filter: a state few jobs are in, a small queue, the big queue's
        # queued jobs, and a state most of the store is in.
        lists: dict[str, dict[str, float]] = {}
        for label, params in (("running", {"state": "running"}), ("small queue", {"queue": "work"}),
                              ("big queue, queued", {"queue": BIG_QUEUE, "state": "queued"}),
                              ("queued", {"state": "queued"})):
            samples = []
            for _ in range(list_samples):
                t0 = time.perf_counter()
                page = await api.call("GET", "/v1/jobs", params={**params, "limit": "50"})
                samples.append((time.perf_counter() - t0) * 1000)
                if not page["jobs"]:
                    raise RuntimeError(f"the listing {params} found no job")
            lists[label] = {"p50": percentile(samples, 50), "p99": percentile(samples, 99)}
        out.update(lists=lists, list_p99=max(v["p99"] for v in lists.values()))
        return out


def bench_scale(ctx: Context) -> list[Row]:
    s = ctx.sizes
    reps = max(1, s.repeats)
    ctx.log("scale: empty store")
    with ctx.workdir("scale-empty") as tmp, Cluster(tmp) as c:
        c.start_scheduler()
        empty = run(_probe(c.url, s.scale_probe_batches, s.claim_samples, reps, big=False,
                           list_samples=s.list_samples))
    with ctx.workdir("scale-big") as tmp, Cluster(tmp) as c:
        c.start_scheduler()
        ctx.log(f"scale: filling the store with {s.scale_jobs:,} queued jobs (batched POSTs of 10,000)")
        fill = run(_fill(c.url, s.scale_jobs))
        ctx.log(f"scale: filled at {fill['rate']:,.0f} jobs/s; probing")
        big = run(_probe(c.url, s.scale_probe_batches, s.claim_samples, reps, big=True, list_samples=s.list_samples))
        total_jobs = s.scale_jobs + reps * (s.scale_probe_batches * 1000 + s.claim_samples + 10)
        c.stop_scheduler()  # SIGTERM: the store checkpoints the WAL (TRUNCATE) as it closes
        files = {p.name: p.stat().st_size for p in c.data.glob("orch.db*")}
        size = sum(v for k, v in files.items() if not k.endswith("-shm"))
    per_job = size / total_jobs
    n = f"{s.scale_jobs:,}"
    detail = {"fill": fill, "empty": empty, "big": big, "db_files": files, "jobs_in_db": total_jobs}
    return [
        Row(f"scale: batched submit rate, {n} queued", ">= 0.5x empty store", big["submit_rate"], "/s",
            peer=empty["submit_rate"], peer_label="empty store", ratio_goal=0.5, detail=detail),
        Row(f"scale: claim latency p50, other queue, {n} queued", "<= 2x empty store", big["claim_other_p50"], "ms",
            higher_better=False, peer=empty["claim_other_p50"], peer_label="empty store", ratio_goal=0.5),
        Row(f"scale: claim latency p50, the {n}-job queue", "<= 2x empty store", big["claim_big_p50"], "ms",
            higher_better=False, peer=empty["claim_other_p50"], peer_label="empty store", ratio_goal=0.5),
        Row(f"scale: database bytes per queued job ({n})", "<= 1 KiB", per_job, "B", goal=1024,
            higher_better=False),
        Row(f"scale: job list with a state or queue filter, p99, {n} queued", "<= 20 ms", big["list_p99"], "ms",
            goal=20, higher_better=False, peer=empty["list_p99"], peer_label="empty store"),
    ]


# --------------------------------------------------------------------------- many workers


def bench_workers(ctx: Context) -> list[Row]:
    s = ctx.sizes
    with ctx.workdir("workers") as tmp, Cluster(tmp) as c:
        c.start_scheduler()
        assert c.scheduler is not None
        ctx.log(f"many workers: {s.sim_workers} simulated workers, {s.sim_window:g} s idle window, "
                f"then {s.sim_jobs} jobs at {s.sim_rate:g}/s")
        sim = c.spawn("sim", [*python_cmd(), "-m", "benchmarks.sim_workers", "--url", c.url, "--scheduler-pid",
                              str(c.scheduler.pid), "--workers", str(s.sim_workers), "--settle", str(s.sim_settle),
                              "--window", str(s.sim_window), "--jobs", str(s.sim_jobs), "--rate", str(s.sim_rate)])
        timeout = 120 + s.sim_settle + s.sim_window + s.sim_jobs / s.sim_rate + 60
        result = read_json_line(sim, "many_workers", timeout)["many_workers"]
    if result["error_count"]:
        ctx.log(f"many workers: {result['error_count']} errors, e.g. {result['errors'][:3]}")
    lat = result["jobs"]
    w = s.sim_workers
    return [
        Row(f"many workers: scheduler CPU, {w} idle workers", "< 30 % of a core", result["idle"]["cpu_pct"], "%",
            goal=30, higher_better=False, detail=result),
        Row(f"many workers: lease latency p99, {w} workers", "<= 50 ms", lat.get("p99_ms"), "ms", goal=50,
            higher_better=False,
            error="" if lat.get("p99_ms") is not None else f"no job was leased: {result['errors'][:2]}"),
    ]


# --------------------------------------------------------------------------- big requests


async def _big(url: str, jobs: int, seconds: float, prober: Any) -> dict[str, Any]:
    """Jobs with specs near scheduler.max_spec_bytes and 2 MiB of output each, then, for ``seconds``: one
    client reading them, one listing pages of 1,000 jobs, one submitting batches of 10,000, while the
    prober (its own process) times /healthz."""
    blob = "x" * 120_000
    async with Http(url) as api:
        ids = [(await api.call("POST", "/v1/jobs", {"command": ["sh", "-c", "echo " + blob], "env": {"BLOB": blob},
                                                    "queue": "big"}))["id"] for _ in range(jobs)]
        reg = await api.call("POST", "/v1/workers", {"name": "big", "hostname": "bench", "queues": ["big"],
                                                     "concurrency": jobs})
        wid = reg["worker_id"]
        leased = (await api.call("POST", f"/v1/workers/{wid}/lease", {"max": jobs, "queues": ["big"]}))["jobs"]
        piece = "o" * (256 * 1024 - 1) + "\n"
        for j in leased:
            for stream in ("stdout", "stderr"):
                for _ in range(8):  # 2 MiB per stream written; the store keeps the last 1 MiB
                    await api.call("POST", f"/v1/workers/{wid}/output", {"chunks": [
                        {"job_id": j["job_id"], "attempt": j["attempt"], "stream": stream, "data": piece}]})
        prober.start()
        stop = time.perf_counter() + seconds
        counts = {"reads": 0, "lists": 0, "batches": 0}

        async def loop(kind: str, fn: Any) -> None:
            while time.perf_counter() < stop:
                await fn()
                counts[kind] += 1

        async def read() -> None:
            await api.call("GET", f"/v1/jobs/{ids[counts['reads'] % len(ids)]}")

        async def page() -> None:
            await api.call("GET", "/v1/jobs", params={"limit": "1000"})

        async def batch() -> None:
            await api.call("POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"], "queue": "nobody"}] * 10_000})

        # One big request of each kind in flight at a time: /healthz then waits behind the longest stretch
        # any of them holds the loop, not behind a queue of them (which a busy core would build anyway).
        await asyncio.gather(loop("reads", read), loop("lists", page), loop("batches", batch))
    return counts


def bench_big(ctx: Context) -> list[Row]:
    s = ctx.sizes
    with ctx.workdir("big") as tmp, Cluster(tmp) as c:
        c.start_scheduler()
        assert c.scheduler is not None
        pid = c.scheduler.pid

        class Prober:
            proc: Any = None

            def start(self) -> None:
                self.proc = c.spawn("probe", [*python_cmd(), "-m", "benchmarks.probe", "--url", c.url,
                                              "--seconds", str(s.big_seconds), "--pid", str(pid)])

        prober = Prober()
        ctx.log(f"big requests: {s.big_jobs} jobs of ~240 KB specs and 2 MiB of output, then {s.big_seconds:g} s "
                "of reads, listings and 10,000-job batches, one of each at a time")
        counts = run(_big(c.url, s.big_jobs, s.big_seconds, prober))
        probe = read_json_line(prober.proc, "probe", 60 + s.big_seconds)["probe"]
    detail = {"load": counts, "probe": probe}
    return [
        Row("big requests: /healthz p99 while big specs, outputs and batches are served", "<= 10 ms",
            probe["p99_ms"], "ms", goal=10, higher_better=False, detail=detail),
        Row("big requests: /healthz worst answer meanwhile", "<= 50 ms", probe["max_ms"], "ms", goal=50,
            higher_better=False),
        Row("big requests: scheduler memory, peak", "<= 300 MB", probe["rss_peak_mb"], "MB", goal=300,
            higher_better=False),
    ]


# --------------------------------------------------------------------------- delayed jobs


async def _delayed(submit_url: str, n: int, window: float, seed: int = 12) -> list[int]:
    """Submit ``n`` delayed jobs whose due times spread over ``window`` seconds from a second from now: half in one
    batch up front with a run_at each (the reaper's timer goes from one due time to the next), half one at a time
    while those come due, each with a delay of 50-500 ms (due sooner than the timer is set for, often: the submit
    must wake the reaper). Waits until every one has run; their ids."""
    import random
    from datetime import datetime

    rng = random.Random(seed)
    async with Http(submit_url) as api:
        t0 = time.time() + 1.0
        ahead = n // 2
        # Each run_at with this machine's offset written out, to the microsecond.
        specs = [{"command": ["true"], "run_at": datetime.fromtimestamp(t0 + window * i / ahead).astimezone().isoformat()}
                 for i in range(ahead)]
        ids = [j["id"] for j in (await api.call("POST", "/v1/jobs/batch", {"jobs": specs}))["jobs"]]
        live = n - ahead
        for k in range(live):
            pause = t0 - 0.5 + window * k / live - time.time()
            if pause > 0:
                await asyncio.sleep(pause)
            job = await api.call("POST", "/v1/jobs", {"command": ["true"], "delay": round(rng.uniform(0.05, 0.5), 3)})
            if job["state"] != "scheduled":
                raise RuntimeError(f"job {job['id']} was {job['state']} at its submit, not scheduled")
            ids.append(job["id"])
        for job_id in ids:
            done = await api.wait_job(job_id)
            if done["state"] != "succeeded":
                raise RuntimeError(f"delayed job {job_id} ended {done['state']}")
    return ids


def _lateness(rows: list[tuple[Any, ...]], n: int) -> dict[str, list[float]]:
    """(id, due, queued at, running at) rows, read from the database itself (exact times, not the API's
    milliseconds): how long after its due time each job was queued and started, in ms."""
    if len(rows) != n:
        raise RuntimeError(f"found {len(rows)} of {n} delayed jobs queued and run")
    early = [r for r in rows if r[2] < r[1]]
    if early:
        raise RuntimeError(f"{len(early)} jobs were queued before they were due, e.g. {early[0]}")
    return {"queued_ms": [(q - due) * 1000 for _, due, q, _ in rows],
            "started_ms": [(r - due) * 1000 for _, due, _, r in rows]}


_DELAYED_SQL = ("SELECT j.id, j.run_at, q.at, r.at FROM jobs j"
                " JOIN events q ON q.job_id = j.id AND q.from_state = 'scheduled' AND q.to_state = 'queued'"
                " JOIN events r ON r.job_id = j.id AND r.from_state = 'queued' AND r.to_state = 'running'"
                " AND r.attempt = 1 WHERE j.id BETWEEN ? AND ?")


def delayed_once(ctx: Context, dsn: str = "", replicas: int = 1) -> dict[str, Any]:
    """One run: a scheduler (or ``replicas`` on PostgreSQL, the jobs submitted to the last one, which need not run
    the reaper) and a worker; lateness of every job from the database."""
    s = ctx.sizes
    with ctx.workdir("delayed") as tmp, Cluster(tmp, dsn=dsn, replicas=replicas) as c:
        c.start_scheduler()
        c.start_worker("w1", s.concurrency)
        c.wait_workers(1)
        ids = run(_delayed(c.urls[-1], s.delayed_jobs, s.delayed_window))
        rows = _db_rows(c, dsn, _DELAYED_SQL, (min(ids), max(ids)))
    return _lateness(rows, s.delayed_jobs)


def delayed_rows(runs: list[dict[str, Any]], n: int, where: str = "") -> list[Row]:
    queued = [v for r in runs for v in r["queued_ms"]]
    started = [v for r in runs for v in r["started_ms"]]
    total = f"{len(queued):,} jobs" + (f" in {len(runs)} runs" if len(runs) > 1 else "")
    detail = {"runs": runs, "max_queued_ms": max(queued)}
    return [
        Row(f"delayed jobs: due -> queued, p50 of {total}{where}", "<= 100 ms", percentile(queued, 50), "ms",
            goal=100, higher_better=False, detail=detail),
        Row(f"delayed jobs: due -> queued, p99 of {total}{where}", "<= 100 ms", percentile(queued, 99), "ms",
            goal=100, higher_better=False),
        Row(f"delayed jobs: due -> started on an idle worker, p99{where}", "", percentile(started, 99), "ms",
            higher_better=False),
    ]


def bench_delayed(ctx: Context) -> list[Row]:
    s = ctx.sizes
    runs = []
    for i in range(s.repeats):
        ctx.log(f"delayed: run {i + 1}/{s.repeats}: {s.delayed_jobs} jobs due over {s.delayed_window:g} s")
        runs.append(delayed_once(ctx))
    return delayed_rows(runs, s.delayed_jobs)


# --------------------------------------------------------------------------- retention

# Every queued job made ended the way a run ends it: an attempt, a line of output, its events.
_ENDED_SQL = (
    "UPDATE jobs SET state = 'succeeded', attempt = 1, started_at = created_at, finished_at = created_at,"
    " exit_code = 0 WHERE state = 'queued'",
    "INSERT INTO attempts (job_id, attempt, worker_id, state, started_at, finished_at, exit_code, duration,"
    " stdout_bytes, stdout_kept) SELECT id, 1, 'w-bench', 'succeeded', created_at, created_at, 0, 0.001, 6, 6 FROM jobs",
    "INSERT INTO output (job_id, attempt, stream, data, size, pos) SELECT id, 1, 'stdout', 'hello' || char(10), 6, 0"
    " FROM jobs",
    "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason) SELECT id, 1, 'queued', 'running',"
    " created_at, 'claimed by w-bench' FROM jobs",
    "INSERT INTO events (job_id, attempt, from_state, to_state, at, reason) SELECT id, 1, 'running', 'succeeded',"
    " created_at, 'exited 0' FROM jobs",
)


async def _submits_during(url: str, done: asyncio.Event, clients: int = 4) -> list[float]:
    """Single submits, ``clients`` at a time, one after another each, until ``done``: each one's latency (ms)."""
    out: list[float] = []
    async with Http(url, connections=clients) as api:
        async def client() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                await api.call("POST", "/v1/jobs", {"command": ["true"], "queue": "during"})
                out.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(client() for _ in range(clients)))
    return out


async def _purge_while_submitting(url: str, wal: Path) -> dict[str, Any]:
    done = asyncio.Event()
    submits = asyncio.create_task(_submits_during(url, done))
    biggest = 0

    async def watch() -> None:  # the WAL file's size, sampled
        nonlocal biggest
        while not done.is_set():
            with contextlib.suppress(OSError):
                biggest = max(biggest, wal.stat().st_size)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(1.0)  # submits under way before the purge starts
    async with Http(url) as api:
        t0 = time.perf_counter()
        purged = (await api.call("POST", "/v1/jobs/purge", {"older_than": 0, "state": "succeeded"}))["purged"]
        elapsed = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    done.set()
    latencies = await submits
    await watcher
    return {"purged": purged, "seconds": elapsed, "submits": len(latencies), "submit_p50_ms": percentile(latencies, 50),
            "submit_p99_ms": percentile(latencies, 99), "submit_max_ms": max(latencies), "wal_max_bytes": biggest}


def bench_purge(ctx: Context) -> list[Row]:
    """A store of ``scale_jobs`` ended jobs (each with an attempt, its output and three events) purged by `orch
    purge` while single submits go on: how long it takes, the submits' latency meanwhile, the WAL's largest size."""
    import sqlite3

    s = ctx.sizes
    n = s.scale_jobs
    with ctx.workdir("purge") as tmp, Cluster(tmp, env={"ORCH_RETENTION_FINISHED_JOBS": "0"}) as c:
        c.start_scheduler()
        ctx.log(f"purge: filling the store with {n:,} jobs (batched POSTs of 10,000), then ending them in SQL")
        run(_fill(c.url, n))
        # Beside the idle scheduler (it keeps no job in memory): its writes wait for this transaction, and back.
        conn = sqlite3.connect(str(c.db_path), timeout=60)
        try:
            with conn:
                for sql in _ENDED_SQL:
                    conn.execute(sql)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        ctx.log(f"purge: purging {n:,} ended jobs while 4 clients submit")
        got = run(_purge_while_submitting(c.url, Path(str(c.db_path) + "-wal")))
    if got["purged"] != n:
        raise RuntimeError(f"purged {got['purged']} of {n} jobs")
    label = f"{n:,}"
    return [
        Row(f"retention: purge of {label} ended jobs, seconds", "", got["seconds"], "s", higher_better=False,
            detail=got),
        Row(f"retention: purge rate, {label} ended jobs", "", got["purged"] / got["seconds"], "/s"),
        Row(f"retention: single submit during the purge, max of {got['submits']:,}", "<= 50 ms",
            got["submit_max_ms"], "ms", goal=50, higher_better=False),
        Row("retention: single submit during the purge, p99", "", got["submit_p99_ms"], "ms", higher_better=False),
        Row("retention: largest WAL file during the purge", "", got["wal_max_bytes"] / 2**20, "MiB",
            higher_better=False),
    ]


# --------------------------------------------------------------------------- concurrency keys


KEYS = 10_000  # distinct concurrency keys (full size)
KEY_LIMIT = 2


async def _fill_keyed(url: str, n: int, keys: int) -> dict[str, Any]:
    """``n`` queued jobs, job i with concurrency key k{i mod keys} (limit 2): the first 2 of each key to be had,
    the rest held."""
    async with Http(url) as api:
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(2)

        async def one(lo: int) -> int:
            jobs = [{"command": ["true"], "queue": BIG_QUEUE,
                     "concurrency": {"key": f"k{i % keys}", "limit": KEY_LIMIT}} for i in range(lo, min(n, lo + 10_000))]
            async with sem:
                return len((await api.call("POST", "/v1/jobs/batch", {"jobs": jobs}))["jobs"])

        got = sum(await asyncio.gather(*(one(lo) for lo in range(0, n, 10_000))))
        elapsed = time.perf_counter() - t0
    if got != n:
        raise RuntimeError(f"filled {got} of {n}")
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed}


async def _claims_and_cycles(url: str, samples: int) -> dict[str, Any]:
    """From the big queue: ``samples`` lone claims (POST .../lease, max 1, no wait), then ``samples`` cycles of a
    completion that asks for the next job in the same request (what a busy worker sends): each one's latency."""
    async with Http(url) as api:
        reg = await api.call("POST", "/v1/workers", {"name": "probe", "hostname": "bench", "queues": [BIG_QUEUE],
                                                     "concurrency": 1})
        wid = reg["worker_id"]
        lease = {"max": 1, "queues": [BIG_QUEUE], "wait": 0}
        claims: list[float] = []
        for k in range(samples + 10):
            t0 = time.perf_counter()
            jobs = (await api.call("POST", f"/v1/workers/{wid}/lease", lease))["jobs"]
            if k >= 10:  # the first ten warm up the connection and the caches
                claims.append((time.perf_counter() - t0) * 1000)
            if len(jobs) != 1:
                raise RuntimeError(f"a lease from {BIG_QUEUE} returned {len(jobs)} jobs")
        held = jobs[0]
        cycles: list[float] = []
        for k in range(samples + 10):
            body = {"results": [{"job_id": held["job_id"], "attempt": held["attempt"], "outcome": "succeeded",
                                 "exit_code": 0, "duration": 0.0}], "lease": {"max": 1, "queues": [BIG_QUEUE]}}
            t0 = time.perf_counter()
            got = await api.call("POST", f"/v1/workers/{wid}/complete", body)
            if k >= 10:
                cycles.append((time.perf_counter() - t0) * 1000)
            if len(got["jobs"]) != 1:
                raise RuntimeError(f"a completion's lease from {BIG_QUEUE} returned {len(got['jobs'])} jobs")
            held = got["jobs"][0]
    return {"claim_p50": percentile(claims, 50), "claim_p99": percentile(claims, 99),
            "cycle_p50": percentile(cycles, 50), "cycle_p99": percentile(cycles, 99)}


def bench_keys(ctx: Context) -> list[Row]:
    """Claim latency from a queue of ``scale_jobs`` jobs spread over 10,000 concurrency keys (limit 2: most are
    held), beside the same from a queue of as many plain jobs, in one run."""
    s = ctx.sizes
    n, keys = s.scale_jobs, min(KEYS, max(1, s.scale_jobs // 100))
    samples = max(50, s.claim_samples * 2)
    got: dict[str, dict[str, Any]] = {}
    for label in ("plain", "keyed"):
        with ctx.workdir(f"keys-{label}") as tmp, Cluster(tmp) as c:
            c.start_scheduler()
            ctx.log(f"keys: filling the store with {n:,} {label} queued jobs"
                    + (f" over {keys:,} concurrency keys" if label == "keyed" else ""))
            fill = run(_fill_keyed(c.url, n, keys) if label == "keyed" else _fill(c.url, n))
            ctx.log(f"keys: filled at {fill['rate']:,.0f} jobs/s; claiming")
            got[label] = {**run(_claims_and_cycles(c.url, samples)), "fill": fill}
    plain, keyed = got["plain"], got["keyed"]
    where = f"{n:,} queued, {keys:,} keys"
    return [
        Row(f"concurrency keys: claim latency p50, {where}", "<= 2x plain", keyed["claim_p50"], "ms",
            higher_better=False, peer=plain["claim_p50"], peer_label=f"{n:,} plain", ratio_goal=0.5, detail=got),
        Row(f"concurrency keys: complete + claim p50, {where}", "<= 2x plain", keyed["cycle_p50"], "ms",
            higher_better=False, peer=plain["cycle_p50"], peer_label=f"{n:,} plain", ratio_goal=0.5),
        Row(f"concurrency keys: batched submit rate, {where}", "", keyed["fill"]["rate"], "/s",
            peer=plain["fill"]["rate"], peer_label=f"{n:,} plain"),
    ]


# --------------------------------------------------------------------------- dependencies (workflows)


def _db_rows(c: Cluster, dsn: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) read from the cluster's database itself."""
    if dsn:
        import psycopg

        with psycopg.connect(dsn) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), params).fetchall()]
    import sqlite3

    conn = sqlite3.connect(str(c.db_path))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# For each dependency of the jobs in [lo, hi]: when the dependency ended (its end event) and when the dependent
# first started (its first claim), both stamped by the scheduler's clock.
_DEP_GAPS_SQL = ("SELECT d.job_id, e.at, s.at FROM deps d"
                 " JOIN events e ON e.job_id = d.dep_id AND e.from_state = 'running' AND e.to_state = 'succeeded'"
                 " JOIN events s ON s.job_id = d.job_id AND s.from_state = 'queued' AND s.to_state = 'running'"
                 " AND s.attempt = 1 WHERE d.job_id BETWEEN ? AND ?")


async def _workflow(url: str, specs: list[dict[str, Any]]) -> tuple[list[int], float, float]:
    """Submit ``specs`` as one batch and wait for every job to end (each must succeed): the ids, the seconds the
    submit took, and the seconds from the submit to the last end."""
    async with Http(url) as api:
        t0 = time.perf_counter()
        ids = [j["id"] for j in (await api.call("POST", "/v1/jobs/batch", {"jobs": specs}))["jobs"]]
        submitted = time.perf_counter() - t0
        left = list(ids)
        while left:
            got = await api.call("POST", "/v1/jobs/wait", {"ids": left[:10_000], "timeout": 30})
            bad = [j for j in got["ended"] if j["state"] != "succeeded"]
            if bad:
                raise RuntimeError(f"workflow job {bad[0]['id']} ended {bad[0]['state']}")
            done = {j["id"] for j in got["ended"]}
            left = [i for i in left if i not in done]
        return ids, submitted, time.perf_counter() - t0


def dag_once(ctx: Context, dsn: str = "") -> dict[str, Any]:
    """A chain of ``chain`` jobs (each needs the one before), then a fan-out/fan-in of ``fan`` jobs (one root,
    fan - 2 legs that need it, one join that needs every leg), on a scheduler and one worker; from the database:
    how long after its dependency ended each chained job started, and how many started before a dependency
    of theirs had ended (none may)."""
    s = ctx.sizes
    with ctx.workdir("dag") as tmp, Cluster(tmp, dsn=dsn) as c:
        c.start_scheduler()
        c.start_worker("w1", s.concurrency)
        c.wait_workers(1)
        chain = [{"command": ["true"], "ref": "j0"}] + [
            {"command": ["true"], "ref": f"j{i}", "depends_on": [f"j{i - 1}"]} for i in range(1, s.dag_chain)]
        ids, _, chain_s = run(_workflow(c.url, chain))
        gaps = [(started - ended) * 1000 for _, ended, started in
                _db_rows(c, dsn, _DEP_GAPS_SQL, (min(ids), max(ids)))]
        if len(gaps) != s.dag_chain - 1:
            raise RuntimeError(f"found {len(gaps)} of {s.dag_chain - 1} dependencies of the chain")
        legs = s.dag_fan - 2
        fan = [{"command": ["true"], "ref": "root"}] + [
            {"command": ["true"], "ref": f"leg{i}", "depends_on": ["root"]} for i in range(legs)] + [
            {"command": ["true"], "ref": "join", "depends_on": [f"leg{i}" for i in range(legs)]}]
        fids, submit_s, fan_s = run(_workflow(c.url, fan))
        edges = _db_rows(c, dsn, _DEP_GAPS_SQL, (min(fids), max(fids)))
        if len(edges) != 2 * legs:
            raise RuntimeError(f"found {len(edges)} of {2 * legs} dependencies of the fan-out/fan-in")
        early = sum(1 for _, ended, started in edges if started < ended)
    return {"gaps_ms": gaps, "chain_s": chain_s, "fan_submit_s": submit_s, "fan_s": fan_s, "early": early,
            "edges": len(edges)}


def dag_rows(runs: list[dict[str, Any]], s: Sizes, where: str = "") -> list[Row]:
    gaps = [g for r in runs for g in r["gaps_ms"]]
    return [
        Row(f"workflows: dependency ended -> dependent started, p50 over a chain of {s.dag_chain}{where}", "<= 5 ms",
            percentile(gaps, 50), "ms", goal=5, higher_better=False, detail={"runs": runs}),
        Row(f"workflows: dependency ended -> dependent started, p99 over a chain of {s.dag_chain}{where}", "",
            percentile(gaps, 99), "ms", higher_better=False),
        Row(f"workflows: submit of a {s.dag_fan:,}-job fan-out/fan-in (one batch){where}", "< 2 s",
            median([r["fan_submit_s"] for r in runs]), "s", goal=2, higher_better=False),
        Row(f"workflows: the {s.dag_fan:,}-job fan-out/fan-in, submit to last end{where}", "",
            median([r["fan_s"] for r in runs]), "s", higher_better=False),
        Row(f"workflows: dependencies whose dependent started only after they ended{where}", "100 %",
            100.0 * (1 - sum(r["early"] for r in runs) / sum(r["edges"] for r in runs)), "%", goal=100),
    ]


def bench_dag(ctx: Context) -> list[Row]:
    s = ctx.sizes
    runs = []
    for i in range(s.repeats):
        ctx.log(f"dag: run {i + 1}/{s.repeats}: a chain of {s.dag_chain}, a fan-out/fan-in of {s.dag_fan:,}")
        runs.append(dag_once(ctx))
    return dag_rows(runs, s)


# --------------------------------------------------------------------------- cron schedules

_FIRED_SQL = "SELECT j.created_at, j.spec FROM jobs j WHERE j.id BETWEEN ? AND ?"


async def _make_schedules(url: str, n: int, cron: str, prefix: str) -> None:
    async with Http(url, connections=8) as api:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                await api.call("POST", "/v1/schedules", {"name": f"{prefix}{i}", "cron": cron, "overlap": "allow",
                                                         "job": {"command": ["true"]}})

        await asyncio.gather(*(one(i) for i in range(n)))


def cron_once(ctx: Context, dsn: str = "") -> dict[str, Any]:
    """On one scheduler (no worker: the jobs stay queued, the cost measured is the firing alone): ``cron_schedules``
    schedules a minute apart each, for ``cron_minutes`` minutes, the scheduler's CPU over whole minutes against
    the same time idle before; then ``cron_fast`` schedules every second for ``cron_seconds`` seconds. Lateness
    of every fired job: its created_at (the scheduler's clock) against the tick in its ORCH_SCHEDULED_FOR."""
    from datetime import datetime

    s = ctx.sizes
    with ctx.workdir("cron") as tmp, Cluster(tmp, dsn=dsn) as c:
        c.start_scheduler()
        pid = c.scheduler.p.pid  # type: ignore[union-attr]
        t0 = time.time()
        idle_from = _cpu(pid)
        time.sleep(20.0 if s.cron_minutes > 1 else 2.0)
        idle = (_cpu(pid) - idle_from) / (time.time() - t0)
        busy = idle
        if s.cron_minutes:
            run(_make_schedules(c.url, s.cron_schedules, "* * * * *", "m"))
            # From the next whole minute on, for cron_minutes whole minutes.
            start = (int(time.time() / 60) + 1) * 60
            time.sleep(max(0.0, start - time.time() - 1))
            cpu0, w0 = _cpu(pid), time.time()
            time.sleep(max(0.0, start + 60 * s.cron_minutes - 1 - time.time()))
            busy = (_cpu(pid) - cpu0) / (time.time() - w0)
        fast_from = time.time()
        run(_make_schedules(c.url, s.cron_fast, "* * * * * *", "s"))
        time.sleep(s.cron_seconds)
        rows = _db_rows(c, dsn, _FIRED_SQL, (1, 10 ** 12))
    late: list[float] = []
    fired_minutely = 0
    for created, spec_text in rows:
        env = json.loads(spec_text).get("env", {})
        due = datetime.fromisoformat(env["ORCH_SCHEDULED_FOR"].replace("Z", "+00:00")).timestamp()
        late.append((created - due) * 1000)
        if env["ORCH_SCHEDULE"].startswith("m"):
            fired_minutely += 1
        elif due < fast_from:
            raise RuntimeError(f"a fast schedule fired a tick before it was made: {env}")
    expected = s.cron_schedules * s.cron_minutes
    if fired_minutely < expected:
        raise RuntimeError(f"{fired_minutely} of at least {expected} minutely ticks fired")
    return {"late_ms": late, "idle_cpu": idle, "busy_cpu": busy, "fired": len(rows)}


def cron_rows(runs: list[dict[str, Any]], s: Sizes, where: str = "") -> list[Row]:
    late = [v for r in runs for v in r["late_ms"]]
    cost = median([(r["busy_cpu"] - r["idle_cpu"]) * 100 for r in runs])
    return [
        Row(f"cron: tick -> job submitted, p50 of {len(late):,} ticks{where}", "", percentile(late, 50), "ms",
            higher_better=False, detail={"runs": [{k: v for k, v in r.items() if k != "late_ms"} for r in runs]}),
        Row(f"cron: tick -> job submitted, p99 of {len(late):,} ticks{where}", "<= 1000 ms", percentile(late, 99), "ms",
            goal=1000, higher_better=False),
        Row(f"cron: scheduler CPU for {s.cron_schedules:,} schedules a minute apart, over idle{where}", "< 5 %",
            max(cost, 0.01), "% of a core", goal=5, higher_better=False),
    ]


def bench_cron(ctx: Context) -> list[Row]:
    s = ctx.sizes
    ctx.log(f"cron: {s.cron_schedules:,} schedules every minute for {s.cron_minutes} min, then {s.cron_fast} every "
            f"second for {s.cron_seconds:g} s")
    return cron_rows([cron_once(ctx)], s)


# --------------------------------------------------------------------------- runners: python, docker

NOOP = {"python": {"function": "benchmarks.pytasks:noop"}}


async def _python_noop(url: str, n: int, latency_runs: int) -> dict[str, Any]:
    """Submit ``n`` no-op Python tasks in batches (each batch acknowledged durably), wait for all; then one at a
    time: submit and wait in one request for its return value (the SDK's ``task.run(...)``, over the same HTTP)."""
    async with Http(url) as api:
        for _ in range(20):  # warm: every child has imported the module (--import), the connections are open
            await api.wait_job((await api.call("POST", "/v1/jobs", NOOP))["id"])
        t0 = time.perf_counter()
        ids = await api.submit_batches(NOOP, n, 500, in_flight=2)
        counts = await api.wait_all(ids)
        elapsed = time.perf_counter() - t0
        if counts.get("succeeded") != n:
            raise RuntimeError(f"not every python noop succeeded: {counts}")
        sample = await api.call("GET", f"/v1/jobs/{ids[-1]}")
        if (sample["result"] or {}).get("value") != 1:
            raise RuntimeError(f"job {ids[-1]} did not return 1: {sample['result']}")
        lat = []
        for _ in range(latency_runs):
            # As the SDK's task.run(...) does it: the submit and the wait for the end in one request.
            t1 = time.perf_counter()
            job = await api.call("POST", "/v1/jobs", NOOP, params={"wait": "30"})
            if job["state"] not in TERMINAL:
                job = await api.wait_job(job["id"])
            lat.append((time.perf_counter() - t1) * 1000)
            if job["state"] != "succeeded":
                raise RuntimeError(f"a python noop ended {job['state']}")
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "latencies_ms": lat}


def python_once(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    with ctx.workdir("python") as tmp, Cluster(tmp) as c:
        c.start_scheduler()
        c.start_worker("w1", s.concurrency, extra=["--import", "benchmarks.pytasks"])
        c.wait_workers(1)
        return run(_python_noop(c.url, s.python_jobs, s.latency_runs))


def huey_noop_once(ctx: Context) -> dict[str, Any] | None:
    return huey_once(ctx, "noop", ctx.sizes.python_jobs)


def bench_python(ctx: Context) -> list[Row]:
    s = ctx.sizes
    orch_runs, huey_runs = [], []
    for i in range(s.repeats):
        ctx.log(f"python: run {i + 1}/{s.repeats}: orch, {s.python_jobs:,} no-op tasks")
        orch_runs.append(python_once(ctx))
        ctx.log(f"python: run {i + 1}/{s.repeats}: huey")
        h = huey_noop_once(ctx)
        if h is not None:
            huey_runs.append(h)
    rate = median([r["rate"] for r in orch_runs])
    peer = median([r["rate"] for r in huey_runs]) if huey_runs else None
    lat = [x for r in orch_runs for x in r["latencies_ms"]]
    hlat = [x for r in huey_runs for x in r["latencies_ms"]]
    label = f"Huey {ctx.huey.version}".strip()
    note = "" if peer is not None else (ctx.huey.unavailable or "peer failed: see the log")
    return [
        Row(f"python: {s.python_jobs:,} no-op tasks end to end (submit all, wait all; durable), 1 worker x "
            f"{s.concurrency}", ">= 4x Huey (SQLite, threads)", rate, "/s", peer=peer, peer_label=label,
            peer_note=note, ratio_goal=4.0, detail={"orch": [{k: v for k, v in r.items() if k != "latencies_ms"}
                                                             for r in orch_runs],
                                                    "huey": [{k: v for k, v in r.items() if k != "latencies_ms"}
                                                             for r in huey_runs]}),
        Row("python: no-op task round trip p50 (submit, run, result)", "<= 2 ms", percentile(lat, 50), "ms", goal=2,
            higher_better=False, peer=percentile(hlat, 50) if hlat else None, peer_label=label, peer_note=note),
        Row("python: no-op task round trip p99", "", percentile(lat, 99), "ms", higher_better=False,
            peer=percentile(hlat, 99) if hlat else None, peer_label=label, peer_note=note),
    ]


def _docker_host(ctx: Context) -> Any:
    from benchmarks.dockerd import Dockerd, missing

    why = missing()
    if why is not None:
        return why
    return Dockerd().start()


def _bare_docker_runs(sock: str, n: int) -> list[float]:
    """``docker run --rm IMAGE true``, one at a time: seconds each (the CLI the engine's users type)."""
    import shutil
    import subprocess

    from benchmarks.dockerd import IMAGE

    docker = shutil.which("docker") or "/usr/bin/docker"
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.run([docker, "-H", f"unix://{sock}", "run", "--rm", "--network", "none", IMAGE, "true"],
                           capture_output=True, timeout=120)
        out.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise RuntimeError(f"docker run failed: {p.stderr[-500:]!r}")
    return out


async def _orch_docker_runs(url: str, n: int) -> list[float]:
    from benchmarks.dockerd import IMAGE

    spec = {"docker": {"image": IMAGE, "command": ["true"], "network": "none", "pull": "never"}, "max_attempts": 1}
    out = []
    async with Http(url) as api:
        for _ in range(n):
            t0 = time.perf_counter()
            job = await api.wait_job((await api.call("POST", "/v1/jobs", spec))["id"])
            out.append(time.perf_counter() - t0)
            if job["state"] != "succeeded":
                raise RuntimeError(f"a docker true ended {job['state']}: {job.get('error')}")
    return out


def bench_docker(ctx: Context) -> list[Row]:
    s = ctx.sizes
    engine = _docker_host(ctx)
    if isinstance(engine, str):
        return [Row("docker: a `true` job's overhead over `docker run --rm`", "<= 10 %", None, "%",
                    error=f"no Docker engine: {engine}")]
    try:
        bare: list[float] = []
        orch_s: list[float] = []
        with ctx.workdir("docker") as tmp, Cluster(tmp, env={"ORCH_DOCKER_HOST": engine.host}) as c:
            c.start_scheduler()
            c.start_worker("w1", 1)
            c.wait_workers(1)
            _bare_docker_runs(engine.sock, 3)
            run(_orch_docker_runs(c.url, 3))  # warm both
            for i in range(s.repeats):  # alternating, so that both see the same machine
                ctx.log(f"docker: run {i + 1}/{s.repeats}: {s.docker_runs} x docker run --rm, then orch")
                bare += _bare_docker_runs(engine.sock, s.docker_runs)
                orch_s += run(_orch_docker_runs(c.url, s.docker_runs))
    finally:
        engine.stop()
    b, o = median(bare) * 1000, median(orch_s) * 1000
    return [
        Row("docker: `true` job end to end (submit, container, result), median", "", o, "ms", higher_better=False,
            peer=b, peer_label="docker run --rm"),
        Row("docker: its time as % of a bare `docker run --rm` of the same image", "<= 110 % (overhead <= 10 %)",
            o / b * 100, "%", goal=110, higher_better=False, detail={"orch_ms": [x * 1000 for x in orch_s],
                                                                     "bare_ms": [x * 1000 for x in bare]}),
    ]


# --------------------------------------------------------------------------- dashboard


DASH_QUEUES = 10
DASH_PAGES = 300.0  # ms: the goal of every page, on the server, with the store full


async def _dashboard_fill(url: str, n: int) -> dict[str, Any]:
    """``n`` queued jobs over DASH_QUEUES queues, each with its own name and label, and one rare name (the oldest
    job's) that only a full scan finds."""
    async with Http(url) as api:
        t0 = time.perf_counter()
        await api.call("POST", "/v1/jobs", {"command": ["true"], "queue": "dash-0", "name": "needle-in-the-haystack"})
        per = n // DASH_QUEUES
        for q in range(DASH_QUEUES):
            await api.submit_batches({"command": ["convert", f"in-{q}.png", "out.png"], "queue": f"dash-{q}",
                                      "name": f"resize-{q}", "labels": {"team": f"t{q}", "kind": "image"}},
                                     per, 10_000, in_flight=2)
        return {"n": per * DASH_QUEUES + 1, "elapsed": time.perf_counter() - t0}


async def _dashboard_pages(url: str, samples: int, job_id: int, workflow_id: int) -> dict[str, dict[str, float]]:
    """Each page's round trip over loopback (the server's time and one local hop), p50 and p99 of ``samples``."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies of 127.0.0.1
    token = auth_header(url, "/v1/jobs")["Authorization"].removeprefix("Bearer ")
    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        async with session.post(url + "/ui/login", data={"token": token}, allow_redirects=False) as r:
            if r.status != 303:
                raise RuntimeError(f"dashboard sign-in: HTTP {r.status}")
        pages = {
            "overview": "/ui", "jobs": "/ui/jobs", "jobs, a state": "/ui/jobs?state=queued",
            "jobs, a queue": "/ui/jobs?queue=dash-3", "jobs, a label": "/ui/jobs?label=team%3Dt7",
            "jobs, a name": "/ui/jobs?name=resize-5", "jobs, text": "/ui/jobs?q=in-2.png",
            "jobs, all filters": "/ui/jobs?state=queued&queue=dash-4&label=kind%3Dimage&name=resize-4&q=convert",
            "jobs, page 100": None, "job": f"/ui/jobs/{job_id}", "workflow": f"/ui/workflows/{workflow_id}",
            "workers": "/ui/workers", "queues": "/ui/queues", "schedules": "/ui/schedules",
            "jobs, a rare text (matches 1 job)": "/ui/jobs?q=needle-in",
        }
        # A deep page: the cursor a user reaches by following "Older" from the newest.
        cursor = None
        for _ in range(100):
            async with session.get(url + "/v1/jobs", params={"limit": "50", **({"cursor": cursor} if cursor else {})},
                                   headers=auth_header(url, "/v1/jobs")) as r:
                cursor = (await r.json())["next_cursor"]
        pages["jobs, page 100"] = f"/ui/jobs?cursor={cursor}"
        for label, path in pages.items():
            times = []
            for i in range(samples + 3):
                t0 = time.perf_counter()
                async with session.get(url + str(path)) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{path}: HTTP {r.status}: {body[:200]!r}")
                if i >= 3:  # after a warm-up
                    times.append((time.perf_counter() - t0) * 1000)
            out[label] = {"p50": percentile(times, 50), "p99": percentile(times, 99)}
        # Live: from a submit's start to the `change` event on an open stream (what a page then refetches).
        lags = []
        async with session.get(url + "/ui/events") as stream:
            await stream.content.readline()  # retry: 1000
            await stream.content.readline()
            for _ in range(samples):
                await asyncio.sleep(0.5)  # past the stream's spacing of its events (~0.3 s): each one stands alone
                t0 = time.perf_counter()
                async with session.post(url + "/v1/jobs", json={"command": ["true"], "queue": "parked-live"},
                                        headers=auth_header(url, "/v1/jobs", "POST")) as r:
                    await r.read()
                while not (await stream.content.readline()).startswith(b"event: change"):
                    pass
                lags.append((time.perf_counter() - t0) * 1000)
        out["live"] = {"p50": percentile(lags, 50), "p99": percentile(lags, 99)}
    return out


def bench_dashboard(ctx: Context) -> list[Row]:
    s = ctx.sizes
    n = s.scale_jobs
    with ctx.workdir("dashboard") as tmp, Cluster(tmp) as c:
        url = c.start_scheduler()
        ctx.log(f"dashboard: filling the store with {n:,} queued jobs over {DASH_QUEUES} queues")
        fill = run(_dashboard_fill(url, n))
        # Jobs that ran, so the overview has an hour of ends, and a workflow with a job page to show.
        c.start_worker("dash-w", 8, queues=("ran",))
        c.wait_workers(1)

        async def ran() -> tuple[int, int]:
            async with Http(url) as api:
                ids = await api.submit_batches({"shell": "echo out; exit $((RANDOM % 5 == 0))", "queue": "ran",
                                                "max_attempts": 1}, 500, 500)
                wf = await api.call("POST", "/v1/jobs/batch", {"jobs": [
                    {"ref": f"s{i}", "command": ["true"], "queue": "ran",
                     **({"depends_on": [f"s{i - 1}"]} if i else {})} for i in range(20)]})
                await api.call("POST", "/v1/schedules", {"name": "nightly", "cron": "0 3 * * *",
                                                         "job": {"command": ["true"]}})
                for _ in range(600):
                    jobs = (await api.call("GET", "/v1/jobs", params={"queue": "ran", "state": "queued"}))["jobs"]
                    running = (await api.call("GET", "/v1/jobs", params={"queue": "ran", "state": "running"}))["jobs"]
                    if not jobs and not running:
                        break
                    await asyncio.sleep(0.2)
                return ids[-1], wf["jobs"][0]["id"]

        job_id, workflow_id = run(ran())
        ctx.log("dashboard: timing every page")
        times = run(_dashboard_pages(url, max(5, s.list_samples // 5), job_id, workflow_id))
    live = times.pop("live")
    rows = []
    for label, t in times.items():
        rows.append(Row(f"dashboard: {label} page, p99, {n:,} jobs", "<= 300 ms", t["p99"], "ms", goal=DASH_PAGES,
                        higher_better=False, detail={"p50_ms": t["p50"], "fill": fill}))
    rows.append(Row(f"dashboard: a submit (from its start) to its live event on an open page, p99, {n:,} jobs", "<= 1000 ms",
                    live["p99"], "ms", goal=1000, higher_better=False, detail={"p50_ms": live["p50"]}))
    return rows


BENCHMARKS: dict[str, Callable[[Context], list[Row]]] = {
    "shell": bench_shell,
    "control": bench_control,
    "submits": bench_submits,
    "latency": bench_latency,
    "scale": bench_scale,
    "workers": bench_workers,
    "big": bench_big,
    "delayed": bench_delayed,
    "purge": bench_purge,
    "keys": bench_keys,
    "dag": bench_dag,
    "cron": bench_cron,
    "python": bench_python,
    "docker": bench_docker,
    "dashboard": bench_dashboard,
}
