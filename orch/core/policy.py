"""The scheduling policy: which queued jobs a lease may take, and in which order.

Today: the jobs of the worker's queues, highest priority first, then oldest
(lowest id) first. Limits, fairness and runner capabilities come here next.
``pick`` is the policy over plain data; a store's claim query is its fast
path and is tested against it (tests/contract/test_store_contract.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from orch.core.states import JobState


@dataclass(frozen=True, slots=True)
class Candidate:
    """A job as the policy sees it."""

    id: int
    queue: str
    priority: int
    state: JobState = JobState.QUEUED


@dataclass(frozen=True, slots=True)
class Ask:
    """What a lease request asks for: up to ``limit`` jobs from ``queues``."""

    queues: Sequence[str]
    limit: int


def dispatch_order(priority: int, job_id: int) -> tuple[int, int]:
    """The sort key of dispatch: higher priority first, then the older job."""
    return (-priority, job_id)


def eligible(c: Candidate, ask: Ask) -> bool:
    """Whether a lease asking ``ask`` may take ``c`` at all."""
    return c.state is JobState.QUEUED and c.queue in ask.queues


def pick(candidates: Iterable[Candidate], ask: Ask) -> list[int]:
    """The ids a lease takes, in dispatch order."""
    ok = [c for c in candidates if eligible(c, ask)]
    ok.sort(key=lambda c: dispatch_order(c.priority, c.id))
    return [c.id for c in ok[: max(0, ask.limit)]]
