"""Retention: finished jobs, with their attempts, output and events, are purged once they are older than
``retention.finished_jobs`` (and on demand: ``orch purge``), a small batch at a time.

A batch is one write of the store, so everything else that writes (submits, claims, reports) goes between two
batches: on SQLite, whose one writer runs the batch, a purge must never hold it long. The size of the next batch
follows from how long the last one took (``next_batch``): about ``TARGET`` seconds each, whatever the machine,
the disk or the rows (a job with a megabyte of output costs more to delete than one without).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from orch.core.states import TERMINAL, JobState

log = logging.getLogger("orch.scheduler")

TARGET = 0.004  # seconds a purge batch may hold the writer, about (submits wait at most that long behind it)
FIRST, SMALLEST, LARGEST = 50, 10, 2000  # jobs in a batch: the first one, and the bounds of the rest


def next_batch(size: int, took: float, target: float = TARGET) -> int:
    """The next batch's size: scaled by how far the last one's time was from ``target``, never more than double
    or less than half of it at once (one slow batch, a checkpoint's, does not throw the size off), in bounds."""
    if took <= 0:
        return min(LARGEST, size * 2)
    scaled = size * min(2.0, max(0.5, target / took))
    return max(SMALLEST, min(LARGEST, int(scaled)))


async def purge(store: Any, before: float, states: Sequence[JobState] = tuple(TERMINAL)) -> int:
    """Purge every job of ``states`` that ended before ``before``, batch by batch; how many were purged."""
    size, total = FIRST, 0
    while True:
        n, took = await store.purge(before, states, size)
        total += n
        if n < size:
            return total
        size = next_batch(size, took)
        await asyncio.sleep(0)  # what queued behind the batch goes first


async def keep_purging(store: Any, api: Any, keep: float, interval: float) -> None:
    """The scheduler running the reaper (every scheduler, alone on its database) purges what is older than
    ``keep`` seconds, every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        if not api.leading:
            continue
        try:
            n = await purge(store, store.clock() - keep)
        except Exception as e:  # the store is away, the disk full: the next pass tries again
            log.warning("retention: purging finished jobs failed: %s", e)
            continue
        if n:
            api.metrics.purged.inc(n)
            log.info("retention: purged %d finished job%s that ended more than %gs ago", n, "" if n == 1 else "s",
                     keep)
