"""End to end start-up: one scheduler per database; private files whatever the umask.
Real orch processes; store-level cases are in tests/integration/test_store_storage.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import Proc, client_token, http, job, orch_cmd, orch_test_env, run_cli, start_scheduler, wait_until

pytestmark = pytest.mark.e2e

COMMANDS = {"scheduler": ["scheduler", "--port", "0"], "up": ["up", "--port", "0", "--workers", "1"]}


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start printed on stderr (and nothing that looks like a traceback anywhere)."""
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def start_fails(args: list[str], env: dict[str, str]) -> tuple[int, str, float]:
    """Run a start that must fail: (exit code, its one line, seconds it took). A start that hangs fails the test."""
    began = time.monotonic()
    try:
        r = run_cli(args, env, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{args} neither served nor exited within 30 s: {e.stderr!r}") from None
    return r.returncode, one_line(r), time.monotonic() - began


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir a real scheduler made: a registered worker and a few jobs in orch.db, tokens.json."""
    tmp = tmp_path_factory.mktemp("real")
    data = tmp / "data"
    env = orch_test_env(data)
    sched, url = start_scheduler(tmp, env)
    try:
        join = client_token(data, "join")
        status, _ = http("POST", f"{url}/v1/workers", {"name": "w"}, token=join)
        assert status == 201
        for i in range(20):
            status, _ = http("POST", f"{url}/v1/jobs", {"command": ["true"], "name": f"j{i}", "env": {"K": "v" * 300}})
            assert status == 201
    finally:
        sched.stop()
    assert not Path(f"{data}/orch.db-wal").exists()  # a clean stop
    return data


# --------------------------------------------------------------------------- one scheduler per database


def test_a_second_scheduler_on_the_same_database_is_refused_naming_the_pid(tmp_path: Path,
                                                                           orch_env: dict[str, str]) -> None:
    data = Path(orch_env["ORCH_DATA_DIR"])
    first, url = start_scheduler(tmp_path, orch_env)
    again = None
    try:
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["true"], "name": "kept"})
        assert status == 201
        for command in sorted(COMMANDS):
            code, line, _ = start_fails(COMMANDS[command], orch_env)
            assert code == 2, line
            assert f"pid {first.pid}" in line and str(data) in line, line
        # Another data dir whose storage.path is this database: refused too (both would serve it).
        other = orch_test_env(tmp_path / "other", ORCH_STORAGE_PATH=str(data / "orch.db"))
        code, line, _ = start_fails(COMMANDS["scheduler"], other)
        assert code == 2 and f"pid {first.pid}" in line and str(data / "orch.db") in line, line
        assert first.alive() and job(url, body["id"])["spec"]["name"] == "kept"  # the first serves on
        # Killed hard, it holds nothing: the kernel let the lock go with it.
        first.kill9()
        again, url = start_scheduler(tmp_path, orch_test_env(data), name="again")
        assert job(url, body["id"])["spec"]["name"] == "kept"
    finally:
        for p in (again, first):
            if p is not None:
                p.stop()


# --------------------------------------------------------------------------- private files


URL_RE = re.compile(r"(?:listening on|API) (http://\S+)")


def start_with_umask_0(args: list[str], log: Path, env: dict[str, str]) -> tuple[Proc, str]:
    old = os.umask(0)  # the umask a careless user may have; the orch processes inherit it
    try:
        proc = Proc([*orch_cmd(), *args], log, env)
    finally:
        os.umask(old)

    def url() -> str | None:
        if not proc.alive():
            raise AssertionError(f"exited: {proc.log()}")
        m = URL_RE.search(proc.log())
        return m.group(1) if m else None

    found = wait_until(url, 30, f"{args[0]}'s URL")
    wait_until(lambda: http("GET", found + "/healthz")[0] == 200, 30, "healthz")
    return proc, found


def ended(url: str, job_id: int) -> dict:
    return wait_until(lambda: (j := job(url, job_id))["state"] in ("succeeded", "failed") and j, 30, "the job to end")


def test_an_existing_data_dir_and_database_are_made_private_and_jobs_keep_the_umask(tmp_path: Path,
                                                                                    real_data: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(real_data, data)
    os.chmod(data, 0o777)
    for name in ("orch.db", "orch.db-wal", "orch.db-shm", "tokens.json"):
        (data / name).touch()
        os.chmod(data / name, 0o666)
    up, url = start_with_umask_0(["up", "--port", "0", "--workers", "1", "--no-auth"], tmp_path / "up.log",
                                 orch_test_env(data))
    try:
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["sh", "-c", "umask"], "env": {"SECRET": "x"}})
        assert status == 201
        # The job ran with the umask orch was started with: orch left the process umask alone.
        assert ended(url, body["id"])["result"]["stdout"].strip() == "0000"
        assert mode(data) == 0o700
        for name in ("orch.db", "orch.db-wal", "orch.db-shm", "orch.db.lock"):
            assert mode(data / name) == 0o600, name
    finally:
        up.signal(signal.SIGTERM)
        try:
            assert up.wait(30) == 0, up.log()
        finally:
            up.stop()


def test_a_database_elsewhere_and_a_new_data_dir_are_private_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    db = tmp_path / "elsewhere" / "db" / "orch.db"
    sched, url = start_with_umask_0(["scheduler", "--port", "0", "--no-auth"], tmp_path / "scheduler.log",
                                    orch_test_env(data, ORCH_STORAGE_PATH=str(db)))
    try:
        status, _ = http("POST", f"{url}/v1/jobs", {"command": ["true"], "env": {"SECRET": "x"}})
        assert status == 201
        assert mode(data) == 0o700 and mode(db.parent) == 0o700
        for name in ("orch.db", "orch.db-wal", "orch.db-shm", "orch.db.lock"):
            assert mode(db.parent / name) == 0o600, name
    finally:
        sched.stop()
