"""Unit tests of the reaper's failure log (one line a minute per kind, and when it works again) and of the
reaper going on through a store that cannot write."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import until
from orch.config import load_settings
from orch.core.errors import StorageCorrupt, StorageFull
from orch.core.records import Leadership
from orch.scheduler.app import ReaperFailures, reaper
from orch.scheduler.dispatch import Hub
from orch.store.base import Sweep

FULL = StorageFull("no space left on the disk of the database /d/orch.db")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "orch.scheduler"]


def fail(failures: ReaperFailures, e: BaseException) -> None:
    try:
        raise e
    except BaseException as caught:
        failures.failed(caught)


def test_a_lasting_failure_is_told_once_a_minute_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "orch.scheduler")
    clock = Clock()
    failures = ReaperFailures(clock)
    for i in range(601):  # ten passes a second for a minute
        clock.t = 1000.0 + i / 10
        fail(failures, FULL)
    got = lines(caplog)
    assert len(got) == 2, [r.getMessage() for r in got]
    assert got[0].levelno == logging.ERROR and "no space left" in got[0].getMessage()
    assert got[0].exc_info is None  # an orch error: no traceback
    assert "599 more times since told 60s ago" in got[1].getMessage()
    failures.passed()
    failures.passed()
    got = lines(caplog)
    assert len(got) == 3 and "work again, after 601 failed over 60.0s" in got[2].getMessage()


def test_a_failure_that_comes_and_goes_is_told_no_more_often(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "orch.scheduler")
    clock = Clock()
    failures = ReaperFailures(clock)
    for _ in range(50):
        fail(failures, FULL)
        clock.t += 0.5
        failures.passed()
        clock.t += 0.5
    messages = [r.getMessage() for r in lines(caplog)]
    assert len(messages) == 2, messages  # the first failure and its end; the rest were within the minute


def test_each_kind_is_told_on_its_own_and_a_bug_shows_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "orch.scheduler")
    clock = Clock()
    failures = ReaperFailures(clock)
    for _ in range(5):
        fail(failures, FULL)
        fail(failures, StorageCorrupt("the database /d/orch.db is damaged"))
        fail(failures, KeyError("oops"))
        clock.t += 1
    got = lines(caplog)
    assert len(got) == 3, [r.getMessage() for r in got]
    bug = [r for r in got if r.exc_info]
    assert len(bug) == 1 and bug[0].exc_info[0] is KeyError  # type: ignore[index]


class FailingStore:
    """Its first ``failing`` writes fail with a full disk, then they work; records what the reaper asked for."""

    def __init__(self, failing: int) -> None:
        self.failing = failing
        self.calls: list[str] = []

    def clock(self) -> float:
        return 0.0

    def _write(self, name: str) -> None:
        if self.failing > 0:
            self.failing -= 1
            self.calls.append(f"{name}:fail")
            raise FULL
        self.calls.append(f"{name}:ok")

    shared = False

    async def lead(self, holder: str, ttl: float) -> Leadership:
        return Leadership(True)

    async def recover(self, grace: float, ttl: float) -> None:
        self._write("recover")

    async def sweep(self, ttl: float, defaults: Any) -> Sweep:
        self._write("sweep")
        return Sweep()


def test_the_reaper_goes_on_and_gives_leases_their_grace_once_the_store_writes_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """While writes failed, so did workers' heartbeats: the first sweep that works must not find them all
    silent, so the leases get recovery_grace first, as after a stall (and a failed grace is tried again)."""
    caplog.set_level(logging.INFO, "orch.scheduler")
    settings = load_settings(None, {"scheduler.heartbeat_interval": 0.1}, environ={})
    store = FailingStore(failing=5)
    api = SimpleNamespace(guard=None, metrics=SimpleNamespace(leader=SimpleNamespace(set=lambda v: None)))

    async def main() -> None:
        task = asyncio.create_task(reaper(store, Hub(), api, settings, "me"))  # type: ignore[arg-type]
        try:
            await until(lambda: store.calls.count("sweep:ok") >= 3, 10, "the reaper to sweep again after failing")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert store.calls[:7] == ["sweep:fail", *["recover:fail"] * 4, "recover:ok", "sweep:ok"], store.calls
    assert set(store.calls[7:]) == {"sweep:ok"}, store.calls  # the grace is given once
    messages = [r.getMessage() for r in lines(caplog)]
    assert sum("reaper pass failed" in m for m in messages) == 1, messages
    assert sum("work again, after 5 failed" in m for m in messages) == 1, messages
