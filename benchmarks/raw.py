"""The raw limit: start and reap N `echo hello` processes directly from Python, K in flight; prints JSON.

    python -m benchmarks.raw --n 2000 --inflight 8

Three plain-Python methods, run one after the other in this one process, best
of them reported: K threads each calling ``subprocess.run(..., capture_output=True)``;
asyncio's ``create_subprocess_exec`` with pipes (a pidfd child watcher where the
platform has one), K in flight; and, where the platform has them, one event loop
calling ``os.posix_spawn`` itself and watching the pipes and a pidfd with loop
readers, K in flight (the fastest here, and what orch's worker does on Linux).
All of them read the output, as orch's worker does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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


def spawn_on_loop(n: int, inflight: int) -> float | None:
    """posix_spawn on the loop's thread, loop readers on the pipes and on a pidfd; None where unavailable."""
    if not all(hasattr(os, name) for name in ("posix_spawn", "pidfd_open", "POSIX_SPAWN_DUP2")):
        return None
    path = shutil.which(ARGV[0])
    assert path is not None
    env = dict(os.environ)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(inflight)

        async def one() -> None:
            async with sem:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                pid = os.posix_spawn(path, ARGV, env, setsid=True, file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)])
                os.close(out_w)
                os.close(err_w)
                pidfd = os.pidfd_open(pid)
                done = loop.create_future()
                left = [3]
                out = bytearray()

                def finished(fd: int) -> None:
                    loop.remove_reader(fd)
                    os.close(fd)
                    left[0] -= 1
                    if not left[0]:
                        done.set_result(None)

                def readable(fd: int) -> None:
                    data = os.read(fd, 65536)
                    if data:
                        if fd == out_r:
                            out.extend(data)
                    else:
                        finished(fd)

                def exited() -> None:
                    os.waitpid(pid, 0)
                    finished(pidfd)

                for fd in (out_r, err_r):
                    os.set_blocking(fd, False)
                    loop.add_reader(fd, readable, fd)
                loop.add_reader(pidfd, exited)
                await done
                if out != b"hello\n":
                    raise RuntimeError(f"echo hello gave {bytes(out)!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - t0)

    return asyncio.run(main())


def measure(n: int, inflight: int) -> dict[str, object]:
    threads(min(n, 50), inflight)  # warm up: page cache, the executable's path
    rates: dict[str, float] = {"threads": threads(n, inflight)}
    rates["asyncio"], watcher = run_asyncio(n, inflight)
    spawned = spawn_on_loop(n, inflight)
    if spawned is not None:
        rates["posix_spawn"] = spawned
    best = max(rates, key=lambda k: rates[k])
    return {"raw": {"n": n, "inflight": inflight, "threads_rate": rates["threads"], "asyncio_rate": rates["asyncio"],
                    "asyncio_watcher": watcher, "posix_spawn_rate": rates.get("posix_spawn"), "best": best,
                    "rate": rates[best]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.raw", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=8)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.n, args.inflight)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
