"""A /healthz prober in a process of its own: how long the scheduler takes to answer while others load it.

    python -m benchmarks.probe --url URL --seconds 10 --pid SCHEDULER_PID

Asks ``GET /healthz`` every 10 ms (one request at a time, on one kept-alive
connection) for ``--seconds``, reads the scheduler's resident memory at each
answer, and prints one JSON line ``{"probe": {...}}`` with the latencies' p50,
p99 and worst (ms) and the peak memory (MB). In a process of its own so that
what it measures is the scheduler's event loop, not the load generators'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def main(url: str, seconds: float, pid: int) -> dict[str, float]:
    lat: list[float] = []
    peak = rss_mb(pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            async with session.get(url + "/healthz") as resp:
                await resp.read()
            lat.append((time.perf_counter() - t0) * 1000)
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(max(0.0, 0.01 - (time.perf_counter() - t0)))
    lat.sort()
    return {"samples": len(lat), "p50_ms": lat[len(lat) // 2], "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max_ms": lat[-1], "rss_peak_mb": peak}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--pid", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps({"probe": asyncio.run(main(args.url.rstrip("/"), args.seconds, args.pid))}), flush=True)
