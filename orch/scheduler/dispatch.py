"""Wake-ups: who is waiting for what, and waking them when it happens. No polling.

A waiter takes its event *before* it reads the state it waits on; a writer
notifies *after* its change has committed. So no change can slip between the
read and the wait.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from contextlib import suppress
from typing import Iterable, Sequence

from orch.core.states import JobState
from orch.store.base import Change, Hint


class Hub:
    def __init__(self) -> None:
        self._jobs: dict[int, asyncio.Event] = {}
        # The reaper's timer (see ``due``): set when a job is due sooner than the reaper is going to look.
        self.retry_scheduled = asyncio.Event()
        self.reaper_at = -math.inf  # the wall time the reaper sleeps until; -inf while it sweeps (or not started)
        self.due_seen = math.inf  # the earliest due time told while it swept
        # Lease long-polls waiting for work, per queue, oldest first. A newly queued
        # job wakes one waiter, not all of them: 500 idle workers must not all run a
        # claim for every submit.
        self._waiters: dict[str, deque[asyncio.Future[str | None]]] = {}
        self._by_worker: dict[str, asyncio.Future[str | None]] = {}
        # The runners of each waiting long-poll's worker: a job wakes one waiter, and also one of each other set
        # of runners that waits on its queue (the job's runner is not known here; a worker without it takes
        # nothing and must not swallow the wake). One set among all workers, the usual case, costs nothing.
        self._kinds: dict[asyncio.Future[str | None], frozenset[str]] = {}
        self.kinds_seen: set[frozenset[str]] = set()
        self.stopping: set[str] = set()  # workers draining: their long-polls end now
        # Waiters on any of many jobs (POST /v1/jobs/wait): job id -> the futures of the waits naming it.
        self._many: dict[int, list[asyncio.Future[None]]] = {}
        # The dashboard's live pages: a count of the commits told (here or by another scheduler) and of worker
        # comings and goings, and one event for all its streams, set and replaced at each.
        self.version = 0
        self._watch: asyncio.Event | None = None

    # Each key has one event until something happens to it; then the event is
    # set and dropped, and the next waiter gets a fresh one.
    @staticmethod
    def _event(table: dict, key: object) -> asyncio.Event:
        ev = table.get(key)
        if ev is None:
            ev = table[key] = asyncio.Event()
        return ev

    @staticmethod
    def _fire(table: dict, key: object) -> None:
        ev = table.pop(key, None)
        if ev is not None:
            ev.set()

    def watch(self) -> asyncio.Event:
        """An event set at the next change of anything (see ``version``)."""
        if self._watch is None:
            self._watch = asyncio.Event()
        return self._watch

    def touched(self) -> None:
        """Something a dashboard shows changed: a commit, a worker registered or lost."""
        self.version += 1
        ev = self._watch
        if ev is not None:
            self._watch = None
            ev.set()

    def job_event(self, job_id: int) -> asyncio.Event:
        return self._event(self._jobs, job_id)

    def job_touched(self, job_id: int) -> None:
        """New output or a state change of one job."""
        self._fire(self._jobs, job_id)

    def jobs_waiter(self, job_ids: Iterable[int]) -> asyncio.Future[None]:
        """One future, set at the next state change of any of ``job_ids`` (release it with release_jobs)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for job_id in job_ids:
            self._many.setdefault(job_id, []).append(fut)
        return fut

    def release_jobs(self, fut: asyncio.Future[None], job_ids: Iterable[int]) -> None:
        for job_id in job_ids:
            futs = self._many.get(job_id)
            if futs is not None:
                with suppress(ValueError):
                    futs.remove(fut)
                if not futs:
                    del self._many[job_id]
        if not fut.done():
            fut.cancel()

    def wake_worker(self, worker_id: str) -> None:
        """The worker is draining: end its lease long-poll now."""
        self.stopping.add(worker_id)
        fut = self._by_worker.get(worker_id)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def work_waiter(self, queues: Sequence[str], worker_id: str,
                    runners: frozenset[str] = frozenset({"exec"})) -> asyncio.Future[str | None]:
        """A future set to a queue's name when a job may be waiting there for this long-poll."""
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._kinds[fut] = runners
        self.kinds_seen.add(runners)
        for q in queues:
            self._waiters.setdefault(q, deque()).append(fut)
        self._by_worker[worker_id] = fut
        return fut

    def release(self, fut: asyncio.Future[str | None], queues: Sequence[str], worker_id: str) -> None:
        """The long-poll is done with ``fut`` (the caller passes on a wake it will not use)."""
        for q in queues:
            dq = self._waiters.get(q)
            if dq is not None:
                try:
                    dq.remove(fut)
                except ValueError:
                    pass
                if not dq:
                    del self._waiters[q]
        if self._by_worker.get(worker_id) is fut:
            del self._by_worker[worker_id]
        self._kinds.pop(fut, None)
        if not fut.done():
            fut.cancel()

    def wake_queue(self, queue: str, n: int) -> None:
        dq = self._waiters.get(queue)
        woken: set[frozenset[str]] = set()
        while n > 0 and dq:
            fut = dq.popleft()
            if not fut.done():
                fut.set_result(queue)
                n -= 1
                woken.add(self._kinds.get(fut, frozenset()))
        if dq and len(self.kinds_seen) > 1:  # workers with other runners wait here too: one of each kind
            for fut in list(dq):
                kind = self._kinds.get(fut, frozenset())
                if kind not in woken and not fut.done():
                    dq.remove(fut)
                    fut.set_result(queue)
                    woken.add(kind)

    def waited_queues(self) -> list[str]:
        """Queues a lease long-poll waits on now."""
        return [q for q, dq in self._waiters.items() if any(not f.done() for f in dq)]

    def poke_jobs(self) -> None:
        """Something may have happened to any job waited on (another scheduler's change, not heard): every
        wait, follow and wait-for-many reads again."""
        for ev in self._jobs.values():
            ev.set()
        self._jobs.clear()
        for futs in self._many.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    def waiting(self, queue: str) -> int:
        """Lease long-polls now waiting on ``queue`` (for tests and metrics)."""
        return sum(1 for f in self._waiters.get(queue, ()) if not f.done())

    def due(self, at: float | None) -> None:
        """A job is due at ``at`` (wall clock; None: a time not known): a retry's backoff or a scheduled job's
        run_at. The reaper is woken if it sleeps until later than that; while it sweeps, the time is kept for
        the timer it sets next (its sweep read the earliest due time already, maybe before this commit)."""
        if at is None:
            self.retry_scheduled.set()
            return
        if at < self.due_seen:
            self.due_seen = at
        if at < self.reaper_at:
            self.retry_scheduled.set()

    def sweeping(self) -> None:
        """The reaper starts a pass: whatever comes due from now on is kept for its next timer (``armed``)."""
        self.retry_scheduled.clear()
        self.reaper_at = -math.inf
        self.due_seen = math.inf

    def armed(self, until: float) -> float:
        """The reaper sleeps until ``until`` (wall clock), or sooner for a job told due meanwhile: what it sets."""
        self.reaper_at = min(until, self.due_seen)
        return self.reaper_at

    def heard(self, hint: Hint) -> None:
        """Another scheduler's commits (a hint): wake what waits on them here."""
        many, jobs = self._many, self._jobs
        if jobs or many:
            for job_id in hint.job_ids:
                if jobs:
                    self._fire(jobs, job_id)
                if many and job_id in many:
                    for fut in many.pop(job_id):
                        if not fut.done():
                            fut.set_result(None)
        if hint.retrying:
            self.due(hint.due)
        for q, n in hint.queued.items():
            self.wake_queue(q, n)
        self.touched()

    def committed(self, changes: Iterable[Change]) -> None:
        queued: dict[str, int] = {}
        many, jobs = self._many, self._jobs
        for c in changes:
            if jobs:  # someone waits on a job (a wait, a follow): most changes have no one
                self._fire(jobs, c.job_id)
            if many and c.job_id in many:
                for fut in many.pop(c.job_id):
                    if not fut.done():
                        fut.set_result(None)
            if c.state == JobState.QUEUED:
                queued[c.queue] = queued.get(c.queue, 0) + 1
            elif c.state == JobState.RETRYING or c.state == JobState.SCHEDULED:
                self.due(c.due)
        for q, n in queued.items():
            self.wake_queue(q, n)
        self.touched()


async def wait_any(events: Sequence[asyncio.Event], timeout: float) -> bool:
    """Wait until one of ``events`` is set or ``timeout`` passes; True if one was set."""
    if timeout <= 0:
        return any(e.is_set() for e in events)
    if len(events) == 1:
        try:
            await asyncio.wait_for(events[0].wait(), timeout)
            return True
        except TimeoutError:
            return False
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for t in tasks:
            t.cancel()
