"""The store contract for job dependencies (orch/core/dag.py), on every backend: blocked until met, skipped down
the graph when one can never be met, un-skipped by a replay of the dependency, decided in the transaction of
the end that decides them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from storekit import POLICY, TTL, FakeClock, Run, claim_one, spec, worker

from orch.core.errors import Conflict, NotFound
from orch.core.states import JobState, Outcome
from orch.store.base import AttemptResult, Store


def _job(ref: str, *needs: Any, **kw: Any) -> Any:
    body: dict[str, Any] = {"ref": ref, "max_attempts": 1, **kw}
    if needs:
        body["depends_on"] = list(needs)
    return spec(**body)


async def _states(store: Store, ids: dict[str, int]) -> dict[str, str]:
    return {ref: (await store.job_state(jid))[0].value for ref, jid in ids.items()}


async def _run(store: Store, wid: str, job_id: int, outcome: Outcome = Outcome.SUCCEEDED,
               value: str | None = None, queue: str = "default") -> Any:
    """Claim ``job_id`` (it must be the next one to be had from ``queue``) and end its attempt so."""
    lease = await claim_one(store, wid, (queue,))
    assert lease.job_id == job_id, (lease.job_id, job_id)
    code = 0 if outcome is Outcome.SUCCEEDED else 1
    answers, changes = await store.complete(
        wid, [AttemptResult(job_id, lease.attempt, outcome, exit_code=code, duration=0.1, value=value)], POLICY)
    assert answers[0].accepted
    return lease, changes


async def _workflow(store: Store, *jobs: Any) -> dict[str, int]:
    got = await store.submit(list(jobs), POLICY)
    return {j.ref: g.id for j, g in zip(jobs, got, strict=True)}


def test_a_job_is_blocked_until_its_dependency_succeeds_then_queued_by_that_commit_with_its_inputs(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        ids = await _workflow(store, _job("extract"), _job("transform", "extract"), _job("load", "transform"))
        assert await _states(store, ids) == {"extract": "queued", "transform": "blocked", "load": "blocked"}
        more, _ = await store.claim(wid, ["default"], 10, TTL)
        assert [x.job_id for x in more] == [ids["extract"]]  # the blocked ones are not to be had
        answers, changes = await store.complete(wid, [AttemptResult(
            ids["extract"], 1, Outcome.SUCCEEDED, exit_code=0, duration=0.1, value='{"rows": 3}')], POLICY)
        assert answers[0].state is JobState.SUCCEEDED
        # The end and the release are one commit: its changes wake the workers waiting for the dependent.
        assert [(c.job_id, c.state) for c in changes if c.unblocked] == [(ids["transform"], "queued")]
        lease, _ = await _run(store, wid, ids["transform"], value='[1, "two"]')
        assert json.loads(lease.inputs) == {"extract": {"state": "succeeded", "exit_code": 0, "value": {"rows": 3}}}
        events = await store.events(ids["transform"])
        assert [(e.from_state, e.to_state, e.reason) for e in events[:2]] == [
            (None, JobState.BLOCKED, "submitted"), (JobState.BLOCKED, JobState.QUEUED, "dependencies met")]
        rec = await store.get_job(ids["transform"])
        assert rec.attempts[-1].value == '[1, "two"]'
        assert [(d.job_id, d.on, d.met, d.ref, d.state) for d in rec.dependencies] == [
            (ids["extract"], "success", True, "extract", JobState.SUCCEEDED)]
        assert rec.workflow == ids["extract"]
        lease, _ = await _run(store, wid, ids["load"])
        assert json.loads(lease.inputs) == {"transform": {"state": "succeeded", "exit_code": 0, "value": [1, "two"]}}
        wf, nodes = await store.workflow(ids["load"])
        assert wf == ids["extract"]
        assert [(n.ref, n.job.state, [d.job_id for d in n.dependencies]) for n in nodes] == [
            ("extract", JobState.SUCCEEDED, []), ("transform", JobState.SUCCEEDED, [ids["extract"]]),
            ("load", JobState.SUCCEEDED, [ids["transform"]])]

    run(tmp_path, body)


def test_a_fan_in_is_queued_at_its_last_dependency_and_why_names_the_ones_it_waits_on(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        ids = await _workflow(store, _job("a"), _job("b"), _job("c"), _job("join", "a", "b", "c"))
        for ref in ("a", "b"):
            await _run(store, wid, ids[ref])
            assert (await store.job_state(ids["join"]))[0] is JobState.BLOCKED
        facts = await store.why_facts(ids["join"])
        assert [(d.job_id, d.met) for d in facts.dependencies] == [(ids["a"], True), (ids["b"], True),
                                                                    (ids["c"], False)]
        await _run(store, wid, ids["c"])
        assert (await store.job_state(ids["join"]))[0] is JobState.QUEUED

    run(tmp_path, body)


def test_a_failed_dependency_skips_down_the_graph_and_failure_and_completion_dependents_run(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        ids = await _workflow(
            store, _job("build"), _job("test", "build"), _job("deploy", "test"),
            _job("alert", {"job": "build", "on": "failure"}), _job("report", {"job": "test", "on": "completion"}),
            _job("celebrate", {"job": "deploy", "on": "failure"}))
        _, changes = await _run(store, wid, ids["build"], Outcome.FAILED)
        assert await _states(store, ids) == {"build": "failed", "test": "skipped", "deploy": "skipped",
                                             "alert": "queued", "report": "queued", "celebrate": "skipped"}
        assert {c.job_id for c in changes if c.state == "skipped"} == {ids["test"], ids["deploy"], ids["celebrate"]}
        reasons = {ref: (await store.events(ids[ref]))[-1].reason for ref in ("test", "deploy", "celebrate")}
        assert reasons == {"test": f"dependency {ids['build']} ended failed, not succeeded",
                           "deploy": f"dependency {ids['test']} ended skipped, not succeeded",
                           "celebrate": f"dependency {ids['deploy']} ended skipped, not failed"}
        rec = await store.get_job(ids["deploy"], with_output=False)
        assert rec.job.finished_at is not None and rec.job.attempt == 0  # ended, never ran

    run(tmp_path, body)


def test_a_replayed_dependency_unskips_only_what_it_skipped_and_the_workflow_completes(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        ids = await _workflow(store, _job("fetch"), _job("parse", "fetch"), _job("other"),
                              _job("merge", "parse", "other"), _job("notify", {"job": "parse", "on": "completion"}),
                              _job("loner", "other"))
        await _run(store, wid, ids["fetch"])
        await _run(store, wid, ids["parse"], Outcome.FAILED)
        await _run(store, wid, ids["other"], Outcome.FAILED)
        assert await _states(store, ids) == {"fetch": "succeeded", "parse": "failed", "other": "failed",
                                             "merge": "skipped", "notify": "queued", "loner": "skipped"}
        # A skipped job is not replayed itself while what skipped it stands: the answer names the dependency.
        refused, _ = await store.replay([ids["merge"]], "me@host")
        assert isinstance(refused[ids["merge"]], Conflict)
        assert f"depends on job {ids['parse']}, which ended failed" in str(refused[ids["merge"]])
        # parse replayed: merge still waits on other, which failed too; nothing that other skipped moves.
        refused, changes = await store.replay([ids["parse"]], "me@host")
        assert refused == {}
        assert await _states(store, ids) == {"fetch": "succeeded", "parse": "queued", "other": "failed",
                                             "merge": "skipped", "notify": "queued", "loner": "skipped"}
        refused, changes = await store.replay([ids["other"]], "me@host")
        assert await _states(store, ids) == {"fetch": "succeeded", "parse": "queued", "other": "queued",
                                             "merge": "blocked", "notify": "queued", "loner": "blocked"}
        assert {c.job_id for c in changes if c.unblocked} == {ids["merge"], ids["loner"]}
        assert (await store.events(ids["merge"]))[-1].reason == f"dependency replayed: {ids['other']}"
        assert (await store.get_job(ids["merge"], with_output=False)).job.finished_at is None
        await _run(store, wid, ids["parse"])
        assert (await store.job_state(ids["merge"]))[0] is JobState.BLOCKED
        await _run(store, wid, ids["other"])
        # notify has been queued since parse first ended; merge and loner are queued now.
        leases, _ = await store.claim(wid, ["default"], 10, TTL)
        assert sorted(x.job_id for x in leases) == sorted([ids["merge"], ids["notify"], ids["loner"]])
        await store.complete(wid, [AttemptResult(x.job_id, x.attempt, Outcome.SUCCEEDED, exit_code=0)
                                   for x in leases], POLICY)
        assert set((await _states(store, ids)).values()) == {"succeeded"}

    run(tmp_path, body)


def test_a_replayed_dependency_makes_its_blocked_dependents_wait_for_its_new_end(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store, queues=("default", "slow"))
        ids = await _workflow(store, _job("flaky"), _job("slow", queue="slow"),
                              _job("cleanup", {"job": "flaky", "on": "failure"}, "slow"))
        await _run(store, wid, ids["flaky"], Outcome.FAILED)  # cleanup's first dependency met; it waits on slow
        await store.replay([ids["flaky"]], "me@host")
        await _run(store, wid, ids["slow"], queue="slow")
        assert (await store.job_state(ids["cleanup"]))[0] is JobState.BLOCKED  # flaky is undecided again
        await _run(store, wid, ids["flaky"])  # and now it succeeded: cleanup's "on failure" can never be met
        assert (await store.job_state(ids["cleanup"]))[0] is JobState.SKIPPED

    run(tmp_path, body)


def test_dependencies_on_jobs_that_ended_are_decided_at_the_submit(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        ok = (await store.submit([spec()], POLICY))[0].id
        bad = (await store.submit([spec(max_attempts=1)], POLICY))[0].id
        await _run(store, wid, ok)
        await _run(store, wid, bad, Outcome.FAILED)
        after_ok, after_bad, on_bad, later = await store.submit(
            [spec(depends_on=[ok]), spec(depends_on=[bad], ref="x"), spec(depends_on=[{"job": bad, "on": "failure"}]),
             spec(depends_on=["x"], delay=60)], POLICY)
        assert (after_ok.state, after_bad.state, on_bad.state, later.state) == (
            JobState.QUEUED, JobState.SKIPPED, JobState.QUEUED, JobState.SKIPPED)
        assert (await store.job_state(after_ok.id))[0] is JobState.QUEUED
        # A job added to a workflow by depending on a job of it (here: none) is in the workflow of its submit.
        assert (await store.get_job(after_ok.id)).workflow == after_ok.id
        # A dependency met whose job is due later: scheduled, then queued by the sweep at its time.
        (timed,) = await store.submit([spec(depends_on=[ok], delay=30)], POLICY)
        assert timed.state is JobState.SCHEDULED
        clock.advance(31)
        await store.sweep(60.0, POLICY)
        assert (await store.job_state(timed.id))[0] is JobState.QUEUED

    run(tmp_path, body)


def test_cancelling_a_blocked_job_skips_its_dependents_and_a_cancelled_dependency_skips_them(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        ids = await _workflow(store, _job("a"), _job("b", "a"), _job("c", "b"),
                              _job("d", {"job": "b", "on": "completion"}))
        rec, changes = await store.cancel(ids["b"])
        assert rec.job.state is JobState.CANCELLED
        assert await _states(store, ids) == {"a": "queued", "b": "cancelled", "c": "skipped", "d": "queued"}
        # Replaying the cancelled blocked job: it waits on a again, and c waits on it; d has gone its way.
        await store.replay([ids["b"]], "me@host")
        assert await _states(store, ids) == {"a": "queued", "b": "blocked", "c": "blocked", "d": "queued"}

    run(tmp_path, body)


@pytest.mark.parametrize("jobs, error, field, words", [
    ([{"ref": "a", "depends_on": ["b"]}, {"ref": "b", "depends_on": ["a"]}], Conflict, "jobs[0].depends_on[0]",
     "cycle: a -> b -> a"),
    ([{"ref": "a", "depends_on": ["a"]}], Conflict, "jobs[0].depends_on[0]", "depends on itself"),
    ([{"ref": "a"}, {"depends_on": ["nope"]}], NotFound, "jobs[1].depends_on[0]", "no job of this batch has ref 'nope'"),
    ([{"ref": "a"}, {"ref": "a"}], Conflict, "jobs[1].ref", "ref 'a' is jobs[0]'s already"),
    ([{"ref": "a"}, {"depends_on": ["a", 999999]}], NotFound, "jobs[1].depends_on[1]", "no job 999999"),
])
def test_a_cycle_an_unknown_ref_or_id_or_a_ref_twice_is_refused_naming_it_and_nothing_is_submitted(
        run: Run, tmp_path: Path, jobs: list[dict[str, Any]], error: type[Exception], field: str, words: str) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        with pytest.raises(error) as e:
            await store.submit([spec(**j) for j in jobs], POLICY)
        assert e.value.field == field
        assert words in str(e.value)
        assert await store.count_by_state() == {}

    run(tmp_path, body)


def test_a_fan_out_and_fan_in_of_a_thousand_ends_with_none_started_before_its_dependency(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        wid = await worker(store)
        jobs = [_job("root"), *(_job(f"leg{i}", "root") for i in range(1000)),
                _job("join", *(f"leg{i}" for i in range(1000)))]
        ids = await _workflow(store, *jobs)
        started: dict[int, int] = {}
        ended: dict[int, int] = {}
        step = 0
        while len(ended) < len(ids):
            leases, _ = await store.claim(wid, ["default"], 100, TTL)
            assert leases, "nothing to be had with jobs left"
            for x in leases:
                started[x.job_id] = step
            step += 1
            await store.complete(wid, [AttemptResult(x.job_id, x.attempt, Outcome.SUCCEEDED, exit_code=0)
                                       for x in leases], POLICY)
            for x in leases:
                ended[x.job_id] = step
        legs = [ids[f"leg{i}"] for i in range(1000)]
        assert all(started[leg] >= ended[ids["root"]] for leg in legs)
        assert started[ids["join"]] >= max(ended[leg] for leg in legs)

    run(tmp_path, body)
