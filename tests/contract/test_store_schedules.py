"""Cron schedules on every backend: the store's schedule records, and the cron runner (orch/scheduler/cron.py)
firing ticks on a store with an injected clock: each tick once, across a runner that starts again from what
the store kept; missed ticks counted, never fired; the overlap policies."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from storekit import POLICY, TTL, FakeClock, Run, worker

from orch.core.cron import check_schedule, next_ticks
from orch.core.errors import Conflict, NotFound
from orch.core.spec import JobSpec, stored_spec
from orch.core.states import JobState, Outcome
from orch.metrics import SchedulerMetrics
from orch.scheduler.cron import CronRunner
from orch.store.base import AttemptResult, Store

MINUTE = 60.0


def _runner(store: Store) -> CronRunner:
    def stored(spec: JobSpec, prefix: str) -> tuple[dict[str, Any], str]:
        data = stored_spec(spec, POLICY)
        return data, json.dumps(data, separators=(",", ":"))

    return CronRunner(SimpleNamespace(store=store, defaults=POLICY, stored=stored, metrics=SchedulerMetrics(),
                                      leading=True))


async def _add(store: Store, clock: FakeClock, name: str, **body: Any) -> None:
    s = check_schedule(name, {"job": {"command": ["true"]}, **body})
    await store.save_schedule(s, create=True, last_tick=clock(), next_at=next_ticks(s.cron, s.tz, clock(), 1)[0])


async def _jobs(store: Store) -> list[Any]:
    jobs, _ = await store.list_jobs(limit=1000)
    return sorted(jobs, key=lambda j: j.id)


def test_a_schedule_is_made_once_changed_listed_and_deleted(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await _add(store, clock, "nightly", cron="30 2 * * *", tz="Europe/Berlin")
        with pytest.raises(Conflict):
            await _add(store, clock, "nightly", cron="* * * * *")
        (x,) = await store.schedules("nightly")
        assert (x.schedule.cron, x.schedule.tz, x.last_tick, x.fired) == ("30 2 * * *", "Europe/Berlin", clock(), 0)
        changed = check_schedule("nightly", {"paused": True}, partial=x.schedule)
        await store.save_schedule(changed, create=False, last_tick=None, next_at=None)
        (y,) = await store.schedules()
        assert y.schedule.paused and y.next_at is None and y.last_tick == x.last_tick
        assert await store.next_schedule_at() is None  # paused: nothing due
        with pytest.raises(NotFound):
            await store.save_schedule(check_schedule("ghost", {"cron": "* * * * *", "job": {"command": ["true"]}}),
                                      create=False, last_tick=None, next_at=None)
        assert await store.delete_schedule("nightly") is True
        assert await store.delete_schedule("nightly") is False
        with pytest.raises(NotFound):
            await store.schedules("nightly")

    run(tmp_path, body)


def test_each_tick_fires_one_job_even_when_a_runner_fires_it_again_from_where_the_store_stood(
        run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        clock.t = 1_800_000_000.0
        await _add(store, clock, "every-minute", cron="* * * * *", overlap="allow")
        cron = _runner(store)
        for _ in range(3):
            clock.advance(MINUTE)
            assert await cron.fire_due(clock()) == 1
        (before,) = await store.schedules("every-minute")
        # A runner that died after submitting a tick's job but before recording it: the next one fires it again
        # from the state the store kept, and the idempotency key makes it the same job.
        clock.advance(MINUTE)
        stale = before
        await cron.fire_due(clock())
        assert await cron.tick(stale, clock()) == 0  # fired already: no second job, no second record
        jobs = await _jobs(store)
        keys = [(await store.get_job(j.id, with_output=False)).spec["idempotency_key"] for j in jobs]
        assert len(jobs) == 4 and len(set(keys)) == 4
        env = (await store.get_job(jobs[0].id, with_output=False)).spec["env"]
        assert env == {"ORCH_SCHEDULE": "every-minute", "ORCH_SCHEDULED_FOR": "2027-01-15T08:01:00Z"}
        (after,) = await store.schedules("every-minute")
        assert (after.fired, after.last_job, after.next_at) == (4, jobs[-1].id, clock.t + MINUTE)
        assert await store.due_schedules(clock(), 10) == []
        assert await store.schedule_ticked("every-minute", before.last_tick, clock(), None, None, 9, 9, 9, None) is False

    run(tmp_path, body)


def test_after_downtime_old_ticks_are_missed_and_counted_and_the_window_fires(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        clock.t = 1_800_000_000.0
        await _add(store, clock, "reports", cron="*/10 * * * *", catchup=25 * MINUTE, overlap="allow")
        clock.advance(6 * 3600 + 5)  # six hours down
        cron = _runner(store)
        assert await cron.fire_due(clock()) == 3  # the ticks of the last 25 minutes, never the other 33
        (x,) = await store.schedules("reports")
        assert (x.fired, x.missed) == (3, 33)
        assert x.last_missed_at is not None and x.last_missed_at > 1_800_000_000.0
        assert cron.api.metrics.schedule_ticks.labels("missed")._value.get() == 33

    run(tmp_path, body)


def test_overlap_skip_cancel_running_and_queue_one_weigh_the_previous_job(run: Run, tmp_path: Path) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        clock.t = 1_800_000_000.0
        wid = await worker(store)
        await _add(store, clock, "skip", cron="* * * * *")
        await _add(store, clock, "cancel", cron="* * * * *", overlap="cancel_running", job={"command": ["true"],
                                                                                                 "queue": "c"})
        await _add(store, clock, "one", cron="* * * * *", overlap="queue_one", job={"command": ["true"], "queue": "q"})
        cron = _runner(store)
        clock.advance(MINUTE)
        await cron.fire_due(clock())
        leases, _ = await store.claim(wid, ["default"], 10, TTL)  # skip's first job runs on
        clock.advance(MINUTE)
        await cron.fire_due(clock())
        clock.advance(MINUTE)
        await cron.fire_due(clock())
        by = {x.schedule.name: x for x in await store.schedules()}
        assert (by["skip"].fired, by["skip"].skipped) == (1, 2)
        assert by["cancel"].fired == 3
        cancelled = [j for j in await _jobs(store) if j.queue == "c" and j.state is JobState.CANCELLED]
        assert len(cancelled) == 2  # each new tick cancelled the one before (queued: at once)
        q = [j for j in await _jobs(store) if j.queue == "q"]
        assert [j.state for j in q] == [JobState.QUEUED, JobState.BLOCKED]  # one waits, the third tick skipped
        assert (by["one"].fired, by["one"].skipped) == (2, 1)
        await store.complete(wid, [AttemptResult(leases[0].job_id, leases[0].attempt, Outcome.SUCCEEDED, 0)], POLICY)
        clock.advance(MINUTE)
        await cron.fire_due(clock())
        (x,) = await store.schedules("skip")
        assert (x.fired, x.skipped) == (2, 2)  # the previous one ended: this tick fires

    run(tmp_path, body)
