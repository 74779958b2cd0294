"""Concurrency limits by key: at most ``limit`` jobs naming a key run at once, across the cluster.

A job's spec may carry ``concurrency: {"key": "tenant-7", "limit": 2, "on_limit": "queue"}``. The stores keep
one invariant per key, in the database itself (triggers, so that every path that moves a job keeps it):

    running + queued-and-not-held  <=  limit

A keyed job that becomes queued while its key is full is *held*: still queued, but outside the index the claim
reads (``jobs_ready`` covers unheld queued jobs only), so a full key never costs a claim a row read and never
blocks its queue. When a job of the key stops taking a slot (it ends, goes to backoff, or its lease expires and
the reaper takes it back) the first held job of the key, in dispatch order, is let go. The claim itself is
unchanged: whatever it finds in ``jobs_ready`` may run.

``on_limit`` says what a submit does when the key is full: ``queue`` (the default) holds the new job until a
slot frees; ``skip_new`` ends the new job cancelled at once, saying so (it can be replayed); ``cancel_running``
makes room for the new job by cancelling the oldest jobs that hold or wait for the key's slots (queued ones end
now, running ones are told at their worker's next heartbeat and free their slot when they end). Retries and
replays of a job always queue (hold), whatever its ``on_limit``: the policy is about new submits.

This module is pure: the spec's field, and which jobs a full submit cancels or whether it skips.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

from orch.core.errors import ValidationError

MAX_KEY_LEN = 255  # characters of a concurrency key (it is often made of data: a tenant, a URL, an address)
MAX_LIMIT = 100_000  # the largest limit a key may have (a bigger one is no limit)


class OnLimit(enum.StrEnum):
    QUEUE = "queue"
    CANCEL_RUNNING = "cancel_running"
    SKIP_NEW = "skip_new"


@dataclass(frozen=True, slots=True)
class Concurrency:
    key: str
    limit: int
    on_limit: OnLimit = OnLimit.QUEUE

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "limit": self.limit}
        if self.on_limit is not OnLimit.QUEUE:
            out["on_limit"] = self.on_limit.value
        return out


def check_concurrency(value: object, field: str = "concurrency") -> Concurrency:
    """A spec's ``concurrency`` object; ValidationError naming the part that is wrong."""
    from orch.core.spec import check_printable  # spec imports this module

    if not isinstance(value, dict):
        raise ValidationError('concurrency must be an object: {"key": ..., "limit": N, "on_limit": ...}', field=field)
    unknown = sorted(set(value) - {"key", "limit", "on_limit"})
    if unknown:
        raise ValidationError(f"unknown field {unknown[0]!r}", field=f"{field}.{unknown[0]}")
    if "key" not in value:
        raise ValidationError("concurrency needs a key", field=f"{field}.key")
    key = check_printable(value["key"], f"{field}.key", MAX_KEY_LEN, "a concurrency key")
    limit = value.get("limit")
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"concurrency.limit must be an integer from 1 to {MAX_LIMIT}", field=f"{field}.limit")
    policy = value.get("on_limit", OnLimit.QUEUE.value)
    try:
        on_limit = OnLimit(policy) if isinstance(policy, str) else None
    except ValueError:
        on_limit = None
    if on_limit is None:
        raise ValidationError("concurrency.on_limit must be one of queue, cancel_running, skip_new",
                              field=f"{field}.on_limit")
    return Concurrency(key, limit, on_limit)


@dataclass(frozen=True, slots=True)
class Holder:
    """A job of the key that holds one of its slots or waits for one: running, or queued (held or not)."""

    id: int
    running: bool
    held: bool
    cancel_requested: bool = False


def skips(limit: int, holders: Sequence[Holder]) -> bool:
    """on_limit skip_new: whether a new job is skipped, the key's slots all taken."""
    return sum(1 for h in holders if not h.held) >= limit


def to_cancel(limit: int, holders: Sequence[Holder]) -> list[Holder]:
    """on_limit cancel_running: the jobs a new one cancels to take their place, oldest first.

    The newest ``limit - 1`` jobs that are not being cancelled already keep going (with the new job, the key
    is at its limit); every older one is cancelled, held ones included (they would take the slot meant for the
    new job). ``holders`` in any order."""
    going = sorted((h for h in holders if not h.cancel_requested), key=lambda h: h.id)
    return going[:max(0, len(going) - (limit - 1))]


def skipped_reason(c: Concurrency, taken: int) -> str:
    return (f"skipped: concurrency key {c.key!r} has {taken} of {c.limit} slots taken (on_limit skip_new);"
            f" orch retry runs it")


def replaced_reason(key: str, new_id: int) -> str:
    return f"cancelled: concurrency key {key!r} is full and job {new_id} takes its place (on_limit cancel_running)"
