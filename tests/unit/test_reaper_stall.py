"""Unit tests of the reaper's stall detection: a scheduler stopped (SIGSTOP, a long pause) while it asked the store
for the reaper's role must not sweep with the leases nobody could renew meanwhile. The stall is simulated by moving
the reaper's monotonic clock forward inside ``lead``, as a stop there would."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import until
from orch.config import load_settings
from orch.core.records import Leadership
from orch.scheduler import app as app_module
from orch.scheduler.dispatch import Hub
from orch.store.base import Sweep

TTL = 2.0


class Clock:
    """time.monotonic, shifted by what the stalls added."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


class StallingStore:
    """Records the reaper's calls; the ``stall_at``-th call of lead stalls for ``stall`` seconds after the role
    was renewed (its lease is then found lapsed by the next lead, as the database would)."""

    def __init__(self, clock: Clock, shared: bool, stall_at: int, stall: float) -> None:
        self.clock_, self.shared, self.stall_at, self.stall = clock, shared, stall_at, stall
        self.calls: list[str] = []
        self.leads = 0
        self.lapsed = False

    def clock(self) -> float:
        return time.time()

    async def lead(self, holder: str, ttl: float) -> Leadership:
        self.leads += 1
        self.calls.append("lead")
        if self.lapsed:
            self.lapsed = False
            return Leadership(True, self.stall - ttl)  # its own lease ran out that long ago
        if self.leads == self.stall_at:
            self.clock_.offset += self.stall
            self.lapsed = True
        return Leadership(True)

    async def recover(self, grace: float, ttl: float) -> None:
        self.calls.append("recover")

    async def sweep(self, ttl: float, defaults: Any) -> Sweep:
        self.calls.append("sweep")
        await asyncio.sleep(0)
        return Sweep()


def run(monkeypatch: pytest.MonkeyPatch, shared: bool, stall: float, reaper_holds: bool = True) -> list[str]:
    clock = Clock()
    monkeypatch.setattr(app_module, "time", SimpleNamespace(monotonic=clock.monotonic, time=time.time))
    settings = load_settings(None, {"scheduler.heartbeat_interval": 0.1, "scheduler.lease_ttl": TTL}, environ={})
    store, hub = StallingStore(clock, shared, stall_at=3, stall=stall), Hub()
    api = SimpleNamespace(guard=None, leading=False,
                          metrics=SimpleNamespace(leader=SimpleNamespace(set=lambda v: None)))

    async def main() -> None:
        task = asyncio.create_task(app_module.reaper(store, hub, api, settings, "me"))  # type: ignore[arg-type]
        try:
            await until(lambda: store.calls.count("sweep") >= 5, 5, "sweeps after the stall")
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    asyncio.run(main())
    return store.calls


def after_the_stall(calls: list[str]) -> list[str]:
    third = [i for i, c in enumerate(calls) if c == "lead"][2]
    return calls[third + 1:]


@pytest.mark.parametrize("shared", [False, True], ids=["lone", "shared"])
def test_a_stall_while_the_role_is_asked_for_gives_the_leases_grace_before_any_sweep(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, shared: bool) -> None:
    calls = run(monkeypatch, shared, stall=3.5)
    rest = after_the_stall(calls)
    # No sweep on the clock that jumped: the pass looks again (lead), extends the leases, then sweeps.
    assert rest[:3] == ["lead", "recover", "sweep"], calls
    assert "scheduler stalled for 3.5s" in caplog.text


def test_a_short_pause_while_the_role_is_asked_for_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = run(monkeypatch, False, stall=0.5)
    assert "recover" not in calls, calls
    assert after_the_stall(calls)[:2] == ["sweep", "lead"], calls
