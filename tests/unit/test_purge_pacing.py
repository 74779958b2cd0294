"""Unit tests of retention's pacing: a purge batch's size follows from how long the last one held the writer."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from orch.core.states import JobState
from orch.scheduler.retention import FIRST, LARGEST, SMALLEST, TARGET, next_batch, purge


def test_a_batch_grows_while_batches_are_quick_and_shrinks_when_one_is_slow() -> None:
    assert next_batch(100, TARGET) == 100  # on target: the same
    assert next_batch(100, TARGET / 4) == 200  # quick: at most double at once
    assert next_batch(100, TARGET * 4) == 50  # slow: at most half at once
    assert next_batch(100, TARGET * 1.25) == 80
    assert next_batch(100, 0.0) == 200  # too quick to time
    assert next_batch(LARGEST, TARGET / 10) == LARGEST and next_batch(SMALLEST, 10.0) == SMALLEST


class FakeStore:
    """A store whose batches take ``per_job`` seconds a job, holding ``left`` ended jobs."""

    def __init__(self, left: int, per_job: float) -> None:
        self.left, self.per_job, self.sizes = left, per_job, []

    async def purge(self, before: float, states: Sequence[JobState], limit: int) -> tuple[int, float]:
        self.sizes.append(limit)
        n = min(limit, self.left)
        self.left -= n
        return n, n * self.per_job


def test_a_purge_goes_until_a_batch_is_short_and_settles_near_the_target() -> None:
    store: Any = FakeStore(100_000, TARGET / 400)  # 400 jobs a batch is on target
    assert asyncio.run(purge(store, 0.0)) == 100_000 and store.left == 0
    assert store.sizes[0] == FIRST
    assert 350 <= store.sizes[-2] <= 450, store.sizes  # settled near 400
    assert all(s <= LARGEST for s in store.sizes)
