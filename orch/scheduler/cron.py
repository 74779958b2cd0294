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
from dataclasses import dataclass
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
SUBMIT_BATCH = 500  # ticks' jobs submitted in one batch


@dataclass
class _Book:
    """What one pass does with one schedule's ticks."""

    rec: ScheduleInfo
    plan: cron.Plan
    fired: int = 0
    skipped: int = 0
    unsubmitted: bool = False  # a tick's job of this pass waits in the batch, without an id yet
    last_job: int | None = None
    state: JobState | None = None

    def __post_init__(self) -> None:
        self.last_job, self.state = self.rec.last_job, self.rec.last_job_state


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
            total += await self.fire(due, now)
            if len(due) < DUE_BATCH:
                return total

    async def tick(self, rec: ScheduleInfo, now: float) -> int:
        """Fire one schedule's due ticks (as fire_due does)."""
        return await self.fire([rec], now)

    async def fire(self, due: list[ScheduleInfo], now: float) -> int:
        """Plan each schedule's ticks, apply its overlap policy, submit the jobs of them all in one batch (a
        thousand schedules due at one minute: one transaction, not a thousand), then record each schedule's ticks
        (at once: the store commits them together)."""
        books = []
        pending: list[tuple[_Book, Any]] = []  # (the schedule's book, the spec of a tick to submit)
        for rec in due:
            s = rec.schedule
            p = cron.plan(s, rec.last_tick, now)
            book = _Book(rec, p)
            books.append(book)
            for t in p.fire:
                going = book.state is not None and not book.state.terminal
                action = on_tick(s.overlap, going, book.state is JobState.BLOCKED)
                if action is TickAction.SKIP:
                    book.skipped += 1
                    log.info("schedule %s: tick %s skipped: job %s is still %s (overlap %s)", s.name, iso_second(t),
                             book.last_job, book.state, s.overlap)
                    continue
                if action in (TickAction.CANCEL_AND_FIRE, TickAction.FIRE_AFTER) and book.unsubmitted:
                    await self._submit_all(pending)  # the previous job must have an id first
                    pending = []
                if action is TickAction.CANCEL_AND_FIRE and book.last_job is not None:
                    with suppress(Conflict, NotFound):
                        await self.store.cancel(book.last_job)
                after = book.last_job if action is TickAction.FIRE_AFTER else None
                try:
                    spec = parse_spec(cron.tick_spec(s.name, s.job, t, now, after=after))
                except OrchError as e:
                    book.skipped += 1
                    log.warning("schedule %s: tick %s could not make its job: %s", s.name, iso_second(t), e)
                    continue
                pending.append((book, spec))
                book.unsubmitted = True
                book.state = JobState.QUEUED  # as good as: the next tick of the same pass sees it going
        await self._submit_all(pending)
        moved = await asyncio.gather(*(self.store.schedule_ticked(
            b.rec.schedule.name, b.rec.last_tick, now, b.plan.next_at,
            b.last_job if b.last_job != b.rec.last_job else None, b.fired, b.skipped, b.plan.missed,
            b.plan.first_missed if b.plan.missed else None) for b in books))
        m = self.api.metrics.schedule_ticks
        for b, ok in zip(books, moved, strict=True):
            p = b.plan
            if p.missed:
                log.warning("schedule %s missed %s%d tick%s from %s (older than its catch-up window of %gs: the "
                            "scheduler was down or behind); they are not run", b.rec.schedule.name,
                            "more than " if p.more_missed else "", p.missed, "" if p.missed == 1 else "s",
                            iso_second(p.first_missed or now), b.rec.schedule.catchup)
            if ok:
                for outcome, n in (("fired", b.fired), ("skipped", b.skipped), ("missed", p.missed)):
                    if n:
                        m.labels(outcome).inc(n)
        return sum(b.fired for b in books)

    async def _submit_all(self, pending: list[tuple[_Book, Any]]) -> None:
        """Submit the ticks' jobs in batches; a batch the store refuses (a job of it refused, a key fired already
        with another spec) goes again a job at a time, so that one schedule's trouble is its own."""
        for at in range(0, len(pending), SUBMIT_BATCH):
            part = pending[at:at + SUBMIT_BATCH]
            specs = [spec for _, spec in part]
            try:
                jobs = await self.store.submit(specs, self.api.defaults, [self.api.stored(x, "") for x in specs])
            except OrchError:
                jobs = []
                for book, spec in part:
                    try:
                        (job,) = await self.store.submit([spec], self.api.defaults, [self.api.stored(spec, "")])
                    except IdempotencyKeyReused:  # fired before, with the schedule's job as it was then
                        log.info("schedule %s: a tick was fired already", book.rec.schedule.name)
                        job = None
                    except OrchError as e:
                        book.skipped += 1
                        log.warning("schedule %s: a tick could not submit its job: %s", book.rec.schedule.name, e)
                        job = None
                    jobs.append(job)
            for (book, spec), job in zip(part, jobs, strict=True):
                book.unsubmitted = False
                if job is None:
                    continue
                book.last_job, book.state = job.id, job.state
                if not job.replayed:
                    book.fired += 1
                    log.info("schedule %s: tick %s fired job %d", book.rec.schedule.name,
                             spec.env.get("ORCH_SCHEDULED_FOR"), job.id)

    async def submit(self, name: str, job: Mapping[str, Any], tick: float, now: float, *, after: int | None = None,
                     manual: bool = False) -> Any:
        """Submit the job of ``name``'s tick at ``tick`` (a manual run: now, without a key)."""
        spec = parse_spec(cron.tick_spec(name, job, tick, now, manual=manual, after=after))
        (got,) = await self.store.submit([spec], self.api.defaults, [self.api.stored(spec, "")])
        return got
