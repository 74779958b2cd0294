"""SQLite against PostgreSQL, with one and two schedulers, in one run: control plane, single submits, shell
throughput, idle latency, delayed jobs' lateness.

    python -m benchmarks --backend postgres [--size full|smoke]

A PostgreSQL server of its own is started for the run (Debian's initdb/pg_ctl, as a non-root user, on a free
loopback port: benchmarks/pgserver.py), with a fresh database for every cluster. With two schedulers the load
is shared between them: the control plane runs one submit -> lease -> complete loop per scheduler (half the
jobs each), single submits spread their clients over both, the shell benchmark's worker joins both (and its
jobs are submitted to the first, so they reach it through the other's wake-up hints when it pulls from the
second), the latency round trips submit to one and wait on the other, and the delayed jobs are submitted to the
second (which may not run the reaper: the leader hears of them in hints).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from typing import Any, Iterator

from benchmarks.common import Cluster, Row, median, percentile
from benchmarks.pgserver import PgServer, missing
from benchmarks.suite import (
    BIG_QUEUE,
    Context,
    Http,
    _control_plane,
    _cpu,
    _fill,
    _orch_shell,
    _single_submits,
    dag_once,
    dag_rows,
    delayed_once,
    delayed_rows,
    run,
)

SETUPS = (("sqlite", 1), ("postgres", 1), ("postgres", 2))


def _label(backend: str, replicas: int) -> str:
    return "SQLite" if backend == "sqlite" else f"PostgreSQL x{replicas}"


@contextmanager
def _cluster(ctx: Context, name: str, pg: PgServer | None, backend: str, replicas: int) -> Iterator[Cluster]:
    """A cluster of ``replicas`` schedulers on ``backend`` (PostgreSQL: a fresh database), in a fresh workdir."""
    dsn = pg.database() if backend == "postgres" and pg is not None else ""
    with ctx.workdir(f"{name}-{backend}-{replicas}") as tmp, Cluster(tmp, dsn=dsn, replicas=replicas) as c:
        yield c


async def _control_shared(urls: list[str], n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    # A queue of its own per scheduler's loop: each leases the half it submitted (through its own scheduler).
    parts = await asyncio.gather(*(_control_plane(u, n // len(urls), queue=f"part-{i}") for i, u in enumerate(urls)))
    elapsed = time.perf_counter() - t0
    done = sum(p["n"] for p in parts)
    return {"n": done, "elapsed": elapsed, "rate": done / elapsed, "parts": parts}


async def _submits_shared(urls: list[str], clients: int, total: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    parts = await asyncio.gather(*(_single_submits(u, clients // len(urls), total // len(urls)) for u in urls))
    elapsed = time.perf_counter() - t0
    acked = sum(p["acked"] for p in parts)
    # Each part times only its own requests; the rate of the whole is what all of them acked over the longest.
    return {"acked": acked, "elapsed": max(p["elapsed"] for p in parts), "wall": elapsed,
            "rate": acked / max(p["elapsed"] for p in parts), "parts": parts}


async def _latency_across(submit_url: str, wait_url: str, n: int) -> list[float]:
    async with Http(submit_url) as a, Http(wait_url) as b:
        async def once() -> float:
            t0 = time.perf_counter()
            job = await a.call("POST", "/v1/jobs", {"command": ["true"]})
            done = await b.call("GET", f"/v1/jobs/{job['id']}/wait", params={"timeout": "30"})
            if done["state"] != "succeeded":
                raise RuntimeError(f"job {job['id']} ended {done['state']}")
            return (time.perf_counter() - t0) * 1000

        for _ in range(10):
            await once()
        return [await once() for _ in range(n)]


async def _deep_claims(url: str, queued: int, samples: int) -> dict[str, Any]:
    """Claim latency with ``queued`` jobs waiting: leases of one job, by a worker of the big queue and by one
    of the big queue and a small one (each queue's first jobs, then the first of those)."""
    await _fill(url, queued)
    out: dict[str, Any] = {}
    async with Http(url) as api:
        await api.submit_batches({"command": ["true"], "queue": "work"}, 2 * (samples + 10), 1000)
        for label, queues in (("one", [BIG_QUEUE]), ("two", [BIG_QUEUE, "work"])):
            reg = await api.call("POST", "/v1/workers", {"name": f"deep-{label}", "hostname": "bench",
                                                         "queues": queues, "concurrency": 1})
            path = f"/v1/workers/{reg['worker_id']}/lease"
            body = {"max": 1, "queues": queues, "wait": 0}
            for _ in range(10):  # warm up: connection, caches, prepared statements
                await api.call("POST", path, body)
            times = []
            for _ in range(samples):
                t0 = time.perf_counter()
                jobs = (await api.call("POST", path, body))["jobs"]
                times.append((time.perf_counter() - t0) * 1000)
                if len(jobs) != 1:
                    raise RuntimeError(f"a lease from {queues} returned {len(jobs)} jobs")
            out[label] = percentile(times, 50)
            out[f"{label}_ms"] = times
    return out


def _runs(ctx: Context, pg: PgServer | None) -> dict[tuple[str, int], dict[str, Any]]:
    """Every timed figure ``repeats`` times, the three setups in turn within each repeat (so that a minute
    when the machine is slower is slower for all three, not for one), then each setup's idle latency and its
    claims from a deep queue."""
    s = ctx.sizes
    runs: dict[tuple[str, int], dict[str, list[Any]]] = {k: {"control": [], "submits": [], "shell": []} for k in SETUPS}
    for i in range(s.repeats):
        for backend, replicas in SETUPS:
            label, got = _label(backend, replicas), runs[(backend, replicas)]
            ctx.log(f"backends: run {i + 1}/{s.repeats}: {label}: control plane")
            with _cluster(ctx, "control", pg, backend, replicas) as c:
                c.start_scheduler()
                cpu0 = sum(_cpu(p.pid) for p in c.schedulers)
                r = run(_control_shared(c.urls, s.control_jobs))
                r["scheduler_cpu_s"] = sum(_cpu(p.pid) for p in c.schedulers) - cpu0
                got["control"].append(r)
            ctx.log(f"backends: run {i + 1}/{s.repeats}: {label}: single submits")
            with _cluster(ctx, "submits", pg, backend, replicas) as c:
                c.start_scheduler()
                got["submits"].append(run(_submits_shared(c.urls, s.submit_clients, s.submit_requests)))
            ctx.log(f"backends: run {i + 1}/{s.repeats}: {label}: shell throughput")
            with _cluster(ctx, "shell", pg, backend, replicas) as c:
                c.start_scheduler()
                c.start_worker("w1", s.concurrency)
                c.wait_workers(1)
                got["shell"].append(run(_orch_shell(c.url, s.shell_jobs)))
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for backend, replicas in SETUPS:
        label, got = _label(backend, replicas), runs[(backend, replicas)]
        ctx.log(f"backends: {label}: {s.latency_runs} round trips at idle")
        with _cluster(ctx, "latency", pg, backend, replicas) as c:
            c.start_scheduler()
            c.start_worker("w1", s.concurrency)
            c.wait_workers(1)
            lat = run(_latency_across(c.urls[0], c.urls[-1], s.latency_runs))
        ctx.log(f"backends: {label}: {s.delayed_jobs} delayed jobs" + (", submitted to the second" if replicas > 1 else ""))
        delayed = delayed_once(ctx, pg.database() if backend == "postgres" and pg is not None else "", replicas)
        deep: dict[str, Any] = {}
        if replicas == 1:
            ctx.log(f"backends: {label}: claims with {s.deep_queue:,} jobs queued")
            with _cluster(ctx, "deep", pg, backend, replicas) as c:
                c.start_scheduler()
                deep = run(_deep_claims(c.url, s.deep_queue, s.claim_samples))
        out[(backend, replicas)] = {
            "control": median([r["rate"] for r in got["control"]]),
            "submits": median([r["rate"] for r in got["submits"]]),
            "shell": median([r["rate"] for r in got["shell"]]),
            "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "deep_one": deep.get("one"), "deep_two": deep.get("two"), "delayed": delayed,
            "detail": {**got, "latency_ms": lat, "deep": deep}}
    return out


def bench_backends(ctx: Context) -> list[Row]:
    why = missing()
    if why is not None:
        return [Row("backends: PostgreSQL against SQLite", "", None, "", error=f"no PostgreSQL here: {why}")]
    pg = PgServer()
    pg.start()
    try:
        got = _runs(ctx, pg)
        ctx.log(f"backends: PostgreSQL x1: a chain of {ctx.sizes.dag_chain}, a fan-out/fan-in of {ctx.sizes.dag_fan:,}")
        dag = dag_once(ctx, pg.database())
    finally:
        pg.stop()
    lite, one, two = got[("sqlite", 1)], got[("postgres", 1)], got[("postgres", 2)]
    s = ctx.sizes
    rows: list[Row] = []
    for key, title, unit in (("control", f"control plane: {s.control_jobs:,} jobs submit -> lease -> complete", "/s"),
                             ("submits", f"single submits: {s.submit_clients} clients, 1 job per request", "/s"),
                             ("shell", f"shell throughput: {s.shell_jobs:,} x echo hello, 1 worker x {s.concurrency}",
                              "/s")):
        goal = {"control": 0.5, "shell": 0.9}.get(key)
        rows.append(Row(f"{title}, SQLite", "", lite[key], unit, detail={"runs": lite["detail"][key]}))
        rows.append(Row(f"{title}, PostgreSQL x1", f">= {goal:.0%} of SQLite" if goal else "vs SQLite", one[key],
                        unit, peer=lite[key], peer_label="SQLite", ratio_goal=goal, detail={"runs": one["detail"][key]}))
        rows.append(Row(f"{title}, PostgreSQL x2", "no slower than x1", two[key], unit, peer=one[key],
                        peer_label="PostgreSQL x1", ratio_goal=1.0, detail={"runs": two["detail"][key]}))
    for key, title in (("p50", "latency at idle: submit -> result, p50"), ("p99", "latency at idle: submit -> result, p99")):
        rows.append(Row(f"{title}, SQLite", "", lite[key], "ms", higher_better=False))
        rows.append(Row(f"{title}, PostgreSQL x1", "vs SQLite", one[key], "ms", peer=lite[key], peer_label="SQLite",
                        higher_better=False))
        rows.append(Row(f"{title}, PostgreSQL x2 (submit to one, wait on the other)", "vs x1", two[key], "ms",
                        peer=one[key], peer_label="PostgreSQL x1", higher_better=False))
    for (backend, replicas), where in ((("sqlite", 1), ", SQLite"), (("postgres", 1), ", PostgreSQL x1"),
                                       (("postgres", 2), ", PostgreSQL x2 (submitted to the second)")):
        rows += delayed_rows([got[(backend, replicas)]["delayed"]], s.delayed_jobs, where)
    for key, title in (("deep_one", f"claim latency p50, {s.deep_queue:,} jobs queued, a worker of that queue"),
                       ("deep_two", f"claim latency p50, {s.deep_queue:,} jobs queued, a worker of it and another")):
        rows.append(Row(f"{title}, SQLite", "", lite[key], "ms", higher_better=False,
                        detail={"ms": lite["detail"]["deep"]}))
        rows.append(Row(f"{title}, PostgreSQL x1", "vs SQLite", one[key], "ms", peer=lite[key], peer_label="SQLite",
                        higher_better=False, detail={"ms": one["detail"]["deep"]}))
    return rows + dag_rows([dag], s, ", PostgreSQL x1")
