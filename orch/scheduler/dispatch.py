"""Wake-ups: who is waiting for what, and waking them when it happens. No polling.

A waiter takes its event *before* it reads the state it waits on; a writer
notifies *after* its change has committed. So no change can slip between the
read and the wait.
"""

from __future__ import annotations

import asyncio
from typing import Iterable, Sequence

from orch.store.base import Change


class Hub:
    def __init__(self) -> None:
        self._jobs: dict[int, asyncio.Event] = {}
        self._queues: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Event] = {}
        self.retry_scheduled = asyncio.Event()

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

    def job_event(self, job_id: int) -> asyncio.Event:
        return self._event(self._jobs, job_id)

    def work_events(self, queues: Sequence[str]) -> list[asyncio.Event]:
        return [self._event(self._queues, q) for q in queues]

    def worker_event(self, worker_id: str) -> asyncio.Event:
        return self._event(self._workers, worker_id)

    def job_touched(self, job_id: int) -> None:
        """New output or a state change of one job."""
        self._fire(self._jobs, job_id)

    def wake_worker(self, worker_id: str) -> None:
        self._fire(self._workers, worker_id)

    def committed(self, changes: Iterable[Change]) -> None:
        for c in changes:
            self._fire(self._jobs, c.job_id)
            if c.state == "queued":
                self._fire(self._queues, c.queue)
            elif c.state == "retrying":
                self.retry_scheduled.set()


async def wait_any(events: Sequence[asyncio.Event], timeout: float) -> bool:
    """Wait until one of ``events`` is set or ``timeout`` passes; True if one was set."""
    if timeout <= 0:
        return any(e.is_set() for e in events)
    if len(events) == 1:
        try:
            await asyncio.wait_for(events[0].wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for t in tasks:
            t.cancel()
