"""End to end: jobs that write a lot, or fast, or while the scheduler is away; output streamed without holes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import ended, http, job, orch_cmd, start_scheduler, start_worker, submit, wait_until

pytestmark = pytest.mark.e2e

MARKER = re.compile(r"\[orch: ([0-9,]+) bytes of (stdout|stderr) not kept\]\n")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssWatch:
    """The highest resident size a process reaches while the watch runs (sampled every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_a_200_mb_job_succeeds_keeps_its_tail_and_leaves_the_worker_healthy(tmp_path: Path, orch_env: dict) -> None:
    """The worker keeps a bounded tail, every report fits the body limit, and the next job runs at attempt 1."""
    sched, url = start_scheduler(tmp_path, orch_env)
    worker = start_worker(tmp_path, orch_env, url, "w", concurrency=2)
    try:
        wait_until(lambda: any(w["state"] == "alive" for w in http("GET", url + "/v1/workers")[1]["workers"]),
                   30, "the worker to join")
        idle = rss_kib(worker.pid)
        watch = RssWatch(worker.pid)
        big = submit(url, {"shell": "yes aaaaaaaa | head -c 200000000; echo tail-end-marker",
                           "max_attempts": 1})
        final = ended(url, big, 120)
        peak = watch.stop()
        assert final["state"] == "succeeded", final
        assert final["exit_code"] == 0
        result = final["result"]
        assert result["stdout_truncated"] is True
        stdout = result["stdout"]
        m = MARKER.match(stdout)
        assert m is not None, stdout[:200]
        kept = stdout[m.end():]
        limit = 1 << 20  # scheduler.output_limit_bytes
        assert len(kept.encode()) <= limit
        assert kept.endswith("aaaaaaaa\naatail-end-marker\n")  # head -c cuts the last line: 200,000,000 = 9 x 22,222,222 + 2
        assert int(m.group(1).replace(",", "")) + len(kept.encode()) == 200_000_000 + len("tail-end-marker\n")
        assert final["attempts"][0]["stdout_bytes"] == 200_000_000 + len("tail-end-marker\n")
        print(f"worker RSS: {idle / 1024:.0f} MB idle, {peak / 1024:.0f} MB at most while the job wrote 200 MB")
        assert peak < 100 * 1024, f"worker RSS grew from {idle} KiB to {peak} KiB"
        # The worker is not poisoned: the next job on it succeeds at its first attempt.
        nxt = ended(url, submit(url, {"command": ["echo", "next"], "max_attempts": 1}))
        assert nxt["state"] == "succeeded" and nxt["attempt"] == 1, nxt
        assert nxt["result"]["stdout"] == "next\n"
        assert "413" not in worker.log()
    finally:
        worker.stop()
        sched.stop()


def test_a_chatty_job_through_a_scheduler_stop_ends_well(tmp_path: Path, orch_env: dict) -> None:
    """Output piles up while the scheduler is stopped; what is sent after stays under the body limit."""
    # The lease (10 s) outlasts the stop (4 s): the job's end is about its output, not about a lease the reaper
    # might sweep before the worker's heartbeat is heard (a lone PostgreSQL scheduler gives no grace after a stall).
    env = {**orch_env, "ORCH_SCHEDULER_MAX_BODY_BYTES": str(256 * 1024), "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.3",
           "ORCH_SCHEDULER_LEASE_TTL": "10", "ORCH_SCHEDULER_RECOVERY_GRACE": "5"}
    sched, url = start_scheduler(tmp_path, env)
    worker = start_worker(tmp_path, env, url, "w", concurrency=2)
    started = tmp_path / "started"
    release = tmp_path / "release"
    # ~1 MB/s until told to stop, then a last line.
    script = (f"import os,sys,time\nopen({str(started)!r},'w').close()\ni=0\n"
              f"while not os.path.exists({str(release)!r}):\n"
              "    sys.stdout.write(f'{i:08d} ' + 'x' * 91 + '\\n' * 1); i += 1\n"
              "    if i % 100 == 0: sys.stdout.flush(); time.sleep(0.01)\n"
              "print('done', i)\n")
    try:
        chatty = submit(url, {"command": [sys.executable, "-c", script], "max_attempts": 1})
        wait_until(started.exists, 30, "the job to start")
        sched.signal(signal.SIGSTOP)
        try:
            time.sleep(4)  # the scheduler is away: output piles up in the worker (~4 MB against a 256 KiB body limit)
        finally:
            sched.signal(signal.SIGCONT)
        release.touch()
        final = ended(url, chatty, 60)
        assert final["state"] == "succeeded", final
        assert final["result"]["stdout"].endswith("\n") and "done " in final["result"]["stdout"]
        nxt = ended(url, submit(url, {"command": ["echo", "after"], "max_attempts": 1}))
        assert nxt["state"] == "succeeded" and nxt["attempt"] == 1, nxt
        assert "413" not in worker.log() and "larger than" not in worker.log()
    finally:
        worker.stop()
        sched.stop()


def check_stream(shown: str, original: str) -> int:
    """``shown`` must be ``original`` with some ranges replaced by markers that count them exactly, in order;
    returns the number of markers. A marker that does not start a line has a newline put before it."""
    p = 0  # where in ``original`` the shown text has got to
    pos = 0
    markers = 0
    for m in MARKER.finditer(shown):
        part = shown[pos:m.start()]
        if original[p:p + len(part)] != part and part.endswith("\n") and original[p:p + len(part) - 1] == part[:-1]:
            part = part[:-1]  # the newline put before a marker that came mid-line
        assert original[p:p + len(part)] == part, f"shown output differs from the job's at byte {p:,}"
        p += len(part) + int(m.group(1).replace(",", ""))
        markers += 1
        pos = m.end()
    rest = shown[pos:]
    assert original[p:] == rest, f"shown output differs from the job's at byte {p:,}, or stops short"
    return markers


def test_follow_marks_every_byte_it_did_not_show(tmp_path: Path, orch_env: dict) -> None:
    """`orch run --wait` of a 6 MB job: what is shown is in order, and every hole is marked with its size."""
    env = {**orch_env, "ORCH_SCHEDULER_OUTPUT_LIMIT_BYTES": str(256 * 1024)}
    sched, url = start_scheduler(tmp_path, env)
    worker = start_worker(tmp_path, env, url, "w")
    lines = 100_000
    line = "{:07d} " + "y" * 52 + "\n"  # 60 bytes a line: 6,000,000 bytes
    try:
        cli = subprocess.run(
            [*orch_cmd(), "run", "--server", url, "--wait", "--", sys.executable, "-c",
             f"import sys\nfor i in range({lines}): sys.stdout.write({line!r}.format(i))\n"],
            env=env, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        original = "".join(line.format(i) for i in range(lines))
        holes = check_stream(cli.stdout, original)
        print(f"follow showed {len(cli.stdout):,} bytes with {holes} holes marked")
        # The stored output marks its cut the same way: the head that was not kept, then the tail.
        job_id = int(re.search(r"job (\d+)", cli.stderr).group(1))
        stored = job(url, job_id)["result"]["stdout"]
        assert MARKER.match(stored), stored[:100]
        assert check_stream(stored, original) == 1
    finally:
        worker.stop()
        sched.stop()
