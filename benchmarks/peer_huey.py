"""The Huey side of the benchmarks; runs on the Python of Huey's own virtualenv and prints JSON lines.

    python peer_huey.py shell --n 2000 --threads 8 --dir DIR
    python peer_huey.py latency --n 300 --idle 60 --threads 8 --dir DIR
    python peer_huey.py noop --n 5000 --threads 8 --dir DIR    (function tasks: throughput, then round trips)

It starts a Huey consumer (``huey_consumer peer_huey.huey -w THREADS -k
thread``, default options otherwise) with SqliteHuey's default storage in a
file under DIR, enqueues tasks one by one from this process and reads every
result back, checking for it every 1 ms. The tasks run the same commands
orch's jobs run, through ``subprocess.run(..., capture_output=True)``. This
file is also the consumer's module (``peer_huey.huey``), so it must not import
anything of orch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from huey import SqliteHuey

huey = SqliteHuey("orch-bench", filename=os.environ.get("PEER_HUEY_DB", ":memory:"))


@huey.task()
def echo_hello() -> list:
    p = subprocess.run(["echo", "hello"], capture_output=True)
    return [p.returncode, p.stdout.decode()]


@huey.task()
def run_true() -> int:
    return subprocess.run(["true"], capture_output=True).returncode


@huey.task()
def noop() -> int:
    return 1


def read_back(result, deadline: float):
    """The task's result, checking every 1 ms (Result.get() does not block)."""
    while True:
        value = result.get()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("a Huey result did not come in time")
        time.sleep(0.001)


class Consumer:
    def __init__(self, workdir: Path, threads: int) -> None:
        self.log_path = workdir / "huey-consumer.log"
        self.log = open(self.log_path, "ab")
        env = dict(os.environ, PEER_HUEY_DB=huey.storage.filename, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent),
                                                        env.get("PYTHONPATH", "")) if p)
        self.p = subprocess.Popen(
            [sys.executable, "-m", "huey.bin.huey_consumer", "peer_huey.huey", "-w", str(threads), "-k", "thread"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(workdir))
        # Same process group as this script: whoever ends our group ends the consumer too.
        deadline = time.monotonic() + 60
        while b"consumer started" not in self.log_path.read_bytes().lower():
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Huey consumer did not start: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.02)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)  # Huey's graceful stop
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        self.log.close()


def emit(data: dict) -> None:
    print(json.dumps(data), flush=True)


def synchronous_level() -> int:
    conn = huey.storage.conn
    return conn.execute("PRAGMA synchronous").fetchone()[0]


def shell(args: argparse.Namespace, workdir: Path) -> None:
    consumer = Consumer(workdir, args.threads)
    try:
        deadline = time.monotonic() + args.deadline
        t0 = time.perf_counter()
        results = [echo_hello() for _ in range(args.n)]
        enqueued = time.perf_counter() - t0
        bad = 0
        for r in results:
            code, out = read_back(r, deadline)
            bad += code != 0 or out != "hello\n"
        elapsed = time.perf_counter() - t0
        if bad:
            raise RuntimeError(f"{bad} Huey tasks did not print hello")
        emit({"shell": {"n": args.n, "elapsed": elapsed, "rate": args.n / elapsed, "enqueue_s": enqueued,
                        "threads": args.threads, "synchronous": synchronous_level()}})
    finally:
        consumer.stop()


def latency(args: argparse.Namespace, workdir: Path) -> None:
    consumer = Consumer(workdir, args.threads)
    try:
        deadline = time.monotonic() + args.deadline + args.idle
        for _ in range(args.warmup):
            read_back(run_true(), deadline)
        samples = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            code = read_back(run_true(), deadline)
            samples.append((time.perf_counter() - t0) * 1000)
            if code != 0:
                raise RuntimeError(f"true exited {code} under Huey")
        emit({"latencies_ms": samples})
        if args.idle > 0:
            time.sleep(args.idle)  # idling on purpose: the figure is the round trip after it
            t0 = time.perf_counter()
            read_back(run_true(), time.monotonic() + args.deadline)
            emit({"after_idle_ms": (time.perf_counter() - t0) * 1000, "idle_s": args.idle})
    finally:
        consumer.stop()


def noop_mode(args: argparse.Namespace, workdir: Path) -> None:
    """A Python function that does nothing: enqueue all, read all back; then one at a time, round trips."""
    consumer = Consumer(workdir, args.threads)
    try:
        deadline = time.monotonic() + args.deadline
        for _ in range(args.warmup):
            read_back(noop(), deadline)
        t0 = time.perf_counter()
        results = [noop() for _ in range(args.n)]
        for r in results:
            if read_back(r, deadline) != 1:
                raise RuntimeError("a Huey noop did not return 1")
        elapsed = time.perf_counter() - t0
        samples = []
        for _ in range(min(args.n, 300)):
            t1 = time.perf_counter()
            read_back(noop(), deadline)
            samples.append((time.perf_counter() - t1) * 1000)
        emit({"noop": {"n": args.n, "elapsed": elapsed, "rate": args.n / elapsed, "threads": args.threads,
                       "latencies_ms": samples, "synchronous": synchronous_level()}})
    finally:
        consumer.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["shell", "latency", "noop", "check"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--deadline", type=float, default=600.0)
    ap.add_argument("--dir", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.mode == "check":
        import huey as huey_package

        emit({"huey": huey_package.__version__})
        return 0
    workdir = args.dir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PEER_HUEY_DB"):
        # The consumer imports this module afresh: it must open the same database file.
        os.environ["PEER_HUEY_DB"] = str(workdir / "huey.db")
        os.execv(sys.executable, [sys.executable, *sys.argv])
    {"shell": shell, "latency": latency, "noop": noop_mode}[args.mode](args, workdir)
    return 0


if __name__ == "__main__":
    # Enqueue through the module the consumer imports: Huey names tasks after their module.
    import peer_huey

    sys.exit(peer_huey.main())
