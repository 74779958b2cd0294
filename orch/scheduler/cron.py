"""The cron runner: the scheduler holding the reaper's role fires the schedules' ticks as they fall.

It sleeps until the soonest next tick (read from the store, so a schedule another replica made is seen within
POLL seconds; one made here wakes it at once), then, for each schedule due, plans its ticks up to now
(core.cron.plan: those within the catch-up window fire, older ones are missed and counted, never fired in a
burst), applies the overlap policy against the schedule's last job, and submits each tick's job with the
idempotency key ``schedule:NAME:TIME``: a tick fired twice (a scheduler killed between the submit and the
bookkeeping, a leadership handed over) is one job. Then it records what the ticks did, only if nobody else did
meanwhile (``Store.schedule_ticked`` moves ``last_tick`` on from the value it read).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any, Mapping

from orch.core import cron
from orch.core.cron import TickAction, iso_second, on_tick
from orch.core.errors import Conflict, IdempotencyKeyReused, NotFound, OrchError
from orch.core.records import ScheduleInfo
from orch.core.spec import parse_spec
from orch.core.states import JobState

log = logging.getLogger("orch.cron")

POLL = 1.0  # seconds between looks at the store when nothing is due sooner (another replica's new schedule)
DUE_BATCH = 500  # schedules taken per pass


class CronRunner:
    """Fires due ticks while ``api.leading``. ``api`` lends the store, the defaults, the spec check and metrics."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.store = api.store
        self.wake = asyncio.Event()
        self.failures = 0

    def poke(self) -> None:
        """A schedule changed here: look again now."""
        self.wake.set()

    async def run(self) -> None:
        while True:
            try:
                delay = await self._delay()
            except Exception as e:  # the store is away: look again later
                self._failed("could not read the schedules", e)
                delay = POLL
            if delay > 0:
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), delay)
                self.wake.clear()
                continue
            if not self.api.leading:
                await asyncio.sleep(POLL)
                continue
            try:
                await self.fire_due(self.store.clock())
                self.failures = 0
            except Exception as e:
                self._failed("firing schedules failed", e)
                await asyncio.sleep(POLL)

    def _failed(self, what: str, e: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 60 == 0:
            log.warning("cron: %s (%s); trying again", what, e)

    async def _delay(self) -> float:
        nxt = await self.store.next_schedule_at()
        if nxt is None:
            return POLL
        return min(POLL, max(0.0, nxt - self.store.clock()))

    async def fire_due(self, now: float) -> int:
        """Fire every due schedule's ticks up to ``now``; how many jobs were submitted."""
        total = 0
        while True:
            due = await self.store.due_schedules(now, DUE_BATCH)
            for rec in due:
                total += await self.tick(rec, now)
            if len(due) < DUE_BATCH:
                return total

    async def tick(self, rec: ScheduleInfo, now: float) -> int:
        s = rec.schedule
        p = cron.plan(s, rec.last_tick, now)
        fired = skipped = 0
        last_job, state = rec.last_job, rec.last_job_state
        for t in p.fire:
            going = state is not None and not state.terminal
            action = on_tick(s.overlap, going, state is JobState.BLOCKED)
            if action is TickAction.SKIP:
                skipped += 1
                log.info("schedule %s: tick %s skipped: job %s is still %s (overlap %s)", s.name, iso_second(t),
                         last_job, state, s.overlap)
                continue
            if action is TickAction.CANCEL_AND_FIRE and last_job is not None:
                with suppress(Conflict, NotFound):
                    await self.store.cancel(last_job)
            after = last_job if action is TickAction.FIRE_AFTER else None
            try:
                job = await self.submit(s.name, s.job, t, now, after=after)
            except IdempotencyKeyReused:  # fired before, with the schedule's job as it was then
                log.info("schedule %s: tick %s was fired already", s.name, iso_second(t))
                continue
            except OrchError as e:  # its job refused now (a rate limit deleted since, ...): said, counted skipped
                skipped += 1
                log.warning("schedule %s: tick %s could not submit its job: %s", s.name, iso_second(t), e)
                continue
            last_job, state = job.id, job.state
            if not job.replayed:
                fired += 1
                log.info("schedule %s: tick %s fired job %d", s.name, iso_second(t), job.id)
        if p.missed:
            log.warning("schedule %s missed %s%d tick%s from %s (older than its catch-up window of %gs: the "
                        "scheduler was down or behind); they are not run", s.name, "more than " if p.more_missed
                        else "", p.missed, "" if p.missed == 1 else "s", iso_second(p.first_missed or now),
                        s.catchup)
        moved = await self.store.schedule_ticked(
            s.name, rec.last_tick, now, p.next_at, last_job if last_job != rec.last_job else None, fired, skipped,
            p.missed, p.first_missed if p.missed else None)
        if moved:
            m = self.api.metrics.schedule_ticks
            for outcome, n in (("fired", fired), ("skipped", skipped), ("missed", p.missed)):
                if n:
                    m.labels(outcome).inc(n)
        return fired

    async def submit(self, name: str, job: Mapping[str, Any], tick: float, now: float, *, after: int | None = None,
                     manual: bool = False) -> Any:
        """Submit the job of ``name``'s tick at ``tick`` (a manual run: now, without a key)."""
        spec = parse_spec(cron.tick_spec(name, job, tick, now, manual=manual, after=after))
        (got,) = await self.store.submit([spec], self.api.defaults, [self.api.stored(spec, "")])
        return got
