"""End to end start-up: every way `orch scheduler` / `orch up` cannot start is one line and a non-zero exit at
once (never a traceback, never a process left alive); one scheduler per database; private files whatever the
umask. Real orch processes; store-level cases are in tests/integration/test_store_storage.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers import Proc, client_token, http, job, orch_cmd, orch_test_env, run_cli, start_scheduler, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # SQLite's files: a full disk, a damaged or locked orch.db

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


@pytest.fixture
def data_copy(tmp_path: Path, real_data: Path) -> tuple[Path, dict[str, str]]:
    data = tmp_path / "data"
    shutil.copytree(real_data, data)
    return data, orch_test_env(data)


def root_page(db: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    finally:
        conn.close()


# --------------------------------------------------------------------------- a damaged database


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("damage", ["garbage-over-the-header", "truncated-mid-page", "a-damaged-table-page"])
def test_a_damaged_database_is_one_line_with_the_way_out_and_an_exit_at_once(
        data_copy: tuple[Path, dict[str, str]], damage: str, command: str) -> None:
    data, env = data_copy
    db = data / "orch.db"
    if damage == "garbage-over-the-header":
        with open(db, "r+b") as f:
            f.write(b"this is not a database " * 100)
    elif damage == "truncated-mid-page":
        os.truncate(db, db.stat().st_size - 4096 - 1000)
    else:
        # The header and schema stay good: the damage is found only when start-up reads the workers.
        page = root_page(db, "workers")
        with open(db, "r+b") as f:
            f.seek((page - 1) * 4096)
            f.write(b"\xff" * 4096)
    code, line, took = start_fails(COMMANDS[command], env)
    assert code != 0
    assert str(db) in line and f"sqlite3 {db} .recover" in line, line
    assert took < 15, f"took {took:.1f}s to give up"


# --------------------------------------------------------------------------- a broken token file, a read-only dir


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("text", ["{", "[]", '{"client": 5}'])
def test_a_broken_token_file_is_one_line_exit_2(data_copy: tuple[Path, dict[str, str]], command: str,
                                                 text: str) -> None:
    data, env = data_copy
    (data / "tokens.json").write_text(text)
    code, line, _ = start_fails(COMMANDS[command], env)
    assert code == 2 and str(data / "tokens.json") in line, line


def mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a small tmpfs on ``folder``, or skip saying why (fail under CI, which runs as root)."""
    r = None
    if os.geteuid() == 0 and shutil.which("mount"):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                           text=True)
        if r.returncode == 0:
            return
    why = f"cannot mount a tmpfs: {r.stderr.strip() if r else 'needs root and mount(8)'}"
    if os.environ.get("CI"):
        pytest.fail(why + " (CI runs the tests as root)")
    pytest.skip(why)


@pytest.fixture
def read_only(tmp_path: Path, real_data: Path) -> Iterator[Path]:
    """A read-only file system holding a copy of a real data dir (file modes do not stop root: a mount does)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mount_tmpfs(folder, "size=4m,mode=0700")
    try:
        shutil.copytree(real_data, folder / "data")
        os.chmod(folder / "data", 0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("which", ["existing", "to-be-made"])
def test_a_read_only_data_dir_is_one_line_exit_2(read_only: Path, command: str, which: str) -> None:
    data = read_only / "data" if which == "existing" else read_only / "new"
    code, line, _ = start_fails(COMMANDS[command], orch_test_env(data))
    assert code == 2 and str(data) in line, line
    assert "read-only" in line.lower(), line


# --------------------------------------------------------------------------- every other way a start can fail


def test_every_other_start_up_failure_is_one_line_exit_2(tmp_path: Path, real_data: Path) -> None:
    def env_for(name: str, **extra: str) -> dict[str, str]:
        data = tmp_path / name / "data"
        data.parent.mkdir()
        return orch_test_env(data, **extra)

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    newer = tmp_path / "newer" / "data"
    shutil.copytree(real_data, newer)
    conn = sqlite3.connect(newer / "orch.db")
    conn.execute("PRAGMA user_version = 9999")
    conn.close()
    foreign = tmp_path / "foreign" / "data"  # another program's database, where orch's tables would go
    foreign.mkdir(parents=True)
    conn = sqlite3.connect(foreign / "orch.db")
    conn.execute("CREATE TABLE jobs (theirs TEXT)")
    conn.commit()
    conn.close()
    folder_db = tmp_path / "folder-db"
    folder_db.mkdir()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    cases = {
        "storage.path is a folder": (env_for("p1", ORCH_STORAGE_PATH=str(folder_db)), str(folder_db)),
        "storage.path under a file": (env_for("p2", ORCH_STORAGE_PATH=str(a_file / "orch.db")), str(a_file)),
        "storage.path nowhere writable": (env_for("p3", ORCH_STORAGE_PATH="/proc/orch/orch.db"), "/proc/orch"),
        "the data dir is a file": (orch_test_env(a_file), str(a_file)),
        "a database newer than this orch": (orch_test_env(newer), str(newer / "orch.db")),
        "another program's database": (orch_test_env(foreign), str(foreign / "orch.db")),
        "TLS files that are missing": (env_for("t1", ORCH_TLS_CERT=str(tmp_path / "none.pem"),
                                               ORCH_TLS_KEY=str(tmp_path / "none-key.pem")), "none.pem"),
        "TLS files that are no certificate": (env_for("t2", ORCH_TLS_CERT=str(not_pem), ORCH_TLS_KEY=str(not_pem)),
                                              str(not_pem)),
        "a lease_ttl of nan": (env_for("n1", ORCH_SCHEDULER_LEASE_TTL="nan"), "ORCH_SCHEDULER_LEASE_TTL"),
    }
    for what, (env, named) in cases.items():
        code, line, _ = start_fails(COMMANDS["scheduler"], env)
        assert code == 2, (what, code, line)
        assert named in line, (what, line)
    assert stat.S_ISDIR(folder_db.stat().st_mode) and mode(folder_db) == 0o755  # left as it was


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
