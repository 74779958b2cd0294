"""The PostgreSQL store's own machinery on a real server: its migrations, several stores on one database."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from storekit import POLICY, TTL, spec, worker

from helpers import until
from orch.core.errors import IdempotencyKeyReused
from orch.core.spec import parse_spec
from orch.core.states import JobState, Outcome, WorkerState
from orch.store.postgres import PostgresStore, migrations

pytestmark = pytest.mark.backend_specific  # every test here is about PostgreSQL itself


def schema(dsn: str) -> list[tuple[Any, ...]]:
    """Every column, constraint and index of the public schema, as the server describes them."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        cols = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, column_name").fetchall()
        cons = conn.execute(
            "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2").fetchall()
        idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1").fetchall()
    return [*cols, *cons, *idx]


def test_migrations_are_numbered_in_order() -> None:
    versions = [v for v, _ in migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_fresh_schema_equals_the_migrations_applied_step_by_step(postgres_server: Any) -> None:
    fresh, stepped = postgres_server.database(), postgres_server.database()

    async def open_close(dsn: str) -> None:
        store = PostgresStore(dsn, pool_size=1)
        await store.open()
        await store.close()

    asyncio.run(open_close(fresh))
    import psycopg

    with psycopg.connect(stepped, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, sql in migrations():
            conn.execute(sql)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    asyncio.run(open_close(stepped))  # and opening it finds nothing left to do
    assert schema(fresh) == schema(stepped)
    with psycopg.connect(stepped) as conn:
        assert conn.execute("SELECT count(*), max(version) FROM schema_version").fetchone() == (
            len(migrations()), migrations()[-1][0])


def test_the_state_columns_take_only_the_names_of_the_states(postgres_server: Any) -> None:
    dsn = postgres_server.database()

    async def main() -> None:
        store = PostgresStore(dsn, pool_size=1)
        await store.open()
        await store.close()

    asyncio.run(main())
    import psycopg

    checks = {row[0]: row[1] for row in schema(dsn) if len(row) == 2 and "CHECK" in row[1] and "state" in row[1]}

    def names(table: str) -> set[str]:
        return set(re.findall(r"'(\w+)'", checks[table]))

    assert names("jobs") == {s.value for s in JobState}
    assert names("attempts") == {o.value for o in Outcome}
    assert names("workers") == {s.value for s in WorkerState}
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO workers (id, name, hostname, queues, concurrency, state, registered_at,"
                     " last_heartbeat) VALUES ('w', 'w', 'h', '[]', 1, 'asleep', 0, 0)")


def test_schedulers_starting_together_migrate_once_and_share_the_jobs(postgres_server: Any) -> None:
    """Two stores open one empty database at the same moment (the advisory lock serializes their migrations);
    then claims from both hand out every job exactly once (FOR UPDATE SKIP LOCKED)."""
    dsn = postgres_server.database()

    async def main() -> None:
        a, b = PostgresStore(dsn, pool_size=4), PostgresStore(dsn, pool_size=4)
        await asyncio.gather(a.open(), b.open())
        try:
            await a.submit([spec(name=f"j{i}") for i in range(200)], POLICY)
            workers = [await worker(a, f"a{i}") for i in range(4)] + [await worker(b, f"b{i}") for i in range(4)]
            stores = [a] * 4 + [b] * 4
            got = await asyncio.gather(*(s.claim(w, ["default"], 30, TTL) for s, w in zip(stores, workers, strict=True)))
            ids = [lease.job_id for leases, _ in got for lease in leases]
            assert len(ids) == 200 and len(set(ids)) == 200
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_hints_fit_a_notify_payload_and_tell_the_others_what_changed() -> None:
    """Hints for thousands of changes, over many long queue names: each payload under PostgreSQL's 8,000
    bytes; heard by another scheduler they name every changed job, how many each queue got, and a retry;
    a scheduler ignores its own."""
    from orch.store.base import Change, Hint

    sender, other = PostgresStore("postgresql://x@127.0.0.1/x"), PostgresStore("postgresql://x@127.0.0.1/x")
    queues = [f"q{i:02d}-" + "x" * 59 for i in range(40)]
    changes = [Change(10**12 + i, "queued" if i % 3 else "running", queues[i % 40], 0) for i in range(3000)]
    changes.append(Change(7, "retrying", "default", 1))
    payloads = sender._hints(changes)
    assert len(payloads) > 1 and all(len(p.encode()) < 8000 for p in payloads)
    heard: list[Hint] = []
    other.on_remote = heard.append
    sender.on_remote = heard.append
    for p in payloads:
        sender._heard(p)  # its own: nothing
    assert heard == []
    for p in payloads:
        other._heard(p)
    assert sorted(j for h in heard for j in h.job_ids) == sorted(c.job_id for c in changes)
    total: dict[str, int] = {}
    for h in heard:
        for q, n in h.queued.items():
            total[q] = total.get(q, 0) + n
    assert total == {q: sum(1 for c in changes if c.queue == q and c.state == "queued") for q in queues}
    assert any(h.retrying for h in heard)
    other._heard('{"f":"someone","q":[1]}')  # malformed: a line, no hint
    assert len(heard) == len(payloads)


def _jobs_rows_read(node: dict[str, Any]) -> int:
    """Rows the plan's scans of the table jobs returned, over all their loops (EXPLAIN ANALYZE's JSON)."""
    own = node["Actual Rows"] * node["Actual Loops"] if node.get("Relation Name") == "jobs" and "Scan" in node[
        "Node Type"] else 0
    return own + sum(_jobs_rows_read(p) for p in node.get("Plans", []))


def test_a_claim_reads_each_queues_first_jobs_not_every_queued_one(postgres_server: Any, monkeypatch: Any) -> None:
    """A worker of two queues claims 4 jobs while 20,000 wait in one of them (and the statistics know it):
    the claim's statement, as the store runs it, reads each queue's first jobs by the queue's index, not every
    queued job of its queues and then a sort (it did: 35 ms a claim with 100,000 queued)."""
    import psycopg

    import orch.store.postgres as pg_store

    dsn = postgres_server.database()
    seen: list[tuple[str, Any]] = []
    fetch = pg_store._fetch

    async def spy(conn: Any, sql: str, params: Any = ()) -> list[Any]:
        if "picked AS" in sql:
            seen.append((sql, params))
        return await fetch(conn, sql, params)

    monkeypatch.setattr(pg_store, "_fetch", spy)

    async def main() -> None:
        store = PostgresStore(dsn, pool_size=1)
        await store.open()
        try:
            await store.submit([spec(queue="shallow") for _ in range(10)], POLICY)
            for _ in range(4):
                await store.submit([spec(queue="deep") for _ in range(5_000)], POLICY)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ANALYZE jobs")
            wid = await worker(store, queues=("deep", "shallow"))
            for _ in range(8):  # psycopg prepares it from the 5th run on: the plan PostgreSQL keeps
                leases, _ = await store.claim(wid, ["deep", "shallow"], 4, TTL)
                assert len(leases) == 4
        finally:
            await store.close()

    asyncio.run(main())
    sql, params = seen[-1]
    with psycopg.connect(dsn) as conn:  # a transaction, rolled back: the explained claim takes nothing
        (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()
        conn.rollback()
    read = _jobs_rows_read(plan[0]["Plan"])
    assert read <= 3 * 4, f"the claim read {read} rows of jobs to take 4"


def test_the_sweep_reads_only_the_due_scheduled_jobs_whatever_is_scheduled_later(postgres_server: Any) -> None:
    """5,000 jobs scheduled an hour ahead and one due (and the statistics know it): the sweep's reads of due
    scheduled jobs and of the earliest due time go down jobs_scheduled, not through every scheduled job; the
    sweep queues the one."""
    import psycopg

    dsn = postgres_server.database()

    async def main() -> None:
        clock = [1_700_000_000.0]
        store = PostgresStore(dsn, pool_size=1, clock=lambda: clock[0], monotonic=lambda: clock[0])
        await store.open()
        try:
            await store.submit([spec(delay=3600) for _ in range(5000)], POLICY)
            (due,) = await store.submit([spec(delay=1)], POLICY)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ANALYZE jobs")
                for sql in ("SELECT id FROM jobs WHERE state = 'scheduled' AND run_at <= %s ORDER BY id"
                            " FOR UPDATE SKIP LOCKED", "SELECT min(run_at) FROM jobs WHERE state = 'scheduled'"):
                    (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql,
                                           (clock[0] + 1,) if "%s" in sql else ()).fetchone()
                    text = json.dumps(plan)
                    assert "jobs_scheduled" in text and _jobs_rows_read(plan[0]["Plan"]) <= 2, (sql, text[:2000])
            clock[0] += 1
            sweep = await store.sweep(100.0, POLICY)
            assert [(c.job_id, c.state) for c in sweep.changes] == [(due.id, "queued")]
            assert sweep.next_due == 1_700_000_000.0 + 3600
        finally:
            await store.close()

    asyncio.run(main())


def test_a_scheduled_submit_is_hinted_to_the_others_with_its_due_time() -> None:
    """The leader's reaper sleeps until the next due time: a delayed job submitted to another replica must reach it
    as a hint with the retry flag (r) and the earliest due time (d), so it re-arms its timer when that is sooner.
    A due time not known (a change without one) sends no d: the leader then looks at once."""
    from orch.store.base import Change, Hint

    sender, other = PostgresStore("postgresql://x@127.0.0.1/x"), PostgresStore("postgresql://x@127.0.0.1/x")
    heard: list[Hint] = []
    other.on_remote = heard.append
    for changes in ([Change(1, "scheduled", "q", 0, due=1_800_000_010.5), Change(2, "scheduled", "q", 0, due=1_800_000_003.0),
                     Change(3, "queued", "q", 0)],
                    [Change(4, "retrying", "q", 1, due=1_800_000_001.0)],
                    [Change(5, "scheduled", "q", 0, due=7.0), Change(6, "retrying", "q", 1)],
                    [Change(7, "queued", "q", 0)]):
        for p in sender._hints(changes):
            other._heard(p)
    assert [(h.retrying, h.due) for h in heard] == [(True, 1_800_000_003.0), (True, 1_800_000_001.0), (True, None),
                                                   (False, None)]
    assert heard[0].queued == {"q": 1} and heard[0].job_ids == [1, 2, 3]
    other._heard('{"f":"older","q":{},"j":[8],"r":1}')  # from a scheduler that sends no d: look at once
    assert (heard[-1].retrying, heard[-1].due) == (True, None)


def test_one_idempotency_key_submitted_through_two_schedulers_at_once_is_one_job(postgres_server: Any) -> None:
    """The unique index decides across schedulers of one database: of 2 x 10 submits at once, one inserts, every
    other answers with its job; and the key with another spec is refused through either."""
    dsn = postgres_server.database()

    async def main() -> None:
        a, b = PostgresStore(dsn, pool_size=4), PostgresStore(dsn, pool_size=4)
        await a.open()
        await b.open()
        try:
            body = parse_spec({"command": ["./charge.sh", "42"], "idempotency_key": "order-42"})
            answers = await asyncio.gather(*(s.submit([body], POLICY) for s in (a, b) * 10))
            assert len({jobs[0].id for jobs in answers}) == 1
            assert sum(not jobs[0].replayed for jobs in answers) == 1
            for s in (a, b):
                with pytest.raises(IdempotencyKeyReused):
                    await s.submit([parse_spec({"command": ["./charge.sh", "43"], "idempotency_key": "order-42"})],
                                   POLICY)
            assert await a.count_by_state() == {JobState.QUEUED: 1}
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_queue_paused_through_one_scheduler_is_paused_for_the_claims_of_another(postgres_server: Any) -> None:
    """Every claim reads the queues table, so a pause committed through one replica holds for the next claim
    through any other (no cache to go stale); its resume hints the others' long-polls (a hint naming the queue)."""
    dsn = postgres_server.database()

    async def main() -> None:
        a, b = PostgresStore(dsn, pool_size=4), PostgresStore(dsn, pool_size=4)
        await a.open()
        await b.open()
        heard: list[Any] = []
        b.on_remote = heard.append
        try:
            await a.submit([parse_spec({"command": ["true"], "queue": "email"})] * 2, POLICY)
            wid = await b.register_worker(name="w", hostname="h", queues=["email"], concurrency=4)
            assert await a.pause_queue("email", True)
            assert (await b.claim(wid, ["email"], 10, 30.0))[0] == []
            assert [(q.name, q.paused, q.queued) for q in await b.queue_stats()] == [("email", True, 2)]
            assert await a.pause_queue("email", False)
            await until(lambda: any(h.queued.get("email") for h in heard), 10, "b to hear of the resume")
            assert len((await b.claim(wid, ["email"], 10, 30.0))[0]) == 2
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_key_limit_and_a_queue_limit_hold_for_claims_through_two_schedulers_at_once(postgres_server: Any) -> None:
    """Eight workers on two replicas claim, end and claim again all at once: a concurrency key of limit 3 never
    has a fourth running, and a queue of limit 2 never a third (the key's and the queue's advisory locks), while
    every job gets done."""
    from orch.store.base import AttemptResult

    dsn = postgres_server.database()

    async def main() -> None:
        a, b = PostgresStore(dsn, pool_size=6), PostgresStore(dsn, pool_size=6)
        await a.open()
        await b.open()
        try:
            await a.set_queue_concurrency("q", 2)
            await a.submit([spec(concurrency={"key": "k", "limit": 3}) for _ in range(30)], POLICY)
            await b.submit([spec(queue="q") for _ in range(20)], POLICY)
            stores = [a, b] * 4
            wids = [await s.register_worker(name=f"w{i}", hostname="h", queues=["default", "q"], concurrency=8)
                    for i, s in enumerate(stores)]
            held: dict[str, list[Any]] = {w: [] for w in wids}
            most = {"k": 0, "q": 0}

            async def look() -> None:
                async with a._conn() as conn:
                    (k,), = await (await conn.execute(
                        "SELECT count(*) FROM jobs WHERE ckey = 'k' AND state = 'running'")).fetchall()
                    (q,), = await (await conn.execute(
                        "SELECT count(*) FROM jobs WHERE queue = 'q' AND state = 'running'")).fetchall()
                most["k"], most["q"] = max(most["k"], k), max(most["q"], q)

            async def turn(s: PostgresStore, w: str) -> None:
                done = [AttemptResult(x.job_id, x.attempt, Outcome.SUCCEEDED, exit_code=0, duration=0.0)
                        for x in held[w]]
                if done:
                    _, held[w] = await s.complete_and_claim(w, done, POLICY, ["default", "q"], 4, TTL)
                else:
                    held[w] = (await s.claim(w, ["default", "q"], 4, TTL))[0]

            for _ in range(200):
                await asyncio.gather(*(turn(s, w) for s, w in zip(stores, wids, strict=True)))
                await look()
                counts = await a.count_by_state()
                if counts.get(JobState.SUCCEEDED, 0) == 50:
                    break
            assert (await a.count_by_state()).get(JobState.SUCCEEDED) == 50
            assert most == {"k": 3, "q": 2}
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
