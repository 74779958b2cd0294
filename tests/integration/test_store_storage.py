"""The store against its disk: a full disk, a damaged file, file modes, the one-scheduler lock.

A real SQLite file in tmp_path. A real full disk (a small tmpfs) is in tests/e2e/test_full_disk.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from orch.core.errors import StorageCorrupt, StorageError, StorageFull
from orch.core.retry import RetryPolicy
from orch.core.spec import parse_spec
from orch.store.files import DatabaseLock, private_dir
from orch.store.sqlite import SqliteStore

pytestmark = pytest.mark.backend_specific  # SQLite's own files and machinery

POLICY = RetryPolicy(max_attempts=3, base=1.0, factor=2.0, cap=300.0, jitter=0.0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def submit(store: SqliteStore, **kw: Any) -> int:
    return (await store.submit([parse_spec({"command": ["true"], **kw})], POLICY))[0].id


def make_db(path: Path) -> None:
    async def main() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            await store.register_worker(name="w", hostname="h", queues=["default"], concurrency=1)
            for i in range(50):
                await submit(store, name=f"job-{i}", env={"SECRET": "s" * 500})
        finally:
            await store.close()

    asyncio.run(main())


def store_threads() -> list[str]:
    """Threads of stores (writer, fsync, checkpoint) and of aiosqlite's connections."""
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith("orch-") or "_connection_worker_thread" in t.name)


# --------------------------------------------------------------------------- a full disk


def test_an_fsync_without_space_is_storage_full_and_later_ones_work(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The WAL's fdatasync (on the flusher thread) can find no space on a file system that allocates late."""
    real = os.fdatasync
    full = threading.Event()

    def fdatasync(fd: int) -> None:
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    async def main() -> None:
        store = SqliteStore(tmp_path / "orch.db")
        await store.open()
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        try:
            full.set()
            with pytest.raises(StorageFull) as info:
                await submit(store)
            assert info.value.http_status == 507 and info.value.code == "storage_full"
            assert str(tmp_path / "orch.db") in info.value.message and "space" in info.value.message
            full.clear()
            job_id = await submit(store, name="after")
            assert (await store.get_job(job_id)).spec["name"] == "after"
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("jobs", [1, 100], ids=["inline", "writer-thread"])
def test_a_transaction_left_open_by_a_failed_batch_does_not_stop_the_next(tmp_path: Path, jobs: int) -> None:
    """A failed batch whose ROLLBACK failed too (a full disk can do that) leaves its transaction open: the next
    batch ends it and runs, or no write would ever work again."""

    async def main() -> None:
        store = SqliteStore(tmp_path / "orch.db")
        await store.open()
        try:
            conn = store._wconn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")  # what such a batch leaves behind
            specs = [parse_spec({"command": ["true"], "name": f"n{i}"}) for i in range(jobs)]
            made = await asyncio.wait_for(store.submit(specs, POLICY), 5)
            assert not conn.in_transaction
            assert (await store.get_job(made[-1].id)).job.state == "queued"
        finally:
            await store.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- a damaged file, a failed open


@pytest.mark.parametrize("damage", ["garbage-header", "truncated-mid-page"])
def test_a_damaged_database_fails_open_naming_the_file_and_the_way_out(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "orch.db"
    make_db(path)
    if damage == "garbage-header":
        with open(path, "r+b") as f:
            f.write(b"not a database, really " * 50)
    else:
        os.truncate(path, path.stat().st_size // 2 + 100)
    before = store_threads()

    async def main() -> None:
        store = SqliteStore(path)
        with pytest.raises(StorageCorrupt) as info:
            await store.open()
        message = info.value.message
        assert str(path) in message and f"sqlite3 {path} .recover" in message, message
        assert info.value.exit_code != 0
        await store.close()  # a second close does no harm

    asyncio.run(main())
    assert store_threads() == before  # nothing of the failed store keeps the process alive


def test_a_store_that_failed_to_open_leaves_no_thread(tmp_path: Path) -> None:
    """The writer's executor starts before the database is read: it must go when the open fails."""
    path = tmp_path / "orch.db"
    path.write_bytes(b"\xff" * 8192)
    before = store_threads()

    async def main() -> None:
        with pytest.raises(StorageError):
            await SqliteStore(path).open()
        assert store_threads() == before

    asyncio.run(main())


# --------------------------------------------------------------------------- file modes


def test_database_files_are_0600_and_a_new_folder_0700_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "made" / "here" / "orch.db"
    old = os.umask(0)
    try:
        async def main() -> None:
            store = SqliteStore(path)
            await store.open()
            try:
                await submit(store, env={"TOKEN": "secret"})
                for name in ("orch.db", "orch.db-wal", "orch.db-shm"):
                    assert mode(path.parent / name) == 0o600, name
                assert mode(path.parent) == 0o700
            finally:
                await store.close()

        asyncio.run(main())
    finally:
        os.umask(old)


def test_existing_database_files_readable_by_others_are_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "orch.db"
    make_db(path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").touch()
        os.chmod(f"{path}{suffix}", 0o666)

    async def main() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            for suffix in ("", "-wal", "-shm"):
                assert mode(Path(f"{path}{suffix}")) == 0o600, suffix
            assert (await store.get_job(1)).spec["env"] == {"SECRET": "s" * 500}
        finally:
            await store.close()

    asyncio.run(main())


def test_a_database_path_that_is_a_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    folder.mkdir(mode=0o755)

    async def main() -> None:
        with pytest.raises(StorageError, match="not a file"):
            await SqliteStore(folder).open()

    asyncio.run(main())
    assert mode(folder) == 0o755


def test_the_data_dir_is_made_0700_or_made_so(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert mode(private_dir(tmp_path / "new" / "data")) == 0o700
    finally:
        os.umask(old)
    existing = tmp_path / "existing"
    existing.mkdir()
    os.chmod(existing, 0o777)
    assert mode(private_dir(existing)) == 0o700


def test_a_data_dir_that_is_a_file_or_shared_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(StorageError, match="not a folder"):
        private_dir(file)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(StorageError, match="shared with every user"):
        private_dir(shared)
    assert mode(shared) == 0o1777


# --------------------------------------------------------------------------- one scheduler per database


def test_a_second_lock_on_a_database_is_refused_naming_the_holder(tmp_path: Path) -> None:
    db = tmp_path / "orch.db"
    first = DatabaseLock(db, tmp_path)
    first.acquire()
    try:
        assert (tmp_path / "orch.db.lock").read_text() == f"{os.getpid()}\n"
        assert mode(tmp_path / "orch.db.lock") == 0o600
        with pytest.raises(StorageError) as info:
            DatabaseLock(db, tmp_path).acquire()  # another open of the file: flock refuses it as another process
        assert f"pid {os.getpid()}" in info.value.message and str(db) in info.value.message
        assert str(tmp_path) in info.value.message and info.value.exit_code == 2
    finally:
        first.release()
    again = DatabaseLock(db, tmp_path)
    again.acquire()  # released: it can be taken again
    again.release()


def test_a_lock_left_by_a_dead_scheduler_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "orch.db.lock").write_text("999999999\n")  # its process is gone: the kernel dropped its flock
    lock = DatabaseLock(tmp_path / "orch.db")
    lock.acquire()
    try:
        assert (tmp_path / "orch.db.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
