"""Many simulated workers in one asyncio process: register, heartbeat, hold idle long-polls; prints JSON.

    python -m benchmarks.sim_workers --url URL --scheduler-pid PID --workers 500

Each simulated worker registers (concurrency 1, queue ``default``), heartbeats
at the interval the scheduler returned at registration (first beat at a random
phase, as real workers that joined at different times), and keeps one lease
long-poll open (``wait`` = the scheduler's long-poll limit). Nothing is run: a
leased job is completed at once as succeeded.

Phase 1 (idle): after everyone has joined and one heartbeat interval has
passed, the scheduler's CPU time (utime + stime from /proc/PID/stat) is read
over ``--window`` seconds: its share of one core.

Phase 2 (jobs arrive): ``--jobs`` jobs are submitted one per request at
``--rate`` per second; each one's lease latency is the time from just before
its submit request to the moment a lease answer carrying it reaches its
worker (same process, same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.chaos import auth_header

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class Sim:
    def __init__(self, url: str, workers: int) -> None:
        self.url = url.rstrip("/")
        self.n = workers
        self.session: aiohttp.ClientSession | None = None
        self.submitted_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.got = asyncio.Event()
        self.expected = 0
        self.errors: list[str] = []
        self.heartbeats = 0
        self.lease_calls = 0
        self.interval = 2.0
        self.long_poll = 30.0
        self.stopping = False
        self.t0 = time.perf_counter()
        # (job id, submitted at in seconds after joining, latency ms, wall clock at submit, wall clock at lease)
        self.lease_log: list[tuple[int, float, float, float, float]] = []
        self.wall_at: dict[str, float] = {}
        self.credentials: dict[str, str] = {}  # worker id -> its own credential (tokens come from our environment)

    async def call(self, path: str, body: Any, timeout: float = 60.0) -> Any:
        assert self.session is not None
        headers = {"Content-Type": "application/json", **auth_header(self.url, path, "POST", self.credentials)}
        async with self.session.post(self.url + path, data=dumps(body), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            raw = await r.read()
            if r.status >= 400:
                raise RuntimeError(f"POST {path}: {r.status} {raw[:300]!r}")
            reply = json.loads(raw)
            if path == "/v1/workers" and isinstance(reply, dict) and reply.get("credential"):
                self.credentials[reply["worker_id"]] = reply["credential"]
            return reply

    async def register(self, i: int) -> str:
        reply = await self.call("/v1/workers", {"name": f"sim-{i}", "hostname": "sim", "queues": ["default"],
                                                "concurrency": 1})
        self.interval = float(reply["heartbeat_interval"])
        self.long_poll = float(reply["long_poll_timeout"])
        return reply["worker_id"]

    async def heartbeat_loop(self, wid: str, running: list[dict[str, int]]) -> None:
        await asyncio.sleep(random.uniform(0, self.interval))
        while not self.stopping:
            try:
                await self.call(f"/v1/workers/{wid}/heartbeat", {"running": list(running), "draining": False}, 30)
                self.heartbeats += 1
            except Exception as e:  # noqa: BLE001 - counted and reported, the loop goes on
                self.errors.append(f"heartbeat: {e!r}"[:300])
            await asyncio.sleep(self.interval)

    async def lease_loop(self, wid: str, running: list[dict[str, int]]) -> None:
        # The first long-poll ends at a random point, as if the workers had joined at different times;
        # otherwise all of them would ask again in the same instant every long-poll period.
        wait = random.uniform(0.5, self.long_poll)
        while not self.stopping:
            try:
                self.lease_calls += 1
                jobs = (await self.call(f"/v1/workers/{wid}/lease",
                                        {"max": 1, "queues": ["default"], "wait": round(wait, 3)},
                                        self.long_poll + 30))["jobs"]
                wait = self.long_poll
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"lease: {e!r}"[:300])
                await asyncio.sleep(0.5)
                continue
            now = time.perf_counter()
            for job in jobs:
                name = (job.get("spec") or {}).get("name") or ""
                started = self.submitted_at.get(name)
                if started is not None:
                    self.latencies.append((now - started) * 1000)
                    self.lease_log.append((job["job_id"], round(started - self.t0, 3), round((now - started) * 1000, 2),
                                           self.wall_at[name], time.time()))
                ref = {"job_id": job["job_id"], "attempt": job["attempt"]}
                running.append(ref)
                try:
                    await self.call(f"/v1/workers/{wid}/complete", {"results": [
                        {**ref, "outcome": "succeeded", "exit_code": 0, "duration": 0.0}]})
                except Exception as e:  # noqa: BLE001
                    self.errors.append(f"complete: {e!r}"[:300])
                finally:
                    running.remove(ref)
            if len(self.latencies) >= self.expected > 0:
                self.got.set()

    async def submit_jobs(self, count: int, rate: float) -> None:
        self.expected = count
        t0 = time.perf_counter()
        tasks = []
        for k in range(count):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            name = f"sim-job-{k}"
            self.submitted_at[name] = time.perf_counter()
            self.wall_at[name] = time.time()
            tasks.append(asyncio.create_task(self.call("/v1/jobs", {"command": ["true"], "name": name})))
        await asyncio.gather(*tasks)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sim = Sim(args.url, args.workers)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        sim.session = session
        sem = asyncio.Semaphore(32)

        async def reg(i: int) -> str:
            async with sem:
                return await sim.register(i)

        ids = await asyncio.gather(*(reg(i) for i in range(args.workers)))
        sim.t0 = time.perf_counter()
        tasks = []
        for wid in ids:
            running: list[dict[str, int]] = []
            tasks.append(asyncio.create_task(sim.heartbeat_loop(wid, running)))
            tasks.append(asyncio.create_task(sim.lease_loop(wid, running)))
        # Our own pauses would count as lease latency: no cyclic GC in this short-lived load generator.
        gc.collect()
        gc.freeze()
        gc.disable()
        print(dumps({"ready": len(ids), "heartbeat_interval": sim.interval}), flush=True)
        await asyncio.sleep(max(args.settle, sim.interval))

        # Phase 1: idle.
        me = os.getpid()
        c0, m0, w0, hb0 = cpu_seconds(args.scheduler_pid), cpu_seconds(me), time.perf_counter(), sim.heartbeats
        await asyncio.sleep(args.window)
        c1, m1, w1, hb1 = cpu_seconds(args.scheduler_pid), cpu_seconds(me), time.perf_counter(), sim.heartbeats
        idle = {"cpu_pct": 100 * (c1 - c0) / (w1 - w0), "sim_cpu_pct": 100 * (m1 - m0) / (w1 - w0),
                "window_s": w1 - w0, "heartbeats_per_s": (hb1 - hb0) / (w1 - w0)}
        print(dumps({"idle": idle}), flush=True)

        # Phase 2: jobs arrive at a modest rate.
        c0, w0 = cpu_seconds(args.scheduler_pid), time.perf_counter()
        leases0 = sim.lease_calls
        lags: list[tuple[float, float]] = []  # our own event loop's lateness (seconds after joining, ms)

        async def watch_lag() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                late = (time.perf_counter() - t - 0.005) * 1000
                if late > 5:
                    lags.append((round(t - sim.t0, 3), round(late, 1)))

        lag_task = asyncio.create_task(watch_lag())
        await sim.submit_jobs(args.jobs, args.rate)
        try:
            await asyncio.wait_for(sim.got.wait(), 60)
        except TimeoutError:
            sim.errors.append(f"only {len(sim.latencies)} of {args.jobs} jobs were leased within 60 s")
        c1, w1 = cpu_seconds(args.scheduler_pid), time.perf_counter()
        sim.stopping = True
        lag_task.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lat = sorted(sim.latencies)
        busy = {"cpu_pct": 100 * (c1 - c0) / (w1 - w0), "window_s": w1 - w0, "jobs": args.jobs, "rate": args.rate,
                "leased": len(lat), "lease_requests": sim.lease_calls - leases0}
        if lat:
            busy.update(p50_ms=lat[len(lat) // 2], p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                        max_ms=lat[-1])
        return {"many_workers": {"workers": args.workers, "heartbeat_interval": sim.interval, "idle": idle,
                                 "jobs": busy, "latencies_ms": lat, "lease_log": sim.lease_log, "sim_lags": lags,
                                 "errors": sim.errors[:20],
                                 "error_count": len(sim.errors)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_workers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--scheduler-pid", type=int, required=True)
    ap.add_argument("--workers", type=int, default=500)
    ap.add_argument("--settle", type=float, default=4.0, help="seconds after joining before the idle window")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of the idle CPU window")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0, help="jobs submitted per second in phase 2")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(dumps(asyncio.run(main_async(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
