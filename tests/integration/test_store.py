"""Integration tests of the SQLite store on a real file: schema, claims, retries, leases, output, group commit."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from helpers import hold_fsyncs, until
from orch.errors import Conflict, NotFound, StorageFull, UnknownWorker
from orch.models import JobSpec, Outcome, RetryPolicy, argv_of, iso, parse_spec
from orch.store.base import AttemptResult, OutputChunk
from orch.store.sqlite import SqliteStore, migrate, migrations

T0 = 1_700_000_000.0
TTL = 10.0  # lease ttl handed to claim/heartbeat
# No jitter and a fixed rand: every backoff is exactly base * factor ** (attempt - 1).
POLICY = RetryPolicy(max_attempts=3, base=2.0, factor=3.0, cap=100.0, jitter=0.0)


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def spec(**kw: Any) -> JobSpec:
    body: dict[str, Any] = {"command": ["true"]}
    body.update(kw)
    return parse_spec(body)


def run(tmp_path: Path, body: Callable[[SqliteStore, FakeClock], Awaitable[None]], **store_kw: Any) -> None:
    """Open a store on tmp_path/orch.db with a fake clock (wall and monotonic alike), run ``body``, always close."""
    clock = FakeClock()

    async def main() -> None:
        store = SqliteStore(tmp_path / "orch.db", clock=clock, monotonic=clock, rand=lambda: 0.5, **store_kw)
        await store.open()
        try:
            await body(store, clock)
        finally:
            await store.close()

    asyncio.run(main())


async def worker(store: SqliteStore, name: str = "w", queues: tuple[str, ...] = ("default",)) -> str:
    return await store.register_worker(name=name, hostname="test-host", queues=list(queues), concurrency=4)


async def submit_one(store: SqliteStore, **kw: Any) -> int:
    jobs = await store.submit([spec(**kw)], POLICY)
    return jobs[0]["id"]


async def claim_one(store: SqliteStore, wid: str, queues: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    jobs, _ = await store.claim(wid, list(queues), 1, TTL)
    assert len(jobs) == 1, jobs
    return jobs[0]


async def finish(store: SqliteStore, wid: str, job_id: int, attempt: int, outcome: Outcome,
                 exit_code: int | None = None, output: tuple[OutputChunk, ...] = ()) -> dict[str, Any]:
    answers, _ = await store.complete(
        wid, [AttemptResult(job_id, attempt, outcome, exit_code=exit_code, duration=0.1, output=output)], POLICY
    )
    return answers[0]


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
        assert job["spec"]["name"] == "kept"
        assert (await store.list_jobs())[0][0]["id"] == 1

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


def test_submit_then_get_job(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jobs = await store.submit([spec(name="first", queue="q1", priority=3)], POLICY)
        assert len(jobs) == 1
        job = await store.get_job(jobs[0]["id"])
        assert job["id"] == jobs[0]["id"]
        assert job["state"] == "queued"
        assert job["created_at"] == iso(T0)
        assert job["queue"] == "q1" and job["priority"] == 3 and job["name"] == "first"
        assert job["spec"] == {"command": ["true"], "queue": "q1", "priority": 3, "name": "first", "max_attempts": 3}
        assert job["command"] == "true"
        assert job["attempt"] == 0 and job["max_attempts"] == 3
        assert job["started_at"] is None and job["finished_at"] is None
        assert job["attempts"] == [] and job["result"] is None
        # What submit answered is what a read gives back.
        for k, v in jobs[0].items():
            assert job[k] == v, k
        with pytest.raises(NotFound):
            await store.get_job(9999)

    run(tmp_path, body)


def test_job_max_attempts_overrides_default(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store, max_attempts=7)
        assert (await store.get_job(jid))["max_attempts"] == 7

    run(tmp_path, body)


def test_each_job_is_claimed_by_exactly_one_worker(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        await store.submit([spec(name=f"j{i}") for i in range(100)], POLICY)
        wids = [await worker(store, f"w{i}") for i in range(20)]
        results = await asyncio.gather(*(store.claim(w, ["default"], 7, TTL) for w in wids))
        claimed = [(w, j["job_id"]) for w, (jobs, _) in zip(wids, results, strict=True) for j in jobs]
        ids = [jid for _, jid in claimed]
        assert len(ids) == 100
        assert len(set(ids)) == 100, "a job was handed out twice"
        # The database agrees with what each worker was told.
        for w, jid in claimed:
            job = await store.get_job(jid)
            assert job["state"] == "running" and job["worker"] == w and job["attempt"] == 1
            assert [a["worker"] for a in job["attempts"]] == [w]
        more, _ = await store.claim(wids[0], ["default"], 10, TTL)
        assert more == []

    run(tmp_path, body)


def test_claim_takes_highest_priority_first_then_oldest(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        prios = [0, 5, -3, 5, 10, 0]
        jobs = await store.submit([spec(priority=p) for p in prios], POLICY)
        ids = [j["id"] for j in jobs]
        w = await worker(store)
        order = [(await claim_one(store, w))["job_id"] for _ in prios]
        assert order == [ids[4], ids[1], ids[3], ids[0], ids[5], ids[2]]
        # One claim of several jobs comes back in the same order.
        jobs2 = await store.submit([spec(priority=p) for p in prios], POLICY)
        ids2 = [j["id"] for j in jobs2]
        got, _ = await store.claim(w, ["default"], 3, TTL)
        assert [j["job_id"] for j in got] == [ids2[4], ids2[1], ids2[3]]

    run(tmp_path, body)


def test_claim_only_from_the_workers_queues(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        a = await submit_one(store, queue="alpha")
        await submit_one(store, queue="beta")
        w = await worker(store, queues=("alpha",))
        got, _ = await store.claim(w, ["alpha"], 10, TTL)
        assert [j["job_id"] for j in got] == [a]
        assert got[0]["spec"]["queue"] == "alpha" and got[0]["attempt"] == 1

    run(tmp_path, body)


def test_claim_by_unknown_worker_is_refused(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        with pytest.raises(UnknownWorker):
            await store.claim("w-nobody", ["default"], 1, TTL)
        assert (await store.get_job(jid))["state"] == "queued"

    run(tmp_path, body)


def test_list_jobs_pages_and_filters(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jobs = await store.submit([spec(queue="a" if i % 3 else "b") for i in range(11)], POLICY)
        ids = [j["id"] for j in jobs]
        seen, cursor = [], None
        while True:
            page, cursor = await store.list_jobs(limit=4, cursor=cursor)
            seen += [j["id"] for j in page]
            if cursor is None:
                break
        assert seen == sorted(ids, reverse=True)
        b, nxt = await store.list_jobs(queue="b", limit=100)
        assert [j["id"] for j in b] == [ids[i] for i in (9, 6, 3, 0)] and nxt is None
        w = await worker(store)
        await claim_one(store, w, ("b",))
        running, _ = await store.list_jobs(state="running", limit=100)
        assert [j["id"] for j in running] == [ids[0]]

    run(tmp_path, body)


# --------------------------------------------------------------------------- events, retries, failures


def test_every_transition_writes_an_event(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        clock.advance(1)
        await claim_one(store, w)
        clock.advance(1)
        assert (await finish(store, w, jid, 1, Outcome.FAILED, 3))["accepted"]
        clock.advance(2)  # backoff of attempt 1 is base = 2s
        await store.sweep(100.0, POLICY)
        clock.advance(1)
        await claim_one(store, w)
        clock.advance(1)
        assert (await finish(store, w, jid, 2, Outcome.SUCCEEDED, 0))["accepted"]
        events = await store.events(jid)
        got = [(e["job_id"], e["attempt"], e["from"], e["to"], e["at"]) for e in events]
        assert got == [
            (jid, 0, None, "queued", iso(T0)),
            (jid, 1, "queued", "running", iso(T0 + 1)),
            (jid, 1, "running", "retrying", iso(T0 + 2)),
            (jid, 1, "retrying", "queued", iso(T0 + 4)),
            (jid, 2, "queued", "running", iso(T0 + 5)),
            (jid, 2, "running", "succeeded", iso(T0 + 6)),
        ]
        assert all(e["reason"] for e in events)
        assert events[0]["reason"] == "submitted"
        assert w in events[1]["reason"]
        assert "exited 3" in events[2]["reason"]
        ids = [e["id"] for e in events]
        assert ids == sorted(ids)
        assert await store.events(jid, after=ids[3]) == events[4:]

    run(tmp_path, body)


def test_success_sets_result_and_timestamps(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        clock.advance(1)
        await claim_one(store, w)
        clock.advance(2)
        out = (OutputChunk(jid, 1, "stdout", "hello\n"), OutputChunk(jid, 1, "stderr", "warn\n"))
        ans = await finish(store, w, jid, 1, Outcome.SUCCEEDED, 0, out)
        assert ans == {"job_id": jid, "attempt": 1, "accepted": True, "state": "succeeded"}
        job = await store.get_job(jid)
        assert job["state"] == "succeeded"
        assert job["exit_code"] == 0
        assert job["created_at"] == iso(T0)
        assert job["started_at"] == iso(T0 + 1)
        assert job["finished_at"] == iso(T0 + 3)
        assert job["result"]["stdout"] == "hello\n"
        assert job["result"]["stderr"] == "warn\n"
        assert job["result"]["stdout_truncated"] is False
        assert job["attempts"][0]["state"] == "succeeded" and job["attempts"][0]["exit_code"] == 0

    run(tmp_path, body)


def test_failure_retries_after_backoff_then_sweep_requeues(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        ans = await finish(store, w, jid, 1, Outcome.FAILED, 1)
        assert ans["accepted"] and ans["state"] == "retrying"
        job = await store.get_job(jid)
        assert job["state"] == "retrying"
        assert job["retry_at"] == iso(T0 + 2.0)
        assert job["exit_code"] == 1 and job["finished_at"] is None
        # Not due yet: the sweep leaves it, and nobody can claim it.
        clock.advance(1.9)
        sweep = await store.sweep(100.0, POLICY)
        assert sweep.changes == [] and sweep.next_due == pytest.approx(T0 + 2.0)
        assert (await store.get_job(jid))["state"] == "retrying"
        assert (await store.claim(w, ["default"], 1, TTL))[0] == []
        # Due: queued again, and claimable as attempt 2.
        clock.advance(0.1)
        sweep = await store.sweep(100.0, POLICY)
        assert [(c.job_id, c.state) for c in sweep.changes] == [(jid, "queued")]
        assert sweep.next_due is None
        job = await store.get_job(jid)
        assert job["state"] == "queued" and job["retry_at"] is None
        assert (await claim_one(store, w))["attempt"] == 2
        # Attempt 2 fails: the delay grows by the factor.
        await finish(store, w, jid, 2, Outcome.FAILED, 1)
        assert (await store.get_job(jid))["retry_at"] == iso(clock.t + 6.0)

    run(tmp_path, body)


def test_exhausted_attempts_fail_and_keep_every_exit_code(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        codes = [3, 4, 5]
        for attempt, code in enumerate(codes, start=1):
            assert (await claim_one(store, w))["attempt"] == attempt
            ans = await finish(store, w, jid, attempt, Outcome.FAILED, code)
            assert ans["state"] == ("failed" if attempt == 3 else "retrying")
            clock.advance(1000)
            await store.sweep(10_000.0, POLICY)
        job = await store.get_job(jid)
        assert job["state"] == "failed"
        assert job["exit_code"] == 5
        assert job["finished_at"] is not None
        assert [a["exit_code"] for a in job["attempts"]] == codes
        assert [a["state"] for a in job["attempts"]] == ["failed"] * 3
        # A failed job stays failed: nothing more to claim.
        assert (await store.claim(w, ["default"], 1, TTL))[0] == []

    run(tmp_path, body)


def test_exit_code_outside_retry_on_exit_fails_at_once(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store, retry_on_exit=[75])
        w = await worker(store)
        await claim_one(store, w)
        assert (await finish(store, w, jid, 1, Outcome.FAILED, 1))["state"] == "failed"
        jid2 = await submit_one(store, retry_on_exit=[75])
        await claim_one(store, w)
        assert (await finish(store, w, jid2, 1, Outcome.FAILED, 75))["state"] == "retrying"

    run(tmp_path, body)


def test_stale_completion_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        old = await worker(store, "old")
        new = await worker(store, "new")
        await claim_one(store, old)
        # The old worker falls silent past its lease; the job is retried on another worker.
        clock.advance(TTL + 1)
        await store.heartbeat(new, [], TTL)
        sweep = await store.sweep(worker_ttl=TTL + 5, defaults=POLICY)
        assert [c.state for c in sweep.changes] == ["retrying"]
        clock.advance(100)
        await store.heartbeat(new, [], TTL)
        await store.heartbeat(old, [], TTL)  # the old worker is still registered, only its lease went
        await store.sweep(worker_ttl=TTL + 5, defaults=POLICY)
        assert (await claim_one(store, new))["attempt"] == 2

        before_job = await store.get_job(jid)
        before_events = await store.events(jid)
        late = (OutputChunk(jid, 1, "stdout", "late output\n"),)
        ans = await finish(store, old, jid, 1, Outcome.SUCCEEDED, 0, late)
        assert ans["accepted"] is False and ans["error"] == "stale_attempt"
        # The right attempt from the wrong worker is refused too.
        assert (await finish(store, old, jid, 2, Outcome.SUCCEEDED, 0))["accepted"] is False
        assert await store.append_output(old, [OutputChunk(jid, 2, "stdout", "x")]) == [False]
        assert await store.get_job(jid) == before_job
        assert await store.events(jid) == before_events
        assert (await store.get_job(jid))["state"] == "running"
        assert await store.output_after(jid, 0) == []
        # The current holder still completes normally.
        assert (await finish(store, new, jid, 2, Outcome.SUCCEEDED, 0))["accepted"] is True
        # And a second completion of the same attempt is stale.
        assert (await finish(store, new, jid, 2, Outcome.FAILED, 1))["accepted"] is False
        assert (await store.get_job(jid))["state"] == "succeeded"

    run(tmp_path, body)


# --------------------------------------------------------------------------- workers, heartbeats, leases


def test_heartbeat_from_unknown_worker_is_refused(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        with pytest.raises(UnknownWorker) as info:
            await store.heartbeat("w-doesnotexist", [], TTL)
        assert info.value.http_status == 409 and info.value.code == "unknown_worker"

    run(tmp_path, body)


def test_heartbeat_extends_the_lease(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        kept = await submit_one(store)
        dropped = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await claim_one(store, w)
        clock.advance(TTL - 2)
        reply = await store.heartbeat(w, [(kept, 1)], TTL)  # only one of the two is reported
        assert reply.cancel == [] and reply.stale == []
        clock.advance(TTL - 2)  # past the first lease, inside the extended one
        sweep = await store.sweep(worker_ttl=100.0, defaults=POLICY)
        assert [(c.job_id, c.state) for c in sweep.changes] == [(dropped, "retrying")]
        assert (await store.get_job(kept))["state"] == "running"
        assert (await store.get_job(dropped))["attempts"][0]["state"] == "lost"
        # The expired attempt is now stale in the worker's next heartbeat.
        reply = await store.heartbeat(w, [(kept, 1), (dropped, 1)], TTL)
        assert reply.stale == [{"job_id": dropped, "attempt": 1}]

    run(tmp_path, body)


def test_silent_worker_is_lost_and_its_jobs_retry_or_fail(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        retried = await submit_one(store)
        last_try = await submit_one(store, max_attempts=1)
        silent = await worker(store, "silent")
        alive = await worker(store, "alive")
        await claim_one(store, silent)
        await claim_one(store, silent)
        clock.advance(4)
        # Keep the job leases valid so only the worker's silence can end them.
        await store.heartbeat(alive, [], TTL)
        sweep = await store.sweep(worker_ttl=3.0, defaults=POLICY)
        assert sweep.lost_workers == [silent]
        assert {(c.job_id, c.state) for c in sweep.changes} == {(retried, "retrying"), (last_try, "failed")}
        r = await store.get_job(retried)
        assert r["state"] == "retrying" and r["attempts"][0]["state"] == "lost"
        f = await store.get_job(last_try)
        assert f["state"] == "failed" and f["attempts"][0]["state"] == "lost"
        assert "lost" in f["error"]
        states = {x["id"]: x["state"] for x in await store.list_workers()}
        assert states == {silent: "lost", alive: "alive"}
        # A lost worker must register again.
        with pytest.raises(UnknownWorker):
            await store.heartbeat(silent, [(retried, 1)], TTL)
        with pytest.raises(UnknownWorker):
            await store.claim(silent, ["default"], 1, TTL)
        # Nor may it report and ask for more in one go: nothing of it is written.
        spare = await submit_one(store)
        with pytest.raises(UnknownWorker):
            await store.complete_and_claim(silent, [AttemptResult(retried, 1, Outcome.SUCCEEDED, exit_code=0)],
                                           POLICY, ["default"], 5, TTL)
        assert (await store.get_job(spare))["state"] == "queued"
        assert (await store.get_job(retried))["state"] == "retrying"

    run(tmp_path, body)


def test_a_draining_worker_is_given_no_new_work(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        wid = await worker(store)
        first = await submit_one(store)
        waiting = await submit_one(store)
        await claim_one(store, wid)
        await store.heartbeat(wid, [(first, 1)], TTL, draining=True)
        assert (await store.claim(wid, ["default"], 5, TTL))[0] == []
        answers, jobs = await store.complete_and_claim(
            wid, [AttemptResult(first, 1, Outcome.SUCCEEDED, exit_code=0)], POLICY, ["default"], 5, TTL)
        assert answers[0]["accepted"] and jobs == []  # its report is taken, no job is handed to it
        assert (await store.get_job(waiting))["state"] == "queued"

    run(tmp_path, body)


def test_hand_back_requeues_at_once_without_using_an_attempt(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store, max_attempts=1)
        w = await worker(store)
        other = await worker(store, "other")
        await claim_one(store, w)
        changes = await store.hand_back(w, [(jid, 1)], stop=True)
        assert [(c.job_id, c.state) for c in changes] == [(jid, "queued")]
        job = await store.get_job(jid)
        assert job["state"] == "queued" and job["worker"] is None
        assert job["attempts"][0]["state"] == "handed_back"
        # No waiting: another worker takes it right away, and it still gets its one real attempt.
        got = await claim_one(store, other)
        assert got["job_id"] == jid and got["attempt"] == 2
        assert (await finish(store, other, jid, 2, Outcome.FAILED, 1))["state"] == "failed"
        # The stopped worker is gone.
        assert {x["id"]: x["state"] for x in await store.list_workers()}[w] == "stopped"
        with pytest.raises(UnknownWorker):
            await store.heartbeat(w, [], TTL)

    run(tmp_path, body)


# --------------------------------------------------------------------------- cancel


def test_cancel_queued_job(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        clock.advance(1)
        job, changes = await store.cancel(jid, "not needed")
        assert job["state"] == "cancelled" and job["finished_at"] == iso(T0 + 1)
        assert [(c.job_id, c.state) for c in changes] == [(jid, "cancelled")]
        assert (await store.events(jid))[-1]["reason"] == "not needed"
        w = await worker(store)
        assert (await store.claim(w, ["default"], 1, TTL))[0] == []

    run(tmp_path, body)


def test_cancel_retrying_job(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await finish(store, w, jid, 1, Outcome.FAILED, 1)
        job, _ = await store.cancel(jid, "stop retrying")
        assert job["state"] == "cancelled"
        clock.advance(1000)
        assert (await store.sweep(10_000.0, POLICY)).changes == []
        assert (await store.get_job(jid))["state"] == "cancelled"

    run(tmp_path, body)


def test_cancel_running_job_waits_for_the_worker(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        job, _ = await store.cancel(jid, "cancelled by user")
        assert job["state"] == "running" and job["cancel_requested"] is True
        reply = await store.heartbeat(w, [(jid, 1)], TTL)
        assert reply.cancel == [{"job_id": jid, "attempt": 1}]
        ans = await finish(store, w, jid, 1, Outcome.CANCELLED, -15)
        assert ans["accepted"] and ans["state"] == "cancelled"
        job = await store.get_job(jid)
        assert job["state"] == "cancelled" and job["finished_at"] is not None
        assert [e["to"] for e in await store.events(jid)] == ["queued", "running", "cancelled"]

    run(tmp_path, body)


def test_cancel_requested_job_that_fails_ends_cancelled_not_retrying(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await store.cancel(jid, "cancelled by user")
        assert (await finish(store, w, jid, 1, Outcome.FAILED, 143))["state"] == "cancelled"

    run(tmp_path, body)


def test_cancel_of_a_finished_job_is_a_conflict(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await finish(store, w, jid, 1, Outcome.SUCCEEDED, 0)
        events = await store.events(jid)
        with pytest.raises(Conflict) as info:
            await store.cancel(jid, "too late")
        assert info.value.http_status == 409
        assert (await store.get_job(jid))["state"] == "succeeded"
        assert await store.events(jid) == events
        with pytest.raises(NotFound):
            await store.cancel(424242, "no such job")

    run(tmp_path, body)


# --------------------------------------------------------------------------- output


def test_output_is_kept_in_order(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        chunks = [OutputChunk(jid, 1, "stdout", "one\n"), OutputChunk(jid, 1, "stderr", "oops\n"),
                  OutputChunk(jid, 1, "stdout", "two\n"), OutputChunk(jid, 1, "stdout", "héllo ✓\n")]
        assert await store.append_output(w, chunks) == [True] * 4
        got = await store.output_after(jid, 0)
        assert [(c["stream"], c["data"]) for c in got] == [(c.stream, c.data) for c in chunks]
        assert [c["data"] for c in await store.output_after(jid, got[1]["id"])] == ["two\n", "héllo ✓\n"]
        job = await store.get_job(jid)
        assert job["result"]["stdout"] == "one\ntwo\nhéllo ✓\n"
        assert job["result"]["stderr"] == "oops\n"
        assert job["attempts"][0]["stdout_bytes"] == len("one\ntwo\nhéllo ✓\n".encode())

    run(tmp_path, body)


def cut_marked(text: str) -> tuple[int, str]:
    """(bytes the leading marker says were not kept, the text after it); the text must start with one."""
    m = re.match(r"\[orch: ([0-9,]+) bytes of std(?:out|err) not kept\]\n", text)
    assert m is not None, text[:80]
    return int(m.group(1).replace(",", "")), text[m.end():]


def test_output_is_bounded_keeping_the_tail(tmp_path: Path) -> None:
    limit = 1024

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        lines = [f"line {i:04d} ".ljust(99, "x") + "\n" for i in range(60)]  # 6000 bytes
        for line in lines:
            assert await store.append_output(w, [OutputChunk(jid, 1, "stdout", line)]) == [True]
        await store.append_output(w, [OutputChunk(jid, 1, "stderr", "small\n")])
        job = await store.get_job(jid)
        res = job["result"]
        skipped, kept = cut_marked(res["stdout"])
        stdout = kept.encode()
        assert len(stdout) <= limit
        assert len(stdout) >= limit - 100  # the tail is kept, not just the last chunk
        assert skipped + len(stdout) == 6000  # and the head that was not kept is marked, to the byte
        assert res["stdout"].endswith(lines[-1])
        assert "line 0059" in res["stdout"] and "line 0000" not in res["stdout"]
        assert res["stdout_truncated"] is True
        assert res["stderr"] == "small\n" and res["stderr_truncated"] is False
        assert job["attempts"][0]["stdout_bytes"] == 6000  # every byte is counted
        # The store itself does not grow without bound.
        conn = sqlite3.connect(str(tmp_path / "orch.db"))
        try:
            stored = conn.execute("SELECT SUM(size) FROM output WHERE job_id = ? AND stream = 'stdout'",
                                  (jid,)).fetchone()[0]
        finally:
            conn.close()
        assert stored <= limit + 100

    run(tmp_path, body, output_limit=limit)


def test_output_the_worker_dropped_is_marked_where_it_was_dropped(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await store.append_output(w, [OutputChunk(jid, 1, "stdout", "first\n"),
                                      OutputChunk(jid, 1, "stdout", "second", skipped=1000),
                                      OutputChunk(jid, 1, "stderr", "", skipped=7)])
        chunks = await store.output_after(jid)
        assert [(c["stream"], c["pos"], c["size"]) for c in chunks] == [("stdout", 0, 6), ("stdout", 1006, 6)]
        # The end's own output has a hole too, and so does the end of stderr (nothing came after it).
        await finish(store, w, jid, 1, Outcome.SUCCEEDED, 0,
                     output=(OutputChunk(jid, 1, "stdout", "third\n", skipped=5),))
        job = await store.get_job(jid)
        res = job["result"]
        assert res["stdout"] == ("first\n[orch: 1,000 bytes of stdout not kept]\nsecond"
                                 "\n[orch: 5 bytes of stdout not kept]\nthird\n")
        assert res["stderr"] == "[orch: 7 bytes of stderr not kept]\n"
        assert res["stdout_truncated"] is True and res["stderr_truncated"] is True
        assert job["attempts"][0]["stdout_bytes"] == 6 + 1000 + 6 + 5 + 6
        assert (await store.output_after(jid))[-1]["pos"] == 6 + 1000 + 6 + 5

    run(tmp_path, body)


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
        assert [(c["stream"], c["pos"]) for c in await store.output_after(1)] == [
            ("stdout", 4970), ("stderr", 0), ("stdout", 4980)]
        res = (await store.get_job(1))["result"]
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
        specs = [(await store.get_job(i))["spec"] for i in range(1, 5)]
        assert specs[0]["command"] == ["echo", "it's"] and specs[0]["max_attempts"] == 4
        assert specs[1]["shell"] == "exit 3" and specs[1]["retry_on_exit"] == [3] and specs[1]["timeout"] == 5.0
        assert specs[2]["task"] == "echo" and specs[2]["args"] == ["hello", "world"]
        assert specs[3]["task"] == "true" and specs[3]["args"] == []
        assert not any("kind" in s or "argv" in s for s in specs)
        page, _ = await store.list_jobs()
        assert [(j["name"], j["command"]) for j in reversed(page)] == [
            ("greet", "echo it's"), (None, "exit 3"), (None, "echo hello world"), (None, "true")]
        # What a worker is handed runs as before.
        w = await worker(store, queues=("default", "q"))
        jobs, _ = await store.claim(w, ["default", "q"], 4, TTL)
        assert sorted(argv_of(j["spec"]) for j in jobs) == sorted(
            [["echo", "it's"], ["/bin/sh", "-c", "exit 3"], ["echo", "hello", "world"], ["true"]])

    run(tmp_path, body)


def test_one_huge_chunk_is_cut_to_its_tail(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        big = "A" * 3000 + "THE END"
        await store.append_output(w, [OutputChunk(jid, 1, "stdout", big)])
        res = (await store.get_job(jid))["result"]
        skipped, kept = cut_marked(res["stdout"])
        assert len(kept.encode()) <= 1024 and skipped + len(kept.encode()) == len(big)
        assert kept.endswith("THE END")
        assert res["stdout_truncated"] is True

    run(tmp_path, body, output_limit=1024)


# --------------------------------------------------------------------------- group commit, atomicity, durability


def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: FakeClock) -> None:
        b0, o0 = store.batches, store.ops
        results = await asyncio.gather(*(store.submit([spec(name=f"n{i}")], POLICY) for i in range(200)))
        ids = [r[0]["id"] for r in results]
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
        names = sorted(j["name"] for j in listed)
        assert names == ["first", "mate-1", "mate-2"]  # nothing of the failed submit, all of the others
        for r in (results[0], results[2], results[4]):
            assert (await store.get_job(r[0]["id"]))["state"] == "queued"
        assert [e["job_id"] for e in await store.events(results[2][0]["id"])] == [results[2][0]["id"]]

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
        ids = [j["id"] for j in small + big]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        for j in (small[0], small[-1], big[0], big[-1]):
            got = await store.get_job(j["id"])
            assert (got["name"], got["state"]) == (j["name"], "queued")
            assert [e["to"] for e in await store.events(j["id"])] == ["queued"]

    run(tmp_path, body)


def test_listener_hears_each_committed_batch_once_before_any_answer(tmp_path: Path) -> None:
    heard: list[list[tuple[int, str]]] = []

    async def body(store: SqliteStore, clock: FakeClock) -> None:
        store.on_commit = lambda changes: heard.append([(c.job_id, c.state) for c in changes])
        wid = await worker(store)
        assert heard == []  # a registration changes no job
        first, second = await asyncio.gather(submit_one(store), submit_one(store))
        assert heard == [[(first, "queued"), (second, "queued")]]
        job = await claim_one(store, wid)
        assert heard[-1] == [(job["job_id"], "running")]
        await finish(store, wid, job["job_id"], 1, Outcome.SUCCEEDED, 0)
        assert heard[-1] == [(job["job_id"], "succeeded")]
        # A failed op's changes were rolled back with it: nobody hears of them.
        bad = JobSpec(argv=("true",), kind="command", queue=None)  # type: ignore[arg-type]
        with pytest.raises(sqlite3.IntegrityError):
            await store.submit([spec(), bad], POLICY)
        assert len(heard) == 3

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
        big = [spec(name=f"b{i}", labels={"pad": "x" * 200}) for i in range(max(jobs, 200))]
        results = await asyncio.wait_for(asyncio.gather(
            submit_one(store, name="mate"), store.submit(big[:jobs] if jobs > 1 else big, POLICY),
            return_exceptions=True), 5)
        assert all(isinstance(r, StorageFull) and r.http_status == 507 for r in results), results
        store._wconn.execute("PRAGMA max_page_count = 1073741823")
        listed, _ = await store.list_jobs(limit=1000)
        assert [j["id"] for j in listed] == [kept]  # neither the mate nor any of the big submit
        assert (await store.get_job(await submit_one(store)))["state"] == "queued"  # and it goes on

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
        assert (await store.get_job(await submit_one(store)))["state"] == "queued"  # and it goes on

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


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    saved: dict[str, Any] = {}

    async def first(store: SqliteStore, clock: FakeClock) -> None:
        done = await submit_one(store, name="done")
        waiting = await submit_one(store, name="waiting")
        w = await worker(store)
        await claim_one(store, w)
        await finish(store, w, done, 1, Outcome.SUCCEEDED, 0, (OutputChunk(done, 1, "stdout", "saved\n"),))
        saved.update(done=await store.get_job(done), waiting=await store.get_job(waiting),
                     events=await store.events(done), worker=w)

    run(tmp_path, first)

    async def second(store: SqliteStore, clock: FakeClock) -> None:
        done = await store.get_job(saved["done"]["id"])
        assert done == saved["done"]
        assert done["state"] == "succeeded" and done["result"]["stdout"] == "saved\n"
        assert await store.events(done["id"]) == saved["events"]
        assert await store.get_job(saved["waiting"]["id"]) == saved["waiting"]
        assert [x["id"] for x in await store.list_workers()] == [saved["worker"]]
        # New ids continue after the old ones.
        assert await submit_one(store) > saved["waiting"]["id"]

    run(tmp_path, second)
