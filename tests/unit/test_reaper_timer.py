"""Unit tests of the reaper's timer: it sleeps until the next due retry or scheduled job (or its tick), is woken by
a job due sooner (Hub.due: a commit here, or another scheduler's hint) and not by one due later, and keeps a due
time told while it swept (the sweep may have read the earliest one before that commit)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, Callable

from helpers import until
from orch.config import load_settings
from orch.core.records import Leadership
from orch.scheduler.app import reaper
from orch.scheduler.dispatch import Hub
from orch.store.base import Change, Hint, Sweep


class TimedStore:
    """A store whose sweep queues whatever is due in ``due`` (wall times) and says when the next one is."""

    shared = False

    def __init__(self) -> None:
        self.due: list[float] = []
        self.sweeps: list[float] = []
        self.during: Callable[[], None] | None = None  # runs inside the next sweep, as a commit would meanwhile

    def clock(self) -> float:
        return time.time()

    async def lead(self, holder: str, ttl: float) -> Leadership:
        return Leadership(True)

    async def recover(self, grace: float, ttl: float) -> None:
        pass

    async def sweep(self, ttl: float, defaults: Any) -> Sweep:
        now = self.clock()
        self.sweeps.append(now)
        self.due = [t for t in self.due if t > now]
        nxt = min(self.due, default=None)  # read before what commits meanwhile
        if self.during is not None:
            self.during()
            self.during = None
        await asyncio.sleep(0)
        return Sweep(next_due=nxt)


def run_reaper(body: Callable[[TimedStore, Hub], Any]) -> None:
    settings = load_settings(None, {"scheduler.heartbeat_interval": 2.0}, environ={})  # a tick of 1 s
    store, hub = TimedStore(), Hub()
    api = SimpleNamespace(guard=None, metrics=SimpleNamespace(leader=SimpleNamespace(set=lambda v: None)))

    async def main() -> None:
        task = asyncio.create_task(reaper(store, hub, api, settings, "me"))  # type: ignore[arg-type]
        try:
            await until(lambda: store.sweeps, 5, "the first sweep")
            await body(store, hub)
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    asyncio.run(main())


def test_the_reaper_sleeps_until_the_next_due_job_not_its_tick() -> None:
    async def body(store: TimedStore, hub: Hub) -> None:
        due = time.time() + 0.3
        store.due.append(due)
        hub.committed([Change(1, "scheduled", "q", 0, due=due)])
        await until(lambda: any(t >= due for t in store.sweeps), 2, "a sweep at the due time")
        late = min(t for t in store.sweeps if t >= due) - due
        assert late < 0.1, f"swept {late * 1000:.0f} ms after the job was due"

    run_reaper(body)


def test_a_job_due_later_than_the_timer_does_not_wake_the_reaper() -> None:
    async def body(store: TimedStore, hub: Hub) -> None:
        soon = time.time() + 0.4
        store.due.append(soon)
        hub.committed([Change(1, "scheduled", "q", 0, due=soon)])
        await until(lambda: hub.reaper_at == soon, 2, "the timer set for the job")
        before = len(store.sweeps)
        store.due.append(soon + 30)
        hub.committed([Change(2, "scheduled", "q", 0, due=soon + 30)])  # later: no pass for it now
        hub.heard(Hint({}, [3], True, soon + 60))
        assert not hub.retry_scheduled.is_set() and hub.reaper_at == soon  # nothing wakes the reaper for them
        assert len(store.sweeps) == before
        hub.heard(Hint({}, [4], True, None))  # a due time not known: look at once
        await until(lambda: len(store.sweeps) > before, 1, "a pass for a due time not known")

    run_reaper(body)


def test_a_job_told_due_while_the_reaper_swept_is_not_missed() -> None:
    """The race a timer must not lose: a submit commits while the sweep runs, after it read the next due time.
    Its change sets no alarm (the reaper is not asleep), but the timer the reaper then sets counts it."""

    async def body(store: TimedStore, hub: Hub) -> None:
        # A pass is woken (a job due at once), and while it sweeps a job due in 0.2 s commits.
        due = time.time() + 0.2

        def commit() -> None:
            store.due.append(due)
            hub.committed([Change(9, "scheduled", "q", 0, due=due)])

        store.during = commit
        hub.due(None)
        await until(lambda: store.during is None, 2, "the sweep that saw the commit")
        await until(lambda: any(t >= due for t in store.sweeps), 2, "a sweep at the due time")
        late = min(t for t in store.sweeps if t >= due) - due
        assert late < 0.1, f"swept {late * 1000:.0f} ms after the job was due (the tick is 1 s)"

    run_reaper(body)
