"""The store against its disk: a full disk.

A real SQLite file in tmp_path. A real full disk (a small tmpfs) is in tests/e2e/test_full_disk.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from orch.errors import StorageFull
from orch.models import RetryPolicy, parse_spec
from orch.store.sqlite import SqliteStore

POLICY = RetryPolicy(max_attempts=3, base=1.0, factor=2.0, cap=300.0, jitter=0.0)


async def submit(store: SqliteStore, **kw: Any) -> int:
    return (await store.submit([parse_spec({"command": ["true"], **kw})], POLICY))[0]["id"]


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
            assert (await store.get_job(job_id))["spec"]["name"] == "after"
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
            assert (await store.get_job(made[-1]["id"]))["state"] == "queued"
        finally:
            await store.close()

    asyncio.run(main())
