"""The SQLite store's own machinery on a real file: schema and migrations, group commit, fsyncs, the WAL,
full disks. What every backend must do is in tests/contract/."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from storekit import POLICY, TTL, FakeClock, claim_one, run_on, shown, spec, submit_one, worker

from helpers import hold_fsyncs, until
from orch.core.errors import NotFound, StorageFull, UnknownWorker
from orch.core.spec import JobSpec, argv_of
from orch.store.sqlite import SqliteStore, migrate, migrations

pytestmark = pytest.mark.backend_specific  # SQLite's own files and machinery


def run(tmp_path: Path, body: Callable[[SqliteStore, FakeClock], Awaitable[None]], **store_kw: Any) -> None:
    """Open a SQLite store on tmp_path/orch.db with a fake clock, run ``body``, always close."""
    run_on("sqlite", tmp_path, body, **store_kw)


def _normal_sql(sql: str | None) -> str | None:
    """SQL text without comments and with single spaces: how a statement was laid out does not count."""
    if sql is None:
        return None
    sql = re.sub(r"--[^\n]*", "", sql)
    return re.sub(r"\s+", " ", sql).replace("( ", "(").replace(" )", ")").strip()


def schema(path: Path) -> list[tuple[str, str, str, str | None]]:
    """Every table, index, view and trigger as (type, name, table, normalized sql)."""
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ).fetchall()
    finally:
        conn.close()
    return sorted((t, n, tbl, _normal_sql(sql)) for t, n, tbl, sql in rows)


def user_version(path: Path) -> int:
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


# --------------------------------------------------------------------------- the file and its schema


@pytest.mark.parametrize(("level", "number"), [("FULL", 2), ("NORMAL", 1)])
def test_database_is_wal_with_the_configured_synchronous_level(tmp_path: Path, level: str, number: int) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        before = store.flushes
        await submit_one(store)
        assert store._wconn is not None
        # The connection itself is crash-safe (NORMAL); FULL's promise, that an acknowledged
        # submit is on disk, is kept by the store's own fsync of the WAL before it answers.
        assert store._wconn.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert store.flushes - before == (1 if number == 2 else 0)
        # A claim promises nothing beyond a crash of the process: it waits for no fsync.
        before = store.flushes
        wid = await store.register_worker(name="w", hostname="h", queues=["default"], concurrency=1)
        await store.claim(wid, ["default"], 1, 10.0)
        assert store.flushes == before
        conn = sqlite3.connect(str(tmp_path / "orch.db"))
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1][0]
        finally:
            conn.close()

    run(tmp_path, body, synchronous=level)


def test_migrations_are_numbered_in_order() -> None:
    steps = migrations()
    assert steps, "no migration found in the package"
    versions = [v for v, _ in steps]
    assert versions == list(range(1, len(steps) + 1))
    assert all(sql.strip() for _, sql in steps)


def test_fresh_schema_equals_the_migrations_applied_step_by_step(tmp_path: Path) -> None:
    # The store's own fresh database.
    run(tmp_path, lambda store, clock: asyncio.sleep(0))
    fresh = schema(tmp_path / "orch.db")
    assert {name for kind, name, _, _ in fresh if kind == "table"} >= {"jobs", "attempts", "output", "events", "workers"}

    # The migration files applied by hand, one after the other.
    by_hand = tmp_path / "by-hand.db"
    conn = sqlite3.connect(str(by_hand))
    for version, sql in migrations():
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    assert schema(by_hand) == fresh

    # From every older version, migrate() reaches the same schema as a fresh database.
    steps = migrations()
    for start in range(len(steps)):
        path = tmp_path / f"from-v{start}.db"
        conn = sqlite3.connect(str(path), isolation_level=None)
        for version, sql in steps[:start]:
            conn.executescript(sql)
            conn.execute(f"PRAGMA user_version = {version}")
        assert migrate(conn) == steps[-1][0]
        conn.close()
        assert schema(path) == fresh, f"migrating from version {start} differs from a fresh database"
        assert user_version(path) == steps[-1][0]


def test_reopening_does_not_rerun_migrations(tmp_path: Path) -> None:
    async def first(store: SqliteStore, clock: FakeClock) -> None:
        await submit_one(store, name="kept")

    run(tmp_path, first)
    before = schema(tmp_path / "orch.db")

    async def again(store: SqliteStore, clock: FakeClock) -> None:
        job = await store.get_job(1)
        assert job.spec["name"] == "kept"
        assert (await store.list_jobs())[0][0].id == 1

    import orch.store.sqlite as sq

    ran: list[int] = []
    real_split = sq._split_sql

    def spy(script: str) -> list[str]:
        ran.append(1)
        return real_split(script)

    mp = pytest.MonkeyPatch()
    mp.setattr(sq, "_split_sql", spy)
    try:
        run(tmp_path, again)
        run(tmp_path, again)
    finally:
        mp.undo()
    assert ran == [], "a migration ran again on an up-to-date database"
    assert schema(tmp_path / "orch.db") == before
    assert user_version(tmp_path / "orch.db") == migrations()[-1][0]


def test_database_newer_than_this_orch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "orch.db"
    conn = sqlite3.connect(str(path))
    conn.execute(f"PRAGMA user_version = {migrations()[-1][0] + 1}")
    conn.close()

    async def main() -> None:
        store = SqliteStore(path)
        with pytest.raises(Exception, match="newer"):
            await store.open()
        await store.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- submit, read, claim


# --------------------------------------------------------------------------- events, retries, failures


# --------------------------------------------------------------------------- workers, heartbeats, leases


# --------------------------------------------------------------------------- cancel


# --------------------------------------------------------------------------- output


def test_migrating_kept_output_gives_each_chunk_its_place_in_the_stream(tmp_path: Path) -> None:
    """A database from before chunk positions: the kept chunks start where the trimmed head ends."""
    path = tmp_path / "orch.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    for version, sql in migrations()[:2]:
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO jobs (id, queue, state, spec, attempt, max_attempts, created_at)"
                 " VALUES (1, 'default', 'succeeded', '{\"kind\":\"command\",\"argv\":[\"x\"]}', 1, 1, 0)")
    conn.execute("INSERT INTO attempts (job_id, attempt, state, started_at, stdout_bytes, stdout_kept, stderr_bytes,"
                 " stderr_kept) VALUES (1, 1, 'succeeded', 0, 5000, 30, 4, 4)")
    for data, stream in (("a" * 10, "stdout"), ("err\n", "stderr"), ("b" * 20, "stdout")):
        conn.execute("INSERT INTO output (job_id, attempt, stream, data, size) VALUES (1, 1, ?, ?, ?)",
                     (stream, data, len(data)))
    conn.close()

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        assert [(c.stream, c.pos) for c in await store.output_after(1)] == [
            ("stdout", 4970), ("stderr", 0), ("stdout", 4980)]
        res = (await shown(store, 1))["result"]
        assert res["stdout"] == "[orch: 4,970 bytes of stdout not kept]\n" + "a" * 10 + "b" * 20
        assert res["stderr"] == "err\n" and res["stderr_truncated"] is False

    run(tmp_path, body)


def test_migrating_specs_gives_them_their_submitted_form_and_listings_their_summaries(tmp_path: Path) -> None:
    path = tmp_path / "orch.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    for version, sql in migrations()[:2]:
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    old = [  # specs as versions before 3 stored them
        {"kind": "command", "argv": ["echo", "it's"], "queue": "default", "priority": 0, "env": {}, "cwd": None,
         "timeout": None, "labels": {}, "name": "greet"},
        {"kind": "shell", "argv": ["/bin/sh", "-c", "exit 3"], "shell": "exit 3", "queue": "q", "priority": 2,
         "env": {"A": "1"}, "cwd": None, "timeout": 5.0, "labels": {}, "name": None, "retry_on_exit": [3]},
        {"kind": "task", "argv": ["echo", "hello", "world"], "queue": "default", "priority": 0, "env": {},
         "cwd": None, "timeout": None, "labels": {}, "name": None},
        {"kind": "task", "argv": ["true"], "queue": "default", "priority": 0, "env": {}, "cwd": None,
         "timeout": None, "labels": {}, "name": None},
    ]
    for i, spec_json in enumerate(old, 1):
        conn.execute("INSERT INTO jobs (id, queue, state, spec, max_attempts, created_at) VALUES (?, ?, 'queued', ?, ?, 0)",
                     (i, spec_json["queue"], json.dumps(spec_json), 3 + i))
    conn.close()

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        specs = [(await store.get_job(i)).spec for i in range(1, 5)]
        assert specs[0]["command"] == ["echo", "it's"] and specs[0]["max_attempts"] == 4
        assert specs[1]["shell"] == "exit 3" and specs[1]["retry_on_exit"] == [3] and specs[1]["timeout"] == 5.0
        assert specs[2]["task"] == "echo" and specs[2]["args"] == ["hello", "world"]
        assert specs[3]["task"] == "true" and specs[3]["args"] == []
        assert not any("kind" in s or "argv" in s for s in specs)
        page, _ = await store.list_jobs()
        assert [(j.name, j.command) for j in reversed(page)] == [
            ("greet", "echo it's"), (None, "exit 3"), (None, "echo hello world"), (None, "true")]
        # What a worker is handed runs as before.
        w = await worker(store, queues=("default", "q"))
        jobs, _ = await store.claim(w, ["default", "q"], 4, TTL)
        assert sorted(argv_of(json.loads(j.spec)) for j in jobs) == sorted(
            [["echo", "it's"], ["/bin/sh", "-c", "exit 3"], ["echo", "hello", "world"], ["true"]])

    run(tmp_path, body)


# --------------------------------------------------------------------------- group commit, atomicity, durability


def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        b0, o0 = store.batches, store.ops
        results = await asyncio.gather(*(store.submit([spec(name=f"n{i}")], POLICY) for i in range(200)))
        ids = [r[0].id for r in results]
        assert len(set(ids)) == 200
        assert store.ops - o0 == 200
        assert store.batches - b0 <= 20, f"{store.batches - b0} batches for 200 ops"
        listed, _ = await store.list_jobs(limit=1000)
        assert len(listed) == 200

    run(tmp_path, body)


def test_a_failing_op_does_not_undo_its_batch_mates(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        # A spec the database refuses (queue NOT NULL) after a good one in the same call.
        bad = JobSpec(argv=("true",), kind="command", queue=None)  # type: ignore[arg-type]
        b0 = store.batches
        results = await asyncio.gather(
            store.submit([spec(name="first")], POLICY),
            store.submit([spec(name="half-a"), bad], POLICY),
            store.submit([spec(name="mate-1")], POLICY),
            store.heartbeat("w-nobody", [], TTL),
            store.submit([spec(name="mate-2")], POLICY),
            return_exceptions=True,
        )
        # All five were queued in the same turn of the event loop: they shared one transaction.
        assert store.batches - b0 == 1
        assert isinstance(results[1], sqlite3.IntegrityError)
        assert isinstance(results[3], UnknownWorker)
        listed, _ = await store.list_jobs(limit=100)
        names = sorted(str(j.name) for j in listed)
        assert names == ["first", "mate-1", "mate-2"]  # nothing of the failed submit, all of the others
        for r in (results[0], results[2], results[4]):
            assert (await store.get_job(r[0].id)).job.state == "queued"
        assert [e.job_id for e in await store.events(results[2][0].id)] == [results[2][0].id]

    run(tmp_path, body)


def test_small_batches_commit_on_the_loop_and_big_ones_on_the_writer_thread(tmp_path: Path) -> None:
    import orch.store.sqlite as sqlite_store

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        i0, b0 = store.inline_batches, store.batches
        small = await store.submit([spec(name=f"s{i}") for i in range(sqlite_store.INLINE_WEIGHT)], POLICY)
        assert (store.inline_batches - i0, store.batches - b0) == (1, 1)
        big = await store.submit([spec(name=f"b{i}") for i in range(sqlite_store.INLINE_WEIGHT + 1)], POLICY)
        assert (store.inline_batches - i0, store.batches - b0) == (1, 2)
        # Either way the ids are consecutive, in the order given, and every job has its event.
        ids = [j.id for j in small + big]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        for j in (small[0], small[-1], big[0], big[-1]):
            got = (await store.get_job(j.id)).job
            assert (got.name, got.state) == (j.name, "queued")
            assert [e.to_state for e in await store.events(j.id)] == ["queued"]

    run(tmp_path, body)


def test_the_listener_hears_a_submit_before_its_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """So a lease long-poll can claim while the submit's fsync runs; the submit's answer still waits for it."""
    gate = hold_fsyncs(monkeypatch)
    heard: list[int] = []

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        store.on_commit = lambda changes: heard.extend(c.job_id for c in changes)
        submitted = asyncio.ensure_future(submit_one(store))
        await until(lambda: heard, 5, "the listener to hear of the submit")
        assert store._flushing and not submitted.done()  # heard while the fsync is still held
        gate.set()
        assert await asyncio.wait_for(submitted, 5) == heard[0]

    run(tmp_path, body)


def test_synced_waits_for_the_fsync_of_what_is_committed(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        wid = await worker(store)
        await submit_one(store)
        f0 = store.flushes
        await store.synced()  # the submit's own fsync already covered everything
        assert store.flushes == f0
        await claim_one(store, wid)  # a claim waits for no fsync...
        assert store.flushes == f0
        await store.synced()  # ...but a reader that must only tell what is on disk can wait for one
        assert store.flushes == f0 + 1

    run(tmp_path, body)


def test_a_wal_the_background_checkpoint_cannot_empty_is_checkpointed_by_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a steady stream of inline commits the background checkpoint never catches up, and the WAL
    would only grow: once it reports a long WAL, the next batch checkpoints on the writer thread."""
    import orch.store.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_FRAMES", 1)  # any WAL counts as long here

    def wal_frames() -> int:
        conn = sqlite3.connect(str(tmp_path / "orch.db"))
        try:
            return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        finally:
            conn.close()

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        for _ in range(3):
            await submit_one(store)
        await until(lambda: store._writer_checkpoint, 10, "the checkpoint thread to report the WAL")
        inline = store.inline_batches
        await submit_one(store)  # runs on the writer thread, and checkpoints after its commit
        assert store.inline_batches == inline and store.writer_checkpoints == 1
        await submit_one(store)  # starts the WAL over from its beginning
        assert wal_frames() < 20

    run(tmp_path, body)


def test_a_reader_waiting_during_an_fsync_that_covers_it_needs_no_other(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gate = hold_fsyncs(monkeypatch)

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        f0 = store.flushes
        submitted = asyncio.ensure_future(submit_one(store))  # its fsync starts, and is held
        await until(lambda: store._flushing, 5, "the submit's fsync to start")
        reader = asyncio.ensure_future(store.synced())  # wants the very commit that fsync covers
        await until(lambda: store._unflushed, 5, "the reader to wait")
        gate.set()
        await asyncio.wait_for(asyncio.gather(submitted, reader), 5)
        assert store.flushes - f0 == 1

    run(tmp_path, body)  # opening fsyncs with os.fsync: only the store's own flushes are held


@pytest.mark.parametrize("jobs", [1, 100], ids=["inline", "writer-thread"])
def test_a_full_disk_fails_the_whole_batch_and_answers_every_caller(tmp_path: Path, jobs: int) -> None:
    """SQLite rolls the whole transaction back on SQLITE_FULL: nothing of the batch is written, nobody hangs."""

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        assert store._wconn is not None
        kept = await submit_one(store, name="kept")
        pages = store._wconn.execute("PRAGMA page_count").fetchone()[0]
        store._wconn.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is full from here
        # ...once what room its pages still have is taken: small jobs until one fails (that room depends on the
        # schema's layout, not on what this test is about).
        fills: list[int] = []
        for _ in range(2000):
            try:
                fills.append(await submit_one(store, name="fill"))
            except StorageFull:
                break
        else:
            raise AssertionError("2000 small jobs fitted in a database that may not grow")
        big = [spec(name=f"b{i}", labels={"pad": "x" * 200}) for i in range(max(jobs, 200))]
        results = await asyncio.wait_for(asyncio.gather(
            submit_one(store, name="mate"), store.submit(big[:jobs] if jobs > 1 else big, POLICY),
            return_exceptions=True), 5)
        assert all(isinstance(r, StorageFull) and r.http_status == 507 for r in results), results
        store._wconn.execute("PRAGMA max_page_count = 1073741823")
        listed, _ = await store.list_jobs(limit=1000)
        assert [j.id for j in listed] == sorted([kept, *fills], reverse=True)  # neither the mate nor any of the big
        assert (await store.get_job(await submit_one(store))).job.state == "queued"  # and it goes on

    run(tmp_path, body)


@pytest.mark.parametrize("weight", [1, 100], ids=["inline", "writer-thread"])
def test_a_transaction_sqlite_rolled_back_itself_fails_the_batch(tmp_path: Path, weight: int) -> None:
    """After an error SQLite answers by rolling back the whole transaction (a full disk mid-statement, an
    I/O error), the savepoints are gone: every op of the batch fails with it, and every caller is answered."""

    def breaks(conn: sqlite3.Connection, out: list[Any]) -> None:
        conn.execute("ROLLBACK")  # what SQLite does by itself on such errors
        raise sqlite3.OperationalError("database or disk is full")

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        results = await asyncio.wait_for(asyncio.gather(
            submit_one(store, name="before"), store._write(breaks, weight=weight), submit_one(store, name="after"),
            return_exceptions=True), 5)
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        assert (await store.list_jobs(limit=10))[0] == []
        assert (await store.get_job(await submit_one(store))).job.state == "queued"  # and it goes on

    run(tmp_path, body)


@pytest.mark.parametrize("weight", [1, 100], ids=["inline", "writer-thread"])
def test_an_op_alone_in_its_batch_that_fails_is_undone_and_the_next_goes_on(tmp_path: Path, weight: int) -> None:
    """An op alone in its batch runs without a savepoint: one that wrote, then failed, leaves nothing of itself,
    its caller hears its own error, and the batches after it commit as usual (also with a checkpoint due)."""

    def writes_then_fails(conn: sqlite3.Connection, out: list[Any]) -> None:
        conn.execute("INSERT INTO queues (name, paused, updated_at) VALUES ('half-made', 1, 0)")
        raise NotFound("no such thing", field="x")

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        store._writer_checkpoint = weight > 1  # the thread batch that fails was also to checkpoint
        with pytest.raises(NotFound):
            await store._write(writes_then_fails, weight=weight)
        assert store._wconn is not None and not store._wconn.in_transaction
        rows = await store._read("SELECT name FROM queues WHERE name = 'half-made'")
        assert rows == [], "the failed op's write was kept"
        jid = await submit_one(store, name="after")
        assert (await store.get_job(jid)).job.state == "queued"
        if weight > 1:
            assert store.writer_checkpoints >= 1, "the failed batch's checkpoint was lost"

    run(tmp_path, body)


def test_synced_covers_a_batch_the_writer_thread_is_committing(tmp_path: Path) -> None:
    """A reader may see a thread batch's commit before the loop numbers it: synced() waits for that batch."""
    import threading

    import orch.store.sqlite as sqlite_store

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        gate = threading.Event()

        def slow(conn: sqlite3.Connection, out: list[Any]) -> None:
            conn.execute("UPDATE workers SET running = running")
            gate.wait(10)

        writing = asyncio.ensure_future(store._write(slow, weight=sqlite_store.INLINE_WEIGHT + 1))
        await until(lambda: store._busy, 5, "the batch to run on the writer thread")
        f0, seq0 = store.flushes, store._commit_seq
        reader = asyncio.ensure_future(store.synced())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not reader.done(), "synced() returned while a batch was still committing"
        gate.set()
        await asyncio.wait_for(asyncio.gather(writing, reader), 5)
        assert store._flushed_seq >= seq0 + 1 and store.flushes > f0

    run(tmp_path, body)


def test_the_wal_is_checkpointed_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orch.store.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 5)
    import threading

    opened_on: list[str] = []
    real_connect = sqlite_store._connect

    def connect(*a: Any, **kw: Any) -> sqlite3.Connection:
        opened_on.append(threading.current_thread().name)
        return real_connect(*a, **kw)

    monkeypatch.setattr(sqlite_store, "_connect", connect)

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        assert store._wconn is not None
        for _ in range(12):
            await submit_one(store)
        # Inline batches never checkpoint as they commit (that would fsync on the loop).
        assert store._wconn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        await until(lambda: store.checkpoints >= 2, 10, "two PASSIVE checkpoints")
        # Its connection was opened, and its checkpoints run, on the checkpoint thread.
        assert any(name.startswith("orch-checkpoint") for name in opened_on), opened_on

    run(tmp_path, body)




def _checked(path: Path, table: str) -> set[str]:
    """The names the CHECK of ``table``'s state column allows."""
    conn = sqlite3.connect(str(path))
    try:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
    finally:
        conn.close()
    m = re.search(r"state\s+TEXT\s+NOT NULL CHECK \(([^)]*)\)", sql)
    assert m is not None, sql
    return set(re.findall(r"state = '(\w+)'", m.group(1)))


def test_the_state_columns_take_only_the_names_of_the_states(tmp_path: Path) -> None:
    from orch.core.states import JobState, Outcome, WorkerState

    run(tmp_path, lambda store, clock: submit_one(store))
    path = tmp_path / "orch.db"
    assert _checked(path, "jobs") == {s.value for s in JobState}
    assert _checked(path, "attempts") == {o.value for o in Outcome}
    assert _checked(path, "workers") == {s.value for s in WorkerState}
    conn = sqlite3.connect(str(path))
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE jobs SET state = 'done' WHERE id = 1")
    finally:
        conn.close()


def test_migrating_to_the_checked_tables_keeps_every_row_and_the_id_counter(tmp_path: Path) -> None:
    path = tmp_path / "orch.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    for version, sql in migrations()[:4]:
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO jobs (id, queue, state, spec, max_attempts, created_at) VALUES (7, 'q', 'running',"
                 " '{\"command\":[\"true\"]}', 3, 0)")
    conn.execute("INSERT INTO attempts (job_id, attempt, worker_id, state, started_at) VALUES (7, 1, 'w-1', 'running', 0)")
    conn.execute("INSERT INTO workers (id, name, hostname, queues, concurrency, state, registered_at, last_heartbeat)"
                 " VALUES ('w-1', 'w', 'h', '[\"q\"]', 1, 'alive', 0, 0)")
    conn.execute("UPDATE sqlite_sequence SET seq = 40 WHERE name = 'jobs'")  # jobs up to 40 were made; 8-40 are gone
    conn.close()

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        rec = await store.get_job(7)
        assert (rec.job.state, rec.attempts[0].worker_id) == ("running", "w-1")
        assert [w.id for w in await store.list_workers()] == ["w-1"]
        assert await submit_one(store) == 41  # no id is given twice

    run(tmp_path, body)
    assert user_version(path) == migrations()[-1][0]


def test_a_claim_reads_each_queues_first_jobs_not_every_queued_one(tmp_path: Path) -> None:
    """A worker of two queues claims with 20 jobs queued, then with 20,000 more waiting in one of the queues:
    SQLite does the same work both times (its virtual machine's steps, counted), because a claim reads each
    queue's first jobs by the queue's index, never every queued job of its queues."""

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        wid = await worker(store, queues=("deep", "shallow"))
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        async def claim_steps() -> int:
            steps[0] = 0
            store._wconn.set_progress_handler(step, 100)
            try:
                leases, _ = await store.claim(wid, ["deep", "shallow"], 4, TTL)
            finally:
                store._wconn.set_progress_handler(None, 100)
            assert len(leases) == 4
            return steps[0]

        await store.submit([spec(queue=q) for q in ("deep", "shallow") for _ in range(10)], POLICY)
        shallow = await claim_steps()
        await store.submit([spec(queue="deep") for _ in range(20_000)], POLICY)
        deep = await claim_steps()
        assert deep <= 2 * shallow + 10, (shallow, deep)

    run(tmp_path, body)


def test_migrating_to_scheduled_jobs_keeps_every_row_and_the_id_counter(tmp_path: Path) -> None:
    """Version 7 makes the jobs table again for its CHECK (the new state scheduled): a retrying job keeps its
    due time, the id counter goes on, and a delayed job can then be stored."""
    path = tmp_path / "orch.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    for version, sql in migrations()[:6]:
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO jobs (id, queue, state, spec, max_attempts, created_at, attempt, run_at) VALUES"
                 " (3, 'q', 'retrying', '{\"command\":[\"false\"],\"max_attempts\":3}', 3, 0, 1, 1700000002.5)")
    conn.execute("UPDATE sqlite_sequence SET seq = 9 WHERE name = 'jobs'")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("UPDATE jobs SET state = 'scheduled' WHERE id = 3")  # version 6 knows no such state
    conn.close()

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        rec = await store.get_job(3)
        assert (rec.job.state, rec.job.run_at, rec.job.attempt) == ("retrying", 1700000002.5, 1)
        assert await submit_one(store, delay=5) == 10
        assert (await store.get_job(10)).job.state == "scheduled"
        assert (await store.sweep(100.0, POLICY)).next_due == 1700000002.5

    run(tmp_path, body)
    assert user_version(path) == migrations()[-1][0]


def test_the_sweep_reads_only_the_due_jobs_whatever_is_scheduled_later(tmp_path: Path) -> None:
    """With 5,000 jobs scheduled an hour ahead, a sweep that queues one due job does the work of one with none
    waiting (SQLite's virtual machine steps, counted): the moves and the next due time go down the partial
    indexes by due time (jobs_scheduled, jobs_due), never through every scheduled job."""

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        async def sweep_steps() -> int:
            steps[0] = 0
            store._wconn.set_progress_handler(step, 100)
            try:
                sweep = await store.sweep(100.0, POLICY)
            finally:
                store._wconn.set_progress_handler(None, 100)
            assert [c.state for c in sweep.changes] == ["queued"]
            return steps[0]

        await submit_one(store, delay=1)
        clock.advance(1)
        alone = await sweep_steps()
        await store.submit([spec(delay=3600) for _ in range(5000)], POLICY)
        await submit_one(store, delay=1)
        clock.advance(1)
        crowded = await sweep_steps()
        assert crowded <= 2 * alone + 10, (alone, crowded)

    run(tmp_path, body)
