"""The store contract: what every backend must do, run against each (tests/contract/conftest.py).

Submits, claims in the policy's order, retries and backoff, fencing of stale attempts, leases and lost
workers, hand-backs, cancels, output kept to its tail, committed changes heard once, durability
across a reopen, and the digests of the client and join tokens. Tests that are about one engine's
machinery live beside it (tests/integration/).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storekit import POLICY, T0, TTL, FakeClock, Run, claim_one, finish, shown, spec, submit_one, worker

from helpers import until
from orch import auth
from orch.core.errors import Conflict, IdempotencyKeyReused, NotFound, UnknownWorker, ValidationError
from orch.core.policy import Ask, Candidate, pick
from orch.core.rates import Rate
from orch.core.spec import JobSpec, parse_spec
from orch.core.states import TERMINAL, JobState, Outcome
from orch.core.times import iso
from orch.scheduler import wire
from orch.store.base import AttemptResult, OutputChunk, Store


def test_submit_then_get_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jobs = await store.submit([spec(name="first", queue="q1", priority=3)], POLICY)
        assert len(jobs) == 1
        job = await shown(store, jobs[0].id)
        assert job["id"] == jobs[0].id
        assert job["state"] == "queued"
        assert job["created_at"] == iso(T0)
        assert job["queue"] == "q1" and job["priority"] == 3 and job["name"] == "first"
        assert (await store.get_job(jobs[0].id)).spec == {  # the submitted form, as stored
            "command": ["true"], "queue": "q1", "priority": 3, "name": "first", "max_attempts": 3}
        assert job["command"] == "true"
        assert job["attempt"] == 0 and job["max_attempts"] == 3
        assert job["started_at"] is None and job["finished_at"] is None
        assert job["attempts"] == [] and job["result"] is None
        # What submit answered is what a read gives back.
        for k, v in wire.job_summary(jobs[0]).items():
            assert job[k] == v, k
        with pytest.raises(NotFound):
            await shown(store, 9999)

    run(tmp_path, body)


def test_job_max_attempts_overrides_default(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store, max_attempts=7)
        assert (await shown(store, jid))["max_attempts"] == 7

    run(tmp_path, body)


def test_each_job_is_claimed_by_exactly_one_worker(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.submit([spec(name=f"j{i}") for i in range(100)], POLICY)
        wids = [await worker(store, f"w{i}") for i in range(20)]
        results = await asyncio.gather(*(store.claim(w, ["default"], 7, TTL) for w in wids))
        claimed = [(w, j.job_id) for w, (jobs, _) in zip(wids, results, strict=True) for j in jobs]
        ids = [jid for _, jid in claimed]
        assert len(ids) == 100
        assert len(set(ids)) == 100, "a job was handed out twice"
        # The database agrees with what each worker was told.
        for w, jid in claimed:
            job = await shown(store, jid)
            assert job["state"] == "running" and job["worker"] == w and job["attempt"] == 1
            assert [a["worker"] for a in job["attempts"]] == [w]
        more, _ = await store.claim(wids[0], ["default"], 10, TTL)
        assert more == []

    run(tmp_path, body)


def test_claim_takes_highest_priority_first_then_oldest(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        prios = [0, 5, -3, 5, 10, 0]
        jobs = await store.submit([spec(priority=p) for p in prios], POLICY)
        ids = [j.id for j in jobs]
        w = await worker(store)
        order = [(await claim_one(store, w)).job_id for _ in prios]
        assert order == [ids[4], ids[1], ids[3], ids[0], ids[5], ids[2]]
        # One claim of several jobs comes back in the same order.
        jobs2 = await store.submit([spec(priority=p) for p in prios], POLICY)
        ids2 = [j.id for j in jobs2]
        got, _ = await store.claim(w, ["default"], 3, TTL)
        assert [j.job_id for j in got] == [ids2[4], ids2[1], ids2[3]]

    run(tmp_path, body)


def test_claim_only_from_the_workers_queues(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        a = await submit_one(store, queue="alpha")
        await submit_one(store, queue="beta")
        w = await worker(store, queues=("alpha",))
        got, _ = await store.claim(w, ["alpha"], 10, TTL)
        assert [j.job_id for j in got] == [a]
        assert json.loads(got[0].spec)["queue"] == "alpha" and got[0].attempt == 1

    run(tmp_path, body)


def test_claim_by_unknown_worker_is_refused(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        with pytest.raises(UnknownWorker):
            await store.claim("w-nobody", ["default"], 1, TTL)
        assert (await shown(store, jid))["state"] == "queued"

    run(tmp_path, body)


def test_a_claim_with_nothing_there_and_one_of_many_are_what_they_were(run: Run, tmp_path: Path) -> None:
    """Whatever a store does to answer an empty claim cheaply or to weigh a small one, the claim says the same: an
    unknown worker is refused with nothing queued too, a draining one is handed nothing, one without a queued
    job's runner nothing, and a claim asking for more than there is takes all there is, once."""
    async def body(store: Store, clock: FakeClock) -> None:
        with pytest.raises(UnknownWorker):
            await store.claim("w-nobody", ["default"], 1, TTL)
        w = await worker(store)
        assert (await store.claim(w, ["default"], 500, TTL))[0] == []
        ids = [j.id for j in await store.submit([spec(name=f"j{i}") for i in range(100)], POLICY)]
        got, changes = await store.claim(w, ["default", "other"], 500, TTL)
        assert sorted(j.job_id for j in got) == ids and sorted(c.job_id for c in changes) == ids
        assert (await store.claim(w, ["default"], 500, TTL))[0] == []
        python = await store.submit([parse_spec({"python": {"function": "m:f"}})], POLICY)
        assert (await store.claim(w, ["default"], 10, TTL))[0] == [], "an exec-only worker took a python job"
        py = await store.register_worker(name="py", hostname="h", queues=["default"], concurrency=1,
                                         runners=["exec", "python"])
        await submit_one(store)
        assert await store.drain_worker(py)
        assert (await store.claim(py, ["default"], 10, TTL))[0] == [], "a draining worker was handed work"
        other = await store.register_worker(name="py2", hostname="h", queues=["default"], concurrency=1,
                                            runners=["python"])
        assert [j.job_id for j in (await store.claim(other, ["default"], 10, TTL))[0]] == [python[0].id]

    run(tmp_path, body)


def test_list_jobs_pages_and_filters(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jobs = await store.submit([spec(queue="a" if i % 3 else "b") for i in range(11)], POLICY)
        ids = [j.id for j in jobs]
        seen, cursor = [], None
        while True:
            page, cursor = await store.list_jobs(limit=4, cursor=cursor)
            seen += [j.id for j in page]
            if cursor is None:
                break
        assert seen == sorted(ids, reverse=True)
        b, nxt = await store.list_jobs(queue="b", limit=100)
        assert [j.id for j in b] == [ids[i] for i in (9, 6, 3, 0)] and nxt is None
        w = await worker(store)
        await claim_one(store, w, ("b",))
        running, _ = await store.list_jobs(state="running", limit=100)
        assert [j.id for j in running] == [ids[0]]

    run(tmp_path, body)


def test_list_jobs_filters_by_name_label_and_text_and_counts_them(run: Run, tmp_path: Path) -> None:
    """The dashboard's filters: combinable, with cursor pages, counted alike; a text's % and _ are literal."""
    async def body(store: Store, clock: FakeClock) -> None:
        jobs = await store.submit([spec(name=f"resize-{i}" if i % 2 else "report", queue="a" if i % 3 else "b",
                                        labels={"team": "blue" if i % 4 else 'red"<x>'},
                                        command=["convert", f"IMG_{i}.png", "100%"]) for i in range(12)], POLICY)
        ids = [j.id for j in jobs]

        async def every(**kw: Any) -> list[int]:
            seen, cursor = [], None
            while True:
                page, cursor = await store.list_jobs(limit=2, cursor=cursor, **kw)
                seen += [j.id for j in page]
                if cursor is None:
                    break
            assert await store.count_jobs(**kw) == len(seen), kw
            return seen

        assert await every(name="report") == [ids[i] for i in (10, 8, 6, 4, 2, 0)]
        assert await every(label=("team", 'red"<x>')) == [ids[i] for i in (8, 4, 0)]
        assert await every(label=("team", "blue"), queue="b") == [ids[i] for i in (9, 6, 3)]
        assert await every(text="img_1") == [ids[i] for i in (11, 10, 1)]  # any case, in the command
        assert await every(text="RESIZE-1", state=JobState.QUEUED) == [ids[i] for i in (11, 1)]
        assert await every(text="100%") == list(reversed(ids))
        assert await every(text="0_") == [] and await every(text="%_") == []  # literal, not wildcards
        assert await every(name="report", label=("team", "nobody")) == []
        assert await store.count_jobs() == 12

    run(tmp_path, body)


def test_queue_depths_count_every_job_by_state_and_agree_with_queue_stats(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.submit([spec(queue="a") for _ in range(3)] + [spec(queue="b")], POLICY)
        w = await worker(store, queues=("a",))
        jid = (await claim_one(store, w, ("a",)))
        assert jid is not None
        await store.pause_queue("idle", True)  # a setting and no job
        done = await submit_one(store, queue="c")
        await store.cancel(done)
        by_state, queues = await store.queue_depths()
        assert by_state == {JobState.QUEUED: 3, JobState.RUNNING: 1, JobState.CANCELLED: 1}, by_state
        full = {q.name: (q.queued, q.running, q.paused) for q in await store.queue_stats()}
        assert {q.name: (q.queued, q.running, q.paused) for q in queues} == full == {
            "a": (2, 1, False), "b": (1, 0, False), "idle": (0, 0, True)}, full
        assert all(q.oldest_queued_at is None for q in queues)

    run(tmp_path, body)


def test_ended_per_minute_counts_the_last_hours_ends_by_state(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        since = clock.t
        w = await worker(store)
        for outcome, code in ((Outcome.SUCCEEDED, 0), (Outcome.SUCCEEDED, 0), (Outcome.FAILED, 1)):
            jid = await submit_one(store, max_attempts=1)
            await claim_one(store, w)
            clock.advance(61 if outcome == Outcome.FAILED else 1)
            assert (await finish(store, w, jid, 1, outcome, code)).accepted
        cancelled = await submit_one(store)
        await store.cancel(cancelled)
        got = await store.ended_per_minute(since)
        assert got == [(0, JobState.SUCCEEDED, 2), (1, JobState.CANCELLED, 1), (1, JobState.FAILED, 1)], got
        assert await store.ended_per_minute(clock.t + 1) == []

    run(tmp_path, body)


def test_every_transition_writes_an_event(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        clock.advance(1)
        await claim_one(store, w)
        clock.advance(1)
        assert (await finish(store, w, jid, 1, Outcome.FAILED, 3)).accepted
        clock.advance(2)  # backoff of attempt 1 is base = 2s
        await store.sweep(100.0, POLICY)
        clock.advance(1)
        await claim_one(store, w)
        clock.advance(1)
        assert (await finish(store, w, jid, 2, Outcome.SUCCEEDED, 0)).accepted
        events = await store.events(jid)
        got = [(e.job_id, e.attempt, e.from_state, e.to_state, e.at) for e in events]
        assert got == [
            (jid, 0, None, "queued", T0),
            (jid, 1, "queued", "running", T0 + 1),
            (jid, 1, "running", "retrying", T0 + 2),
            (jid, 1, "retrying", "queued", T0 + 4),
            (jid, 2, "queued", "running", T0 + 5),
            (jid, 2, "running", "succeeded", T0 + 6),
        ]
        assert all(e.reason for e in events)
        assert events[0].reason == "submitted"
        assert w in events[1].reason
        assert "exited 3" in events[2].reason
        ids = [e.id for e in events]
        assert ids == sorted(ids)
        assert await store.events(jid, after=ids[3]) == events[4:]

    run(tmp_path, body)


def test_success_sets_result_and_timestamps(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        clock.advance(1)
        await claim_one(store, w)
        clock.advance(2)
        out = (OutputChunk(jid, 1, "stdout", "hello\n"), OutputChunk(jid, 1, "stderr", "warn\n"))
        ans = await finish(store, w, jid, 1, Outcome.SUCCEEDED, 0, out)
        assert ans == (jid, 1, JobState.SUCCEEDED) and ans.accepted
        job = await shown(store, jid)
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


def test_failure_retries_after_backoff_then_sweep_requeues(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        ans = await finish(store, w, jid, 1, Outcome.FAILED, 1)
        assert ans.accepted and ans.state == "retrying"
        job = await shown(store, jid)
        assert job["state"] == "retrying"
        assert job["retry_at"] == iso(T0 + 2.0)
        assert job["exit_code"] == 1 and job["finished_at"] is None
        # Not due yet: the sweep leaves it, and nobody can claim it.
        clock.advance(1.9)
        sweep = await store.sweep(100.0, POLICY)
        assert sweep.changes == [] and sweep.next_due == pytest.approx(T0 + 2.0)
        assert (await shown(store, jid))["state"] == "retrying"
        assert (await store.claim(w, ["default"], 1, TTL))[0] == []
        # Due: queued again, and claimable as attempt 2.
        clock.advance(0.1)
        sweep = await store.sweep(100.0, POLICY)
        assert [(c.job_id, c.state) for c in sweep.changes] == [(jid, "queued")]
        assert sweep.next_due is None
        job = await shown(store, jid)
        assert job["state"] == "queued" and job["retry_at"] is None
        assert (await claim_one(store, w)).attempt == 2
        # Attempt 2 fails: the delay grows by the factor.
        await finish(store, w, jid, 2, Outcome.FAILED, 1)
        assert (await shown(store, jid))["retry_at"] == iso(clock.t + 6.0)

    run(tmp_path, body)


# --------------------------------------------------------------------------- delayed jobs (scheduled)


def test_a_delayed_job_is_scheduled_until_due_then_the_sweep_queues_it_with_an_event(run: Run, tmp_path: Path) -> None:
    """A delay puts the job in ``scheduled`` with its due time (the store's clock at submit plus the delay): no
    worker can claim it, a sweep before its time leaves it (saying when the next pass is due); the first sweep at
    its time queues it, with an event at that time; its wait in the queue counts from then."""
    heard: list[Any] = []

    async def body(store: Store, clock: FakeClock) -> None:
        store.on_commit = heard.extend
        clock.advance(5)
        jid = await submit_one(store, delay=30)
        rec = await store.get_job(jid)
        assert rec.job.state == "scheduled" and rec.job.run_at == T0 + 35
        assert rec.spec == {"command": ["true"], "delay": 30, "max_attempts": 3}  # as written
        assert [(c.job_id, c.state, c.due) for c in heard] == [(jid, "scheduled", T0 + 35)]
        w = await worker(store)
        assert (await store.claim(w, ["default"], 10, TTL))[0] == []
        clock.advance(29.9)
        sweep = await store.sweep(100.0, POLICY)
        assert sweep.changes == [] and sweep.next_due == pytest.approx(T0 + 35)
        assert (await store.job_state(jid))[0] == "scheduled"
        assert (await store.claim(w, ["default"], 10, TTL))[0] == []
        clock.advance(0.1)
        heard.clear()
        sweep = await store.sweep(100.0, POLICY)
        assert [(c.job_id, c.state, c.attempt) for c in sweep.changes] == [(jid, "queued", 0)]
        assert [(c.job_id, c.state) for c in heard] == [(jid, "queued")]  # heard like any queued job: it wakes
        assert sweep.next_due is None
        events = await store.events(jid)
        assert [(e.from_state, e.to_state, e.at, e.reason) for e in events] == [
            (None, "scheduled", T0 + 5, "submitted"), ("scheduled", "queued", T0 + 35, "scheduled time reached")]
        assert (await store.sweep(100.0, POLICY)).changes == []  # queued once
        clock.advance(2)
        heard.clear()
        lease = await claim_one(store, w)
        assert (lease.job_id, lease.attempt) == (jid, 1)
        assert [c.queue_wait for c in heard] == [pytest.approx(2.0)]  # from when it was due, not from its submit
        await finish(store, w, jid, 1, Outcome.SUCCEEDED, 0)
        assert (await shown(store, jid))["state"] == "succeeded"

    run(tmp_path, body)


def test_a_run_at_ahead_schedules_and_one_past_or_a_delay_of_0_queues_at_once(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        ahead, past, now, zero, plain = (j.id for j in await store.submit([
            spec(run_at=iso(T0 + 3600)), spec(run_at="2001-09-09T01:46:40Z"), spec(run_at=iso(T0)), spec(delay=0),
            spec()], POLICY))
        assert ahead + 4 == plain  # one batch: consecutive ids whatever their states
        job = (await store.get_job(ahead)).job
        assert (job.state, job.run_at) == ("scheduled", T0 + 3600)
        assert (await store.get_job(ahead)).spec["run_at"] == iso(T0 + 3600)
        for jid in (past, now, zero, plain):
            got = (await store.get_job(jid)).job
            assert (got.state, got.run_at) == ("queued", None), jid
            assert [(e.from_state, e.to_state) for e in await store.events(jid)] == [(None, "queued")]
        w = await worker(store)
        got, _ = await store.claim(w, ["default"], 10, TTL)
        assert sorted(lease.job_id for lease in got) == [past, now, zero, plain]
        assert (await store.sweep(100.0, POLICY)).next_due == T0 + 3600

    run(tmp_path, body)


def test_next_due_is_the_earliest_of_the_retrying_and_the_scheduled_jobs(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        later = await submit_one(store, delay=50)
        failing = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await finish(store, w, failing, 1, Outcome.FAILED, 1)  # retry due at T0 + 2
        assert (await store.sweep(100.0, POLICY)).next_due == pytest.approx(T0 + 2)
        soon = await submit_one(store, delay=1)
        assert (await store.sweep(100.0, POLICY)).next_due == pytest.approx(T0 + 1)
        clock.advance(1)
        sweep = await store.sweep(100.0, POLICY)
        assert [(c.job_id, c.state) for c in sweep.changes] == [(soon, "queued")]
        assert sweep.next_due == pytest.approx(T0 + 2)
        clock.advance(1)
        sweep = await store.sweep(100.0, POLICY)
        assert [(c.job_id, c.state) for c in sweep.changes] == [(failing, "queued")]
        assert sweep.next_due == pytest.approx(T0 + 50)
        clock.advance(100)
        sweep = await store.sweep(1000.0, POLICY)
        assert [(c.job_id, c.state) for c in sweep.changes] == [(later, "queued")] and sweep.next_due is None

    run(tmp_path, body)


def test_many_scheduled_jobs_come_due_in_one_sweep_each_with_its_event(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jobs = await store.submit([spec(delay=1 + i % 5, queue="a" if i % 2 else "b") for i in range(200)], POLICY)
        clock.advance(3)
        sweep = await store.sweep(100.0, POLICY)
        due = sorted(j.id for j in jobs if (j.run_at or 0) <= T0 + 3)
        assert len(due) == 120 and sorted(c.job_id for c in sweep.changes) == due
        assert {c.state for c in sweep.changes} == {"queued"}
        assert sweep.next_due == pytest.approx(T0 + 4)
        for jid in (due[0], due[-1]):
            assert [(e.to_state, e.at) for e in await store.events(jid)] == [("scheduled", T0), ("queued", T0 + 3)]
        counts = await store.count_by_state()
        assert (counts.get(JobState.SCHEDULED), counts.get(JobState.QUEUED)) == (80, 120)

    run(tmp_path, body)


def test_cancel_scheduled_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store, delay=60)
        clock.advance(1)
        rec, changes = await store.cancel(jid)
        assert rec.job.state == "cancelled" and rec.job.finished_at == T0 + 1
        assert [(c.job_id, c.state) for c in changes] == [(jid, "cancelled")]
        assert [(e.from_state, e.to_state, e.reason) for e in await store.events(jid)][-1] == (
            "scheduled", "cancelled", "cancelled by user")
        clock.advance(100)
        sweep = await store.sweep(1000.0, POLICY)
        assert sweep.changes == [] and sweep.next_due is None  # it never comes due
        assert (await shown(store, jid))["state"] == "cancelled"
        with pytest.raises(Conflict):
            await store.cancel(jid)

    run(tmp_path, body)


def test_scheduled_jobs_are_listed_counted_and_explained_by_state(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        a = await submit_one(store, delay=10, queue="nightly")
        b = await submit_one(store, run_at=iso(T0 + 20))
        queued = await submit_one(store)
        page, nxt = await store.list_jobs(state=JobState.SCHEDULED)
        assert [j.id for j in page] == [b, a] and nxt is None
        assert [j.id for j in (await store.list_jobs(state=JobState.QUEUED))[0]] == [queued]
        assert [j.id for j in (await store.list_jobs(queue="nightly"))[0]] == [a]
        assert [j.id for j in (await store.list_jobs(queue="nightly", state=JobState.SCHEDULED))[0]] == [a]
        assert (await store.count_by_state())[JobState.SCHEDULED] == 2
        snap = await store.metrics_snapshot()
        assert snap.jobs[JobState.SCHEDULED] == 2
        assert snap.queues[("nightly", JobState.SCHEDULED)] == 1 and snap.queues[("default", JobState.SCHEDULED)] == 1
        facts = await store.why_facts(a)
        assert facts.record.job.state == "scheduled" and facts.record.job.run_at == T0 + 10 and facts.now == T0
        assert facts.last_event is not None and facts.last_event.to_state == "scheduled"
        assert wire.job_summary((await store.get_job(a)).job)["scheduled_for"] == iso(T0 + 10)

    run(tmp_path, body)


def test_a_scheduled_job_survives_a_reopen_and_comes_due_after_it(run: Run, tmp_path: Path) -> None:
    ids: list[int] = []

    async def first(store: Store, clock: FakeClock) -> None:
        ids.append(await submit_one(store, delay=5))

    run(tmp_path, first)

    async def second(store: Store, clock: FakeClock) -> None:
        sweep = await store.sweep(100.0, POLICY)
        assert sweep.changes == [] and sweep.next_due == T0 + 5
        clock.advance(5)
        sweep = await store.sweep(100.0, POLICY)
        assert [(c.job_id, c.state) for c in sweep.changes] == [(ids[0], "queued")]

    run(tmp_path, second)


def test_exhausted_attempts_fail_and_keep_every_exit_code(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        codes = [3, 4, 5]
        for attempt, code in enumerate(codes, start=1):
            assert (await claim_one(store, w)).attempt == attempt
            ans = await finish(store, w, jid, attempt, Outcome.FAILED, code)
            assert ans.state == ("failed" if attempt == 3 else "retrying")
            clock.advance(1000)
            await store.sweep(10_000.0, POLICY)
        job = await shown(store, jid)
        assert job["state"] == "failed"
        assert job["exit_code"] == 5
        assert job["finished_at"] is not None
        assert [a["exit_code"] for a in job["attempts"]] == codes
        assert [a["state"] for a in job["attempts"]] == ["failed"] * 3
        # A failed job stays failed: nothing more to claim.
        assert (await store.claim(w, ["default"], 1, TTL))[0] == []

    run(tmp_path, body)


def test_exit_code_outside_retry_on_exit_fails_at_once(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store, retry_on_exit=[75])
        w = await worker(store)
        await claim_one(store, w)
        assert (await finish(store, w, jid, 1, Outcome.FAILED, 1)).state == "failed"
        jid2 = await submit_one(store, retry_on_exit=[75])
        await claim_one(store, w)
        assert (await finish(store, w, jid2, 1, Outcome.FAILED, 75)).state == "retrying"

    run(tmp_path, body)


def test_stale_completion_is_refused_and_changes_nothing(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
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
        assert (await claim_one(store, new)).attempt == 2

        before_job = await shown(store, jid)
        before_events = await store.events(jid)
        late = (OutputChunk(jid, 1, "stdout", "late output\n"),)
        ans = await finish(store, old, jid, 1, Outcome.SUCCEEDED, 0, late)
        assert ans.accepted is False and ans.state is None
        # The right attempt from the wrong worker is refused too.
        assert (await finish(store, old, jid, 2, Outcome.SUCCEEDED, 0)).accepted is False
        assert await store.append_output(old, [OutputChunk(jid, 2, "stdout", "x")]) == [False]
        assert await shown(store, jid) == before_job
        assert await store.events(jid) == before_events
        assert (await shown(store, jid))["state"] == "running"
        assert await store.output_after(jid, 0) == []
        # The current holder still completes normally.
        assert (await finish(store, new, jid, 2, Outcome.SUCCEEDED, 0)).accepted is True
        # And a second completion of the same attempt is stale.
        assert (await finish(store, new, jid, 2, Outcome.FAILED, 1)).accepted is False
        assert (await shown(store, jid))["state"] == "succeeded"

    run(tmp_path, body)


def test_heartbeat_from_unknown_worker_is_refused(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        with pytest.raises(UnknownWorker) as info:
            await store.heartbeat("w-doesnotexist", [], TTL)
        assert info.value.http_status == 409 and info.value.code == "unknown_worker"

    run(tmp_path, body)


def test_heartbeat_extends_the_lease(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
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
        assert (await shown(store, kept))["state"] == "running"
        assert (await shown(store, dropped))["attempts"][0]["state"] == "lost"
        # The expired attempt is now stale in the worker's next heartbeat.
        reply = await store.heartbeat(w, [(kept, 1), (dropped, 1)], TTL)
        assert reply.stale == [(dropped, 1)]

    run(tmp_path, body)


def test_silent_worker_is_lost_and_its_jobs_retry_or_fail(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
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
        r = await shown(store, retried)
        assert r["state"] == "retrying" and r["attempts"][0]["state"] == "lost"
        f = await shown(store, last_try)
        assert f["state"] == "failed" and f["attempts"][0]["state"] == "lost"
        assert "lost" in f["error"]
        states = {x.id: x.state for x in await store.list_workers()}
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
        assert (await shown(store, spare))["state"] == "queued"
        assert (await shown(store, retried))["state"] == "retrying"

    run(tmp_path, body)


def test_a_draining_worker_is_given_no_new_work(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        first = await submit_one(store)
        waiting = await submit_one(store)
        await claim_one(store, wid)
        await store.heartbeat(wid, [(first, 1)], TTL, draining=True)
        assert (await store.claim(wid, ["default"], 5, TTL))[0] == []
        answers, jobs = await store.complete_and_claim(
            wid, [AttemptResult(first, 1, Outcome.SUCCEEDED, exit_code=0)], POLICY, ["default"], 5, TTL)
        assert answers[0].accepted and jobs == []  # its report is taken, no job is handed to it
        assert (await shown(store, waiting))["state"] == "queued"

    run(tmp_path, body)


def test_hand_back_requeues_at_once_without_using_an_attempt(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store, max_attempts=1)
        w = await worker(store)
        other = await worker(store, "other")
        await claim_one(store, w)
        changes = await store.hand_back(w, [(jid, 1)], stop=True)
        assert [(c.job_id, c.state) for c in changes] == [(jid, "queued")]
        job = await shown(store, jid)
        assert job["state"] == "queued" and job["worker"] is None
        assert job["attempts"][0]["state"] == "handed_back"
        # No waiting: another worker takes it right away, and it still gets its one real attempt.
        got = await claim_one(store, other)
        assert got.job_id == jid and got.attempt == 2
        assert (await finish(store, other, jid, 2, Outcome.FAILED, 1)).state == "failed"
        # The stopped worker is gone.
        assert {x.id: x.state for x in await store.list_workers()}[w] == "stopped"
        with pytest.raises(UnknownWorker):
            await store.heartbeat(w, [], TTL)

    run(tmp_path, body)


def test_cancel_queued_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        clock.advance(1)
        rec, changes = await store.cancel(jid)
        assert rec.job.state == "cancelled" and rec.job.finished_at == T0 + 1
        assert [(c.job_id, c.state) for c in changes] == [(jid, "cancelled")]
        assert (await store.events(jid))[-1].reason == "cancelled by user"
        w = await worker(store)
        assert (await store.claim(w, ["default"], 1, TTL))[0] == []

    run(tmp_path, body)


def test_cancel_retrying_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await finish(store, w, jid, 1, Outcome.FAILED, 1)
        rec, _ = await store.cancel(jid)
        assert rec.job.state == "cancelled"
        clock.advance(1000)
        assert (await store.sweep(10_000.0, POLICY)).changes == []
        assert (await shown(store, jid))["state"] == "cancelled"

    run(tmp_path, body)


def test_cancel_running_job_waits_for_the_worker(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        rec, _ = await store.cancel(jid)
        assert rec.job.state == "running" and rec.job.cancel_requested is True
        reply = await store.heartbeat(w, [(jid, 1)], TTL)
        assert reply.cancel == [(jid, 1)]
        ans = await finish(store, w, jid, 1, Outcome.CANCELLED, -15)
        assert ans.accepted and ans.state == "cancelled"
        job = await shown(store, jid)
        assert job["state"] == "cancelled" and job["finished_at"] is not None
        assert [e.to_state for e in await store.events(jid)] == ["queued", "running", "cancelled"]

    run(tmp_path, body)


def test_cancel_requested_job_that_fails_ends_cancelled_not_retrying(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await store.cancel(jid)
        assert (await finish(store, w, jid, 1, Outcome.FAILED, 143)).state == "cancelled"

    run(tmp_path, body)


def test_cancel_of_a_finished_job_is_a_conflict(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await finish(store, w, jid, 1, Outcome.SUCCEEDED, 0)
        events = await store.events(jid)
        with pytest.raises(Conflict) as info:
            await store.cancel(jid)
        assert info.value.http_status == 409
        assert (await shown(store, jid))["state"] == "succeeded"
        assert await store.events(jid) == events
        with pytest.raises(NotFound):
            await store.cancel(424242)

    run(tmp_path, body)


def test_output_is_kept_in_order(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        chunks = [OutputChunk(jid, 1, "stdout", "one\n"), OutputChunk(jid, 1, "stderr", "oops\n"),
                  OutputChunk(jid, 1, "stdout", "two\n"), OutputChunk(jid, 1, "stdout", "héllo ✓\n")]
        assert await store.append_output(w, chunks) == [True] * 4
        got = await store.output_after(jid, 0)
        assert [(c.stream, c.data) for c in got] == [(c.stream, c.data) for c in chunks]
        assert [c.data for c in await store.output_after(jid, got[1].id)] == ["two\n", "héllo ✓\n"]
        job = await shown(store, jid)
        assert job["result"]["stdout"] == "one\ntwo\nhéllo ✓\n"
        assert job["result"]["stderr"] == "oops\n"
        assert job["attempts"][0]["stdout_bytes"] == len("one\ntwo\nhéllo ✓\n".encode())

    run(tmp_path, body)


def cut_marked(text: str) -> tuple[int, str]:
    """(bytes the leading marker says were not kept, the text after it); the text must start with one."""
    m = re.match(r"\[orch: ([0-9,]+) bytes of std(?:out|err) not kept\]\n", text)
    assert m is not None, text[:80]
    return int(m.group(1).replace(",", "")), text[m.end():]


def test_output_is_bounded_keeping_the_tail(run: Run, tmp_path: Path) -> None:
    limit = 1024

    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        lines = [f"line {i:04d} ".ljust(99, "x") + "\n" for i in range(60)]  # 6000 bytes
        for line in lines:
            assert await store.append_output(w, [OutputChunk(jid, 1, "stdout", line)]) == [True]
        await store.append_output(w, [OutputChunk(jid, 1, "stderr", "small\n")])
        job = await shown(store, jid)
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
        stored = sum(c.size for c in await store.output_after(jid) if c.stream == "stdout")
        assert stored <= limit + 100

    run(tmp_path, body, output_limit=limit)


def test_output_the_worker_dropped_is_marked_where_it_was_dropped(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        await store.append_output(w, [OutputChunk(jid, 1, "stdout", "first\n"),
                                      OutputChunk(jid, 1, "stdout", "second", skipped=1000),
                                      OutputChunk(jid, 1, "stderr", "", skipped=7)])
        chunks = await store.output_after(jid)
        assert [(c.stream, c.pos, c.size) for c in chunks] == [("stdout", 0, 6), ("stdout", 1006, 6)]
        # The end's own output has a hole too, and so does the end of stderr (nothing came after it).
        await finish(store, w, jid, 1, Outcome.SUCCEEDED, 0,
                     output=(OutputChunk(jid, 1, "stdout", "third\n", skipped=5),))
        job = await shown(store, jid)
        res = job["result"]
        assert res["stdout"] == ("first\n[orch: 1,000 bytes of stdout not kept]\nsecond"
                                 "\n[orch: 5 bytes of stdout not kept]\nthird\n")
        assert res["stderr"] == "[orch: 7 bytes of stderr not kept]\n"
        assert res["stdout_truncated"] is True and res["stderr_truncated"] is True
        assert job["attempts"][0]["stdout_bytes"] == 6 + 1000 + 6 + 5 + 6
        assert (await store.output_after(jid))[-1].pos == 6 + 1000 + 6 + 5

    run(tmp_path, body)


def test_one_huge_chunk_is_cut_to_its_tail(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        big = "A" * 3000 + "THE END"
        await store.append_output(w, [OutputChunk(jid, 1, "stdout", big)])
        res = (await shown(store, jid))["result"]
        skipped, kept = cut_marked(res["stdout"])
        assert len(kept.encode()) <= 1024 and skipped + len(kept.encode()) == len(big)
        assert kept.endswith("THE END")
        assert res["stdout_truncated"] is True

    run(tmp_path, body, output_limit=1024)


def test_listener_hears_each_committed_batch_once_before_any_answer(run: Run, tmp_path: Path) -> None:
    heard: list[list[tuple[int, str]]] = []

    async def body(store: Store, clock: FakeClock) -> None:
        store.on_commit = lambda changes: heard.append([(c.job_id, c.state) for c in changes])
        wid = await worker(store)
        assert heard == []  # a registration changes no job
        first, second = await asyncio.gather(submit_one(store), submit_one(store))
        # Each once, by the time its submit answered (SQLite commits the two together, PostgreSQL one by one).
        assert sorted(c for batch in heard for c in batch) == sorted([(first, "queued"), (second, "queued")])
        before = len(heard)
        job = await claim_one(store, wid)
        assert heard[-1] == [(job.job_id, "running")]
        await finish(store, wid, job.job_id, 1, Outcome.SUCCEEDED, 0)
        assert heard[-1] == [(job.job_id, "succeeded")]
        # A failed op's changes were rolled back with it: nobody hears of them.
        bad = JobSpec(argv=("true",), kind="command", queue=None)  # type: ignore[arg-type]
        with pytest.raises(Exception):  # noqa: B017  (each engine has its own integrity error)
            await store.submit([spec(), bad], POLICY)
        assert len(heard) == before + 2

    run(tmp_path, body)


def test_data_survives_close_and_reopen(run: Run, tmp_path: Path) -> None:
    saved: dict[str, Any] = {}

    async def first(store: Store, clock: FakeClock) -> None:
        done = await submit_one(store, name="done")
        waiting = await submit_one(store, name="waiting")
        w = await worker(store)
        await claim_one(store, w)
        await finish(store, w, done, 1, Outcome.SUCCEEDED, 0, (OutputChunk(done, 1, "stdout", "saved\n"),))
        saved.update(done=await shown(store, done), waiting=await shown(store, waiting),
                     events=await store.events(done), worker=w)

    run(tmp_path, first)

    async def second(store: Store, clock: FakeClock) -> None:
        done = await shown(store, saved["done"]["id"])
        assert done == saved["done"]
        assert done["state"] == "succeeded" and done["result"]["stdout"] == "saved\n"
        assert await store.events(done["id"]) == saved["events"]
        assert await shown(store, saved["waiting"]["id"]) == saved["waiting"]
        assert [x.id for x in await store.list_workers()] == [saved["worker"]]
        # New ids continue after the old ones.
        assert await submit_one(store) > saved["waiting"]["id"]

    run(tmp_path, second)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jobs=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-3, 3)), max_size=25),
       queues=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True),
       limit=st.integers(1, 12), taken=st.integers(0, 5))
def test_the_claim_takes_what_the_scheduling_policy_picks(run: Run, tmp_path_factory: pytest.TempPathFactory,
                                                          jobs: list[tuple[str, int]], queues: list[str],
                                                          limit: int, taken: int) -> None:
    """The store's claim (the fast path) against ``core.policy.pick`` over the same jobs as plain data."""

    async def body(store: Store, clock: FakeClock) -> None:
        made = await store.submit([spec(queue=q, priority=p) for q, p in jobs], POLICY) if jobs else []
        other = await worker(store, "other", ("a", "b", "c"))
        await store.claim(other, ["a", "b", "c"], taken, TTL) if taken else None  # some are running already
        w = await worker(store, "w", tuple(queues))
        listed, _ = await store.list_jobs(limit=1000)
        candidates = [Candidate(j.id, j.queue, j.priority, j.state) for j in listed]
        expected = pick(candidates, Ask(queues, limit))
        got, _ = await store.claim(w, queues, limit, TTL)
        assert [lease.job_id for lease in got] == expected
        assert len(made) == len(jobs)

    run(tmp_path_factory.mktemp("policy"), body)


def test_the_policy_takes_the_highest_priority_then_the_oldest_of_the_asked_queues() -> None:
    jobs = [Candidate(1, "a", 0), Candidate(2, "b", 5), Candidate(3, "a", 5), Candidate(4, "c", 9),
            Candidate(5, "a", 5, JobState.RUNNING)]
    assert pick(jobs, Ask(["a", "b"], 10)) == [2, 3, 1]
    assert pick(jobs, Ask(["a"], 1)) == [3]
    assert pick(jobs, Ask(["z"], 5)) == []


def test_one_scheduler_leads_at_a_time_and_a_resigned_role_is_taken_at_once(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        first = await store.lead("a", 30.0)
        assert first.held
        assert (await store.lead("a", 30.0)).held  # kept
        if not store.shared:  # one scheduler per database: it always leads
            assert (await store.lead("b", 30.0)).held
            return
        assert not (await store.lead("b", 30.0)).held  # a holds it for 30 s more
        await store.resign("a")
        took = await store.lead("b", 30.0)
        assert took.held and took.vacant_for is not None and took.vacant_for < 5.0
        assert not (await store.lead("a", 30.0)).held

    run(tmp_path, body)


def test_a_leader_whose_own_lease_ran_out_is_told_the_role_was_vacant(run: Run, tmp_path: Path) -> None:
    """A scheduler that stalled past its own lease, with nobody to take the role meanwhile, takes it back and
    hears how long nobody held it (so it gives the leases the recovery grace: nobody heard heartbeats). Kept
    in time, it hears nothing of the kind."""
    import time

    async def body(store: Store, clock: FakeClock) -> None:
        if not store.shared:
            return  # one scheduler per database: it leads throughout, and notices its stalls by itself
        assert (await store.lead("a", 30.0)).vacant_for is None
        kept = await store.lead("a", 0.05)
        assert kept.held and kept.vacant_for is None
        ran_out = time.monotonic() + 0.3
        await until(lambda: time.monotonic() > ran_out, 2, "the 0.05 s lease to run out")  # time itself
        back = await store.lead("a", 30.0)
        assert back.held and back.vacant_for is not None and 0.1 < back.vacant_for < 5.0, back

    run(tmp_path, body)


def test_output_and_errors_holding_nul_bytes_are_stored(run: Run, tmp_path: Path) -> None:
    """A job's output and a worker's error text may hold NUL (binary output): stored, never a failed write
    (PostgreSQL's text holds no NUL: it keeps U+FFFD there, as the worker keeps bytes that are not UTF-8)."""

    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store)
        w = await worker(store)
        await claim_one(store, w)
        assert await store.append_output(w, [OutputChunk(jid, 1, "stdout", "a\x00b")]) == [True]
        assert (await finish(store, w, jid, 1, Outcome.FAILED, 1)).accepted
        got = await store.output_after(jid)
        assert [c.data for c in got] in (["a\x00b"], ["a\ufffdb"]) and got[0].size == 3
        w2 = await worker(store, "w2")
        clock.advance(100)
        await store.sweep(1000.0, POLICY)
        await claim_one(store, w2)
        answers, _ = await store.complete(w2, [AttemptResult(jid, 2, Outcome.FAILED, exit_code=None,
                                                             error="bad\x00thing")], POLICY)
        assert answers[0].accepted
        rec = await store.get_job(jid)
        assert rec.job.error in ("bad\x00thing", "bad\ufffdthing")

    run(tmp_path, body)


def test_one_report_of_many_results_ends_each_as_if_it_came_alone(run: Run, tmp_path: Path) -> None:
    """A worker's report of many results at once (a store may end them all in one statement): each ends as it
    would alone, with its own last output; a stale one, one reported twice and an unknown one change nothing."""

    async def body(store: Store, clock: FakeClock) -> None:
        w = await worker(store)
        ok, retry, last, cancel, gone = [await submit_one(store) for _ in range(4)] + [await submit_one(store)]
        once = await submit_one(store, max_attempts=1)
        for _ in range(6):
            await claim_one(store, w)
        await store.cancel(cancel)  # running: the worker is asked, and its failure then ends it cancelled
        await store.cancel(gone)
        # "gone" ended another way meanwhile: its worker lost it and it was retried.
        clock.advance(TTL + 1)
        await store.heartbeat(w, [(j, 1) for j in (ok, retry, last, cancel, once)], TTL)
        await store.sweep(worker_ttl=TTL * 10, defaults=POLICY)
        assert (await shown(store, gone))["state"] == "cancelled"
        out = lambda jid, text: (OutputChunk(jid, 1, "stdout", text), OutputChunk(jid, 1, "stderr", "e:" + text))  # noqa: E731
        results = [
            AttemptResult(ok, 1, Outcome.SUCCEEDED, 0, duration=0.5, output=out(ok, "ok\n")),
            AttemptResult(retry, 1, Outcome.FAILED, 2, duration=0.5, output=out(retry, "retry\n")),
            AttemptResult(once, 1, Outcome.FAILED, 3, error="it broke", output=out(once, "once\n")),
            AttemptResult(cancel, 1, Outcome.FAILED, 1, output=out(cancel, "cancel\n")),
            AttemptResult(gone, 1, Outcome.SUCCEEDED, 0, output=out(gone, "late\n")),
            AttemptResult(ok, 1, Outcome.FAILED, 9, output=out(ok, "twice\n")),  # the same attempt again
            AttemptResult(424242, 1, Outcome.SUCCEEDED, 0),  # no such job
            AttemptResult(last, 1, Outcome.TIMED_OUT, None, error="timed out after 1s", output=out(last, "slow\n")),
        ]
        verdicts, changes = await store.complete(w, results, POLICY)
        assert [(v.job_id, v.state) for v in verdicts] == [
            (ok, JobState.SUCCEEDED), (retry, JobState.RETRYING), (once, JobState.FAILED),
            (cancel, JobState.CANCELLED), (gone, None), (ok, None), (424242, None), (last, JobState.RETRYING)]
        assert sorted((c.job_id, c.state) for c in changes) == sorted(
            [(ok, "succeeded"), (retry, "retrying"), (once, "failed"), (cancel, "cancelled"), (last, "retrying")])
        for jid, text in ((ok, "ok\n"), (retry, "retry\n"), (once, "once\n"), (cancel, "cancel\n"), (last, "slow\n")):
            job = await shown(store, jid)
            assert job["result"]["stdout"] == text and job["result"]["stderr"] == "e:" + text, jid
            assert job["attempts"][0]["stdout_bytes"] == len(text)
        assert (await shown(store, ok))["exit_code"] == 0  # the second report of it changed nothing
        assert (await shown(store, once))["error"] == "it broke"
        assert (await shown(store, retry))["retry_at"] == iso(clock.t + 2.0)
        assert "late" not in (await shown(store, gone))["result"]["stdout"]
        assert [e.to_state for e in await store.events(cancel)] == [
            JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED]


def _digests(n: int) -> dict[str, str]:
    return {"client": auth.digest(f"client-{n}"), "join": auth.digest(f"join-{n}")}


def test_tokens_are_put_once_unless_replaced_and_kept_across_a_reopen(run: Run, tmp_path: Path) -> None:
    first, second = _digests(1), _digests(2)

    async def body(store: Store, clock: FakeClock) -> None:
        assert await store.cluster_tokens() == {}
        assert await store.put_tokens(first, replace=False) == first
        # Another scheduler's set does not win over the one in effect: it is told that one.
        assert await store.put_tokens(second, replace=False) == first
        # A rotation replaces the roles it names, and only those.
        assert await store.put_tokens({"client": second["client"]}, replace=True) == {**first, "client": second["client"]}
        assert await store.cluster_tokens() == {**first, "client": second["client"]}

    async def reopened(store: Store, clock: FakeClock) -> None:
        assert await store.cluster_tokens() == {**first, "client": second["client"]}
        assert await store.put_tokens({}, replace=False) == {**first, "client": second["client"]}

    run(tmp_path, body)
    run(tmp_path, reopened)


def test_only_digests_of_known_roles_are_stored(run: Run, tmp_path: Path) -> None:
    kept = _digests(1)

    async def body(store: Store, clock: FakeClock) -> None:
        await store.put_tokens(kept, replace=False)
        token = auth.new_token("client")
        for bad in ({"client": token}, {"client": auth.digest(token).upper()}, {"admin": auth.digest(token)},
                    {"join": auth.digest(token), "client": ""}):
            with pytest.raises(ValidationError):
                await store.put_tokens(bad, replace=True)
        assert await store.cluster_tokens() == kept  # nothing of a refused put was written

    run(tmp_path, body)


def test_schedulers_putting_their_tokens_at_once_agree_on_one_set(run: Run, tmp_path: Path) -> None:
    """Concurrent first puts (on PostgreSQL each on a connection of its own, at once): every one of them is told
    the same set, and it is one of the sets offered, whole."""

    async def body(store: Store, clock: FakeClock) -> None:
        offered = [_digests(n) for n in range(8)]
        told = await asyncio.gather(*(store.put_tokens(d, replace=False) for d in offered))
        assert all(t == told[0] for t in told), told
        assert told[0] in offered
        assert await store.cluster_tokens() == told[0]

    run(tmp_path, body)


# ---- idempotency keys


def test_a_submit_with_a_kept_jobs_idempotency_key_is_that_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        first = (await store.submit([spec(idempotency_key="order-42", name="charge")], POLICY))[0]
        assert not first.replayed
        wid = await worker(store)
        lease = await claim_one(store, wid)
        await finish(store, wid, lease.job_id, lease.attempt, Outcome.SUCCEEDED)
        clock.t += 60
        again = (await store.submit([spec(idempotency_key="order-42", name="charge")], POLICY))[0]
        assert again.replayed and again.id == first.id
        assert again.state is JobState.SUCCEEDED  # the job as it is now, not a new one
        assert (await store.count_by_state()) == {JobState.SUCCEEDED: 1}
        assert [e.to_state for e in await store.events(first.id)].count(JobState.QUEUED) == 1
        # Without a key, or with another, the same spec is a new job.
        other = (await store.submit([spec(name="charge"), spec(idempotency_key="order-43", name="charge")], POLICY))
        assert [j.replayed for j in other] == [False, False]
        assert len({first.id, *(j.id for j in other)}) == 3

    run(tmp_path, body)


def test_the_same_key_with_another_spec_is_refused_and_changes_nothing(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        first = (await store.submit([spec(idempotency_key="k-1", command=["./charge.sh", "42"])], POLICY))[0]
        before = await store.count_by_state()
        with pytest.raises(IdempotencyKeyReused) as e:
            await store.submit([spec(command=["true"]), spec(idempotency_key="k-1", command=["./charge.sh", "43"])],
                               POLICY)
        assert e.value.code == "idempotency_key_reused" and e.value.field == "idempotency_key"
        assert "'k-1'" in e.value.message and f"job {first.id}" in e.value.message
        assert await store.count_by_state() == before  # the batch is all or none: its other job is not in

    run(tmp_path, body)


def test_keys_inside_a_batch_replay_alone_and_one_key_twice_is_one_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        kept = (await store.submit([spec(idempotency_key="a")], POLICY))[0]
        jobs = await store.submit([spec(), spec(idempotency_key="a"), spec(idempotency_key="b"),
                                   spec(idempotency_key="b")], POLICY)
        assert [j.replayed for j in jobs] == [False, True, False, True]
        assert jobs[1].id == kept.id and jobs[3].id == jobs[2].id
        assert jobs[0].id < jobs[2].id  # the new ones in the order given
        assert (await store.count_by_state()) == {JobState.QUEUED: 3}
        with pytest.raises(IdempotencyKeyReused):
            await store.submit([spec(idempotency_key="c"), spec(idempotency_key="c", priority=5)], POLICY)
        assert (await store.count_by_state()) == {JobState.QUEUED: 3}

    run(tmp_path, body)


def test_submits_of_one_key_at_once_make_one_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        answers = await asyncio.gather(*(store.submit([spec(idempotency_key="once")], POLICY) for _ in range(20)))
        ids = {jobs[0].id for jobs in answers}
        assert len(ids) == 1
        assert sum(not jobs[0].replayed for jobs in answers) == 1
        assert (await store.count_by_state()) == {JobState.QUEUED: 1}

    run(tmp_path, body)


# ---- replay (orch retry)


def test_a_replayed_failed_job_runs_again_with_fresh_attempts_and_keeps_its_history(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        jid = await submit_one(store, max_attempts=2, backoff={"base": 0, "jitter": 0})
        wid = await worker(store)
        for attempt in (1, 2):
            lease = await claim_one(store, wid)
            assert (lease.job_id, lease.attempt) == (jid, attempt)
            await finish(store, wid, jid, attempt, Outcome.FAILED, exit_code=3)
            await store.sweep(60, POLICY)  # the backoff (0 s) is over: queued again, once
        assert (await store.job_state(jid)) == (JobState.FAILED, 2)
        refused, changes = await store.replay([jid], "alice@laptop")
        assert refused == {} and [(c.job_id, c.state) for c in changes] == [(jid, "queued")]
        shown_job = await shown(store, jid)
        assert shown_job["state"] == "queued" and shown_job["finished_at"] is None and shown_job["exit_code"] is None
        assert shown_job["max_attempts"] == 4  # two more, counted from attempt 2
        events = await store.events(jid)
        assert (events[-1].from_state, events[-1].to_state) == (JobState.FAILED, JobState.QUEUED)
        assert events[-1].reason == "replayed by alice@laptop"
        # It runs again under a new attempt number, and the old attempts' reports stay refused.
        lease = await claim_one(store, wid)
        assert (lease.job_id, lease.attempt) == (jid, 3)
        assert (await finish(store, wid, jid, 2, Outcome.SUCCEEDED)).state is None  # stale: attempt 2 is over
        assert (await finish(store, wid, jid, 3, Outcome.SUCCEEDED)).state is JobState.SUCCEEDED
        record = await store.get_job(jid)
        assert [(a.attempt, a.state) for a in record.attempts] == [
            (1, Outcome.FAILED), (2, Outcome.FAILED), (3, Outcome.SUCCEEDED)]

    run(tmp_path, body)


def test_only_failed_and_cancelled_jobs_are_replayed_and_the_rest_are_told_why(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        ids = [await submit_one(store) for _ in range(3)]
        cancelled, queued, done = ids
        await store.cancel(cancelled)
        wid = await worker(store)
        leases, _ = await store.claim(wid, ["default"], 2, TTL)
        assert [x.job_id for x in leases] == [queued, done]
        await finish(store, wid, done, 1, Outcome.SUCCEEDED)
        refused, changes = await store.replay([cancelled, queued, done, 999], "ops")
        assert [c.job_id for c in changes] == [cancelled]
        assert set(refused) == {queued, done, 999}
        assert "running" in refused[queued].message and "succeeded" in refused[done].message
        assert isinstance(refused[999], NotFound) and refused[999].message == "no job 999"
        assert isinstance(refused[done], Conflict)
        assert (await store.job_state(cancelled))[0] is JobState.QUEUED
        assert (await store.job_state(done))[0] is JobState.SUCCEEDED
        # A second replay of the same job finds it queued: refused, nothing changes.
        refused, changes = await store.replay([cancelled], "ops")
        assert changes == [] and "queued" in refused[cancelled].message
        lease = await claim_one(store, wid)
        assert (lease.job_id, lease.attempt) == (cancelled, 1)  # cancelled before it ran: its first attempt

    run(tmp_path, body)


# ---- queues: pause and resume, and what `orch queues` shows


def test_a_paused_queue_hands_out_nothing_while_its_running_jobs_go_on(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        first, second = [await submit_one(store, queue="email") for _ in range(2)]
        other = await submit_one(store)
        wid = await worker(store, queues=("email", "default"))
        lease = await claim_one(store, wid, ("email",))
        assert lease.job_id == first
        assert await store.pause_queue("email", True) is True
        assert await store.pause_queue("email", True) is False  # paused already: nothing changes
        # Only the other queue's job is handed out, by a claim over both queues, and by complete-and-claim.
        leases, _ = await store.claim(wid, ["email", "default"], 10, TTL)
        assert [x.job_id for x in leases] == [other]
        assert (await store.claim(wid, ["email"], 10, TTL))[0] == []
        # The running job goes on: its report is taken, and the claim that comes with it hands out nothing.
        verdicts, more = await store.complete_and_claim(
            wid, [AttemptResult(first, lease.attempt, Outcome.SUCCEEDED, exit_code=0, duration=0.1)], POLICY,
            ["email"], 5, TTL)
        assert [v.state for v in verdicts] == [JobState.SUCCEEDED] and more == []
        facts = await store.why_facts(second)
        assert facts.queue_paused is True
        assert await store.queued_in(["email", "default"]) == []  # no waiter is woken for a paused queue's jobs
        wid2 = await worker(store, "w2", queues=("email",))
        await store.pause_queue("email", False)
        running = await claim_one(store, wid2, ("email",))
        await store.pause_queue("email", True)
        assert (await store.why_facts(running.job_id)).queue_paused is False  # running: the pause is not its story
        await finish(store, wid2, running.job_id, running.attempt, Outcome.SUCCEEDED)
        second = (await store.submit([spec(queue="email")], POLICY))[0].id
        (email,) = await store.queue_stats(["email"])
        assert (email.name, email.paused, email.queued, email.running) == ("email", True, 1, 0)
        clock.advance(5)
        assert await store.pause_queue("email", False) is True
        assert await store.pause_queue("email", False) is False
        assert (await store.why_facts(second)).queue_paused is False
        assert (await claim_one(store, wid, ("email",))).job_id == second

    run(tmp_path, body)


def test_a_pause_outlives_a_reopen_and_queue_stats_count_each_state(run: Run, tmp_path: Path) -> None:
    async def first(store: Store, clock: FakeClock) -> None:
        queued = [await submit_one(store, queue="email") for _ in range(3)]
        await submit_one(store, queue="email", delay=600)
        wid = await worker(store, queues=("email",))
        await claim_one(store, wid, ("email",))
        assert await store.pause_queue("email", True)
        assert await store.pause_queue("idle", True)  # a queue no job has named yet may be paused
        assert queued

    async def second(store: Store, clock: FakeClock) -> None:
        wid = await worker(store, "w2", queues=("email",))
        assert (await store.claim(wid, ["email"], 10, TTL))[0] == []  # still paused after the reopen
        stats = {q.name: q for q in await store.queue_stats()}
        assert set(stats) == {"email", "idle"}
        email = stats["email"]
        assert (email.queued, email.running, email.scheduled, email.retrying, email.paused) == (2, 1, 1, 0, True)
        assert email.oldest_queued_at == T0
        assert stats["idle"] == stats["idle"]._replace(queued=0, running=0, paused=True, oldest_queued_at=None)
        assert [q.name for q in await store.queue_stats(["nowhere", "email"])] == ["email", "nowhere"]
        assert (await store.queue_stats(["nowhere"]))[0].paused is False
        assert await store.pause_queue("email", False)
        assert len((await store.claim(wid, ["email"], 10, TTL))[0]) == 2

    run(tmp_path, first)
    run(tmp_path, second)


# ---- rate limits


def test_a_rate_limit_spaces_the_starts_of_the_jobs_naming_it(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        assert await store.set_limit("api", Rate(10, 1.0)) is True  # 10 a second: 0.1 s apart
        assert await store.set_limit("api", Rate(10, 1.0)) is False  # there already: changed, not made
        jobs = await store.submit([spec(rate_keys=["api"]) for _ in range(4)], POLICY)
        assert [j.state for j in jobs] == [JobState.QUEUED] + [JobState.SCHEDULED] * 3
        assert [j.run_at for j in jobs] == [None, pytest.approx(T0 + 0.1), pytest.approx(T0 + 0.2),
                                            pytest.approx(T0 + 0.3)]
        events = await store.events(jobs[2].id)
        assert events[0].to_state is JobState.SCHEDULED
        assert events[0].reason == f"submitted; held by rate limit api until {iso(T0 + 0.2)}"
        assert (await store.events(jobs[0].id))[0].reason == "submitted"
        # A job not naming it is not held; one naming a limit no one made is refused, and nothing is submitted.
        assert (await store.submit([spec()], POLICY))[0].state is JobState.QUEUED
        with pytest.raises(NotFound, match="no rate limit 'nope'") as e:
            await store.submit([spec(rate_keys=["api"]), spec(rate_keys=["nope"])], POLICY)
        assert e.value.field == "rate_keys"
        assert len((await store.list_jobs(limit=100))[0]) == 5
        (info,) = await store.limits()
        assert (info.name, info.rate, info.tat) == ("api", Rate(10, 1.0), pytest.approx(T0 + 0.4))
        # Once the bucket has refilled, a start is allowed at once again; in a batch with jobs naming no limit, each
        # job gets its own state and first event, in the order given.
        clock.advance(10)
        mixed = await store.submit([spec(rate_keys=["api"]), spec(), spec(rate_keys=["api"])], POLICY)
        assert [j.state for j in mixed] == [JobState.QUEUED, JobState.QUEUED, JobState.SCHEDULED]
        assert [j.id for j in mixed] == sorted(j.id for j in mixed)
        assert [(await store.events(j.id))[0].reason.split(";")[0] for j in mixed] == ["submitted"] * 3
        assert (await store.events(mixed[2].id))[0].reason.startswith("submitted; held by rate limit api until")
        assert (await store.job_state(mixed[1].id))[0] is JobState.QUEUED
        clock.advance(10)
        assert await store.delete_limit("api") is True and await store.delete_limit("api") is False
        assert await store.limits() == []

    run(tmp_path, body)


def test_a_burst_lets_that_many_start_at_once_and_the_strictest_limit_holds(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.set_limit("per-minute", Rate(1, 60.0, burst=3))
        await store.set_limit("fast", Rate(100, 1.0, burst=10))
        jobs = await store.submit([spec(rate_keys=["fast", "per-minute"]) for _ in range(4)], POLICY)
        assert [j.state for j in jobs] == [JobState.QUEUED] * 3 + [JobState.SCHEDULED]
        assert jobs[3].run_at == pytest.approx(T0 + 60)
        assert (await store.events(jobs[3].id))[0].reason.startswith("submitted; held by rate limit per-minute")
        # A delayed start would hold the bucket back until its time: refused, for now.
        with pytest.raises(ValidationError, match="rate_keys cannot go with run_at or delay"):
            spec(rate_keys=["fast"], delay=3600)
        # It came due, with the others: the sweep queues them as any delayed job.
        clock.advance(60)
        await store.sweep(60, POLICY)
        assert (await store.job_state(jobs[3].id))[0] is JobState.QUEUED

    run(tmp_path, body)


def test_a_replayed_idempotent_submit_takes_no_start_from_its_limit(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.set_limit("api", Rate(1, 1.0))
        first = await store.submit([spec(rate_keys=["api"], idempotency_key="k")], POLICY)
        again = await store.submit([spec(rate_keys=["api"], idempotency_key="k")], POLICY)
        assert again[0].replayed and again[0].id == first[0].id and first[0].state is JobState.QUEUED
        other = await store.submit([spec(rate_keys=["api"])], POLICY)
        assert other[0].state is JobState.SCHEDULED and other[0].run_at == pytest.approx(T0 + 1)  # not T0 + 2
        # The limit deleted since, the retried submit is still that job (not a 404 for the limit).
        await store.delete_limit("api")
        late = await store.submit([spec(rate_keys=["api"], idempotency_key="k")], POLICY)
        assert late[0].replayed and late[0].id == first[0].id

    run(tmp_path, body)


# ---- retention


def test_purge_deletes_jobs_ended_before_a_time_with_all_that_is_theirs_oldest_first(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        ended: list[int] = []
        for outcome in (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.SUCCEEDED):
            jid = await submit_one(store, max_attempts=1, idempotency_key=f"k-{len(ended)}")
            lease = await claim_one(store, wid)
            out = (OutputChunk(jid, lease.attempt, "stdout", "x" * 100, 0),)
            await store.append_output(wid, out)
            await finish(store, wid, jid, lease.attempt, outcome, exit_code=0 if outcome is Outcome.SUCCEEDED else 1)
            ended.append(jid)
            clock.advance(10)
        cancelled = await submit_one(store)
        await store.cancel(cancelled)
        waiting = await submit_one(store)  # queued: never purged, however old
        clock.advance(100)
        # Only the failed ones, then every ended one before a time, in batches of one: oldest first.
        assert await store.purge(clock() - 1, [JobState.FAILED], 10) == (1, pytest.approx(0, abs=1))
        assert await store.purge(clock() - 1, list(TERMINAL), 1) == (1, pytest.approx(0, abs=1))
        with pytest.raises(NotFound):
            await store.get_job(ended[0])
        assert (await store.get_job(ended[2])).job.state is JobState.SUCCEEDED
        assert (await store.purge(clock() - 1, list(TERMINAL), 10))[0] == 2  # the last success and the cancel
        assert (await store.purge(clock() - 1, list(TERMINAL), 10))[0] == 0
        assert await store.events(ended[2]) == [] and await store.output_after(ended[2]) == []
        left, _ = await store.list_jobs(limit=100)
        assert [j.id for j in left] == [waiting]
        # A purged job's idempotency key is free again: a submit with it makes a new job.
        again = await store.submit([spec(idempotency_key="k-0")], POLICY)
        assert not again[0].replayed and again[0].id not in ended

    run(tmp_path, body)


def test_purge_keeps_jobs_that_ended_after_the_time_and_replayed_ones(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        old, young = await submit_one(store), await submit_one(store)
        await store.cancel(old)
        clock.advance(60)
        await store.cancel(young)
        replayed = await submit_one(store)
        await store.cancel(replayed)
        clock.advance(60)
        await store.replay([replayed], "ops")  # queued again: not ended, not purged
        assert (await store.purge(clock() - 90, list(TERMINAL), 10))[0] == 1
        left = {j.id for j in (await store.list_jobs(limit=10))[0]}
        assert left == {young, replayed}

    run(tmp_path, body)


# ---- concurrency keys


def _ck(key: str, limit: int, on_limit: str = "queue") -> dict[str, Any]:
    return {"concurrency": {"key": key, "limit": limit, "on_limit": on_limit}}


def test_a_concurrency_key_runs_at_most_its_limit_and_never_blocks_other_keys_or_its_queue(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        t7 = [(await store.submit([spec(**_ck("tenant-7", 2))], POLICY))[0].id for _ in range(5)]
        t8 = await submit_one(store, **_ck("tenant-8", 2))
        plain = await submit_one(store)
        wid = await worker(store)
        leases, _ = await store.claim(wid, ["default"], 10, TTL)
        # The first two of tenant-7, then the jobs behind the held three: a full key is skipped, not waited on.
        assert sorted(x.job_id for x in leases) == sorted([t7[0], t7[1], t8, plain])
        assert (await store.claim(wid, ["default"], 10, TTL))[0] == []
        assert await store.queued_in(["default"]) == []  # nothing to be had: no waiter is woken for held jobs
        facts = await store.why_facts(t7[2])
        assert facts.held is True and facts.slot_holders == [t7[0], t7[1]]
        assert (await store.why_facts(t7[2])).record.job.state is JobState.QUEUED
        (q,) = await store.queue_stats(["default"])
        assert (q.queued, q.running) == (3, 4)
        # A slot is freed when its attempt ends: the first held job is let go, and the commit says so (a wake-up).
        by_id = {x.job_id: x for x in leases}
        heard: list[Any] = []
        store.on_commit = heard.extend
        await finish(store, wid, t7[0], 1, Outcome.SUCCEEDED, exit_code=0)
        assert [(c.job_id, c.state, c.queue) for c in heard if c.unheld] == [(t7[2], "queued", "default")]
        assert await store.queued_in(["default"]) == ["default"]
        assert (await store.why_facts(t7[2])).held is False
        assert (await store.why_facts(t7[3])).held is True
        assert [x.job_id for x in (await store.claim(wid, ["default"], 10, TTL))[0]] == [t7[2]]
        # A failed attempt going to backoff frees its slot too; when it is due again it waits behind the key.
        await finish(store, wid, t7[1], by_id[t7[1]].attempt, Outcome.FAILED, exit_code=1)
        assert [x.job_id for x in (await store.claim(wid, ["default"], 10, TTL))[0]] == [t7[3]]
        clock.advance(2.5)  # its backoff (2 s) is over; the leases (10 s) are not
        await store.sweep(worker_ttl=10**6, defaults=POLICY)
        # Back from backoff but the key is full (t7[2] and t7[3] run): queued, held like t7[4].
        facts = await store.why_facts(t7[1])
        assert facts.record.job.state is JobState.QUEUED and facts.held is True
        assert facts.slot_holders == [t7[2], t7[3]]
        assert (await store.claim(wid, ["default"], 10, TTL))[0] == []

    run(tmp_path, body)


def test_a_lost_workers_slots_come_back_when_its_leases_expire(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        ids = [j.id for j in await store.submit([spec(**_ck("k", 1), max_attempts=1) for _ in range(3)], POLICY)]
        lost = await worker(store, "lost")
        other = await worker(store, "other")
        assert [x.job_id for x in (await store.claim(lost, ["default"], 4, TTL))[0]] == [ids[0]]
        assert (await store.claim(other, ["default"], 4, TTL))[0] == []
        clock.advance(TTL + 1)  # no heartbeat from "lost": its lease runs out
        await store.sweep(worker_ttl=10**6, defaults=POLICY)
        assert (await store.job_state(ids[0]))[0] is JobState.FAILED
        assert [x.job_id for x in (await store.claim(other, ["default"], 4, TTL))[0]] == [ids[1]]

    run(tmp_path, body)


def test_skip_new_ends_a_submit_to_a_full_key_and_cancel_running_makes_room(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        first = await submit_one(store, **_ck("sync", 1, "skip_new"))
        (skipped,) = await store.submit([spec(**_ck("sync", 1, "skip_new"))], POLICY)
        assert skipped.state is JobState.SKIPPED
        events = await store.events(skipped.id)
        assert [e.to_state for e in events] == [JobState.QUEUED, JobState.SKIPPED]
        assert events[-1].reason.startswith("skipped: concurrency key 'sync' has 1 of 1 slots taken")
        assert (await claim_one(store, wid)).job_id == first
        # The skipped job is replayed like a cancelled one (and then waits for the slot like any retry).
        refused, _ = await store.replay([skipped.id], "me@host")
        assert refused == {}
        assert (await store.why_facts(skipped.id)).held is True

        # cancel_running: the newest wins; a queued job it replaces ends now, a running one is asked to stop.
        a = await submit_one(store, **_ck("deploy", 1, "cancel_running"))
        ra = await claim_one(store, wid)
        assert ra.job_id == a
        b = await submit_one(store, **_ck("deploy", 1, "cancel_running"))
        job_a = (await store.get_job(a, with_output=False)).job
        assert job_a.state is JobState.RUNNING and job_a.cancel_requested
        assert (await store.why_facts(b)).held is True
        c = await submit_one(store, **_ck("deploy", 1, "cancel_running"))  # b, still held, is cancelled for it
        assert (await store.job_state(b))[0] is JobState.CANCELLED
        assert (await store.events(b))[-1].reason == (
            f"cancelled: concurrency key 'deploy' is full and job {c} takes its place (on_limit cancel_running)")
        assert (await store.claim(wid, ["default"], 10, TTL))[0] == []
        verdict = await finish(store, wid, a, ra.attempt, Outcome.CANCELLED)
        assert verdict.state is JobState.CANCELLED
        assert (await claim_one(store, wid)).job_id == c

    run(tmp_path, body)


def test_a_hand_back_keeps_its_slot_and_a_cancelled_held_job_frees_nothing(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        ids = [j.id for j in await store.submit([spec(**_ck("k", 1)) for _ in range(3)], POLICY)]
        wid = await worker(store)
        lease = await claim_one(store, wid)
        await store.hand_back(wid, [(lease.job_id, lease.attempt)], stop=False)
        assert (await store.why_facts(ids[0])).held is False  # handed back: queued again, its slot kept
        assert (await store.why_facts(ids[1])).held is True
        await store.cancel(ids[1])  # a held job cancelled frees no slot: the next one stays held
        assert (await store.why_facts(ids[2])).held is True
        assert (await claim_one(store, wid)).job_id == ids[0]
        await store.cancel(ids[0])  # running: asked to stop; its slot is freed when it ends
        assert (await store.why_facts(ids[2])).held is True

    run(tmp_path, body)


def test_a_queue_concurrency_limit_hands_out_no_more_than_it_has_room_for(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        assert await store.set_queue_concurrency("email", 2) is True
        assert await store.set_queue_concurrency("email", 2) is False  # as it was: nothing changes
        emails = [j.id for j in await store.submit([spec(queue="email") for _ in range(6)], POLICY)]
        other = await submit_one(store)
        wid = await worker(store, queues=("email", "default"))
        first = (await store.claim(wid, ["email", "default"], 10, TTL))[0]
        assert sorted(x.job_id for x in first) == sorted([emails[0], emails[1], other])
        assert (await store.claim(wid, ["email", "default"], 10, TTL))[0] == []
        (q,) = await store.queue_stats(["email"])
        assert (q.concurrency, q.queued, q.running, q.held) == (2, 4, 2, 0)
        # An attempt that ends makes room for one more, and its queue's waiters hear of it.
        heard: list[Any] = []
        store.on_commit = heard.extend
        by_id = {x.job_id: x for x in first}
        await finish(store, wid, emails[0], by_id[emails[0]].attempt, Outcome.SUCCEEDED, exit_code=0)
        assert any(c.queue == "email" and c.state == "queued" for c in heard)
        verdicts, more = await store.complete_and_claim(
            wid, [AttemptResult(emails[1], by_id[emails[1]].attempt, Outcome.SUCCEEDED, exit_code=0, duration=0.1)],
            POLICY, ["email"], 10, TTL)
        assert [x.job_id for x in more] == [emails[2], emails[3]]  # room for two: the first's and its own
        # Raised, it hands out up to the new limit; lifted, everything.
        assert await store.set_queue_concurrency("email", 3) is True
        assert [x.job_id for x in (await store.claim(wid, ["email"], 10, TTL))[0]] == [emails[4]]
        assert await store.set_queue_concurrency("email", None) is True
        assert [x.job_id for x in (await store.claim(wid, ["email"], 10, TTL))[0]] == [emails[5]]
        (q,) = await store.queue_stats(["email"])
        assert (q.concurrency, q.running) == (None, 4)

    run(tmp_path, body)


def test_queue_stats_count_the_jobs_held_by_their_key(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.submit([spec(queue="sync", **_ck("k", 1)) for _ in range(4)], POLICY)
        (q,) = await store.queue_stats(["sync"])
        assert (q.queued, q.held, q.concurrency) == (4, 3, None)

    run(tmp_path, body)


def test_a_submit_beside_the_end_that_frees_a_slot_does_not_pass_the_held_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        first, waiting = [j.id for j in await store.submit([spec(**_ck("k", 1)) for _ in range(2)], POLICY)]
        wid = await worker(store)
        lease = await claim_one(store, wid)
        assert lease.job_id == first
        # The end and a new submit of the key at once (SQLite: in one write batch): the held job goes first.
        _, (late,) = await asyncio.gather(finish(store, wid, first, lease.attempt, Outcome.SUCCEEDED, exit_code=0),
                                          store.submit([spec(**_ck("k", 1))], POLICY))
        assert (await store.why_facts(waiting)).held is False
        assert (await store.why_facts(late.id)).held is True
        assert (await claim_one(store, wid)).job_id == waiting

    run(tmp_path, body)
