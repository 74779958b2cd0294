"""The raw limit: start and reap N `echo hello` processes directly from Python, K in flight; prints JSON.

    python -m benchmarks.raw --n 2000 --inflight 8

Two plain-Python methods, run one after the other in this one process, best
of them reported: K threads each calling ``subprocess.run(..., capture_output=True)``,
and asyncio (``create_subprocess_exec`` with pipes, a pidfd child watcher where
the platform has one) with K in flight. Both read the output, as orch's worker
does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

ARGV = ["echo", "hello"]


def threads(n: int, inflight: int) -> float:
    def one(_: int) -> bytes:
        p = subprocess.run(ARGV, capture_output=True)
        if p.returncode != 0 or p.stdout != b"hello\n":
            raise RuntimeError(f"echo hello gave {p.returncode} {p.stdout!r}")
        return p.stdout

    with ThreadPoolExecutor(inflight) as pool:
        t0 = time.perf_counter()
        list(pool.map(one, range(n)))
        return n / (time.perf_counter() - t0)


def run_asyncio(n: int, inflight: int) -> tuple[float, str]:
    async def main() -> float:
        sem = asyncio.Semaphore(inflight)

        async def one() -> None:
            async with sem:
                p = await asyncio.create_subprocess_exec(*ARGV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                         stderr=subprocess.PIPE)
                out, _ = await p.communicate()
                if p.returncode != 0 or out != b"hello\n":
                    raise RuntimeError(f"echo hello gave {p.returncode} {out!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - t0)

    watcher = "default"
    if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
        # 3.12+ uses pidfds by itself; before, the default watcher is a thread per child.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                import os

                os.close(os.pidfd_open(os.getpid()))
                asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
                watcher = "pidfd"
            except (AttributeError, OSError):
                pass
    elif sys.version_info >= (3, 12):
        watcher = "pidfd (default)"
    return asyncio.run(main()), watcher


def measure(n: int, inflight: int) -> dict[str, object]:
    threads(min(n, 50), inflight)  # warm up: page cache, the executable's path
    t_rate = threads(n, inflight)
    a_rate, watcher = run_asyncio(n, inflight)
    best = "threads" if t_rate >= a_rate else "asyncio"
    return {"raw": {"n": n, "inflight": inflight, "threads_rate": t_rate, "asyncio_rate": a_rate,
                    "asyncio_watcher": watcher, "best": best, "rate": max(t_rate, a_rate)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.raw", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=8)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.n, args.inflight)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
