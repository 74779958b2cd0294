"""End to end: a real full disk under a real scheduler (a small tmpfs filled with a ballast file, then freed).

Mounting needs root, which CI has: where it cannot mount, the tests fail under CI (the CI environment
variable set) and are skipped elsewhere, saying why.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import client_token, http, job, orch_test_env, run_cli, start_scheduler, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # SQLite's files: a full disk, a damaged or locked orch.db

FAST = {
    "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.2",  # a reaper pass every 0.1 s
    "ORCH_SCHEDULER_LEASE_TTL": "2",
    "ORCH_SCHEDULER_RECOVERY_GRACE": "2",
}
PAD = "x" * 65536  # a job this big needs new WAL pages at once


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of our own."""
    folder = tmp_path / "disk"
    folder.mkdir()
    r = None
    if os.geteuid() == 0 and shutil.which("mount"):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if r is None or r.returncode != 0:
        why = f"cannot mount a small tmpfs to fill: {r.stderr.strip() if r else 'needs root and mount(8)'}"
        if os.environ.get("CI"):
            pytest.fail(why + " (CI runs the tests as root)")
        pytest.skip(why)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """Write a ballast file until not one more byte fits."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return ballast


def submit(url: str, **kw: Any) -> tuple[int, Any]:
    return http("POST", f"{url}/v1/jobs", {"command": ["true"], **kw})


def test_a_full_disk_is_507_storage_full_one_reaper_line_and_all_is_well_once_freed(disk: Path) -> None:
    data = disk / "data"
    env = orch_test_env(data, **FAST)
    sched, url = start_scheduler(disk.parent, env)
    again = None
    try:
        # A worker that goes silent while the disk is full: the reaper then has something to write, and fails.
        status, reg = http("POST", f"{url}/v1/workers", {"name": "silent"}, token=client_token(data, "join"))
        assert status == 201
        beat = f"{url}/v1/workers/{reg['worker_id']}/heartbeat"
        assert http("POST", beat, {"running": []}, token=reg["credential"])[0] == 200
        acked = [submit(url, name=f"before-{i}")[1]["id"] for i in range(5)]
        ballast = fill(disk)

        refused = None
        for i in range(2000):  # the WAL may still hold a little room
            status, body = submit(url, name=f"during-{i}", env={"PAD": PAD})
            if status != 201:
                refused = (status, body)
                break
            acked.append(body["id"])
        assert refused is not None, "the disk never filled"
        status, body = refused
        assert status == 507 and body["error"]["code"] == "storage_full", body
        assert "no space left" in body["error"]["message"] and str(data / "orch.db") in body["error"]["message"]
        status, body = http("POST", beat, {"running": []}, token=reg["credential"])
        assert status == 507 and body["error"]["code"] == "storage_full", body
        wait_until(lambda: "reaper pass failed: no space left" in sched.log(), 30, "the reaper to fail")
        # While the reaper keeps failing: reads go on, and the CLI says what is wrong in one line.
        for job_id in acked:
            assert job(url, job_id)["id"] == job_id
        r = run_cli(["run", "--server", url, "--", "echo", "hi"], env)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "no space left" in r.stderr, r.stderr
        r = run_cli(["jobs", "--server", url, "--limit", "1000"], env)
        assert r.returncode == 0 and all(f"\n{i} " in "\n" + r.stdout for i in acked), r.stderr
        assert sched.alive()

        ballast.unlink()
        status, body = wait_until(lambda: (s := submit(url, name="after"))[0] == 201 and s, 15, "a submit to work")
        acked.append(body["id"])
        told = wait_until(lambda: re.search(r"reaper passes work again, after (\d+) failed", sched.log()), 15,
                          "the reaper to say it works again")
        log = sched.log()
        assert int(told.group(1)) >= 2, log  # many failed passes ...
        assert log.count("reaper pass failed") == 1, log  # ... one line
        assert "Traceback" not in log, log

        # Every acknowledged job is there after a restart.
        sched.stop()
        again, url = start_scheduler(disk.parent, env, name="again")
        for job_id in acked:
            assert job(url, job_id)["id"] == job_id
    finally:
        for p in (again, sched):
            if p is not None:
                p.stop()


def test_a_scheduler_started_on_a_full_disk_says_so_and_starts_once_there_is_space(disk: Path) -> None:
    """A clean stop removes -wal and -shm; a start must make a new -shm, which SQLite cannot grow on a full
    disk (an I/O error, SQLITE_IOERR_SHMSIZE, rather than SQLITE_FULL)."""
    data = disk / "data"
    env = orch_test_env(data, **FAST)
    sched, url = start_scheduler(disk.parent, env)
    try:
        status, body = submit(url, name="kept")
        assert status == 201
    finally:
        sched.stop()
    assert not (data / "orch.db-shm").exists()
    ballast = fill(disk)
    r = run_cli(["scheduler", "--port", "0"], env, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no space left" in r.stderr and str(data / "orch.db") in r.stderr, r.stderr
    ballast.unlink()
    sched, url = start_scheduler(disk.parent, env, name="again")
    try:
        assert job(url, body["id"])["spec"]["name"] == "kept"
    finally:
        sched.stop()
