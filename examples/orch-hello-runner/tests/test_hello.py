"""The example plugin's own test: its runner through orch's runner interface (no cluster)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orch_hello import HelloRunner  # noqa: E402

from orch.core.states import Outcome  # noqa: E402
from orch.worker.runners import Run  # noqa: E402


def _run(params: dict, timeout: float | None = None) -> Run:
    return Run(job_id=1, attempt=1, argv=[], env={}, cwd=None, timeout=timeout, runner="hello",
               spec={"runner": "hello", "params": params})


def test_it_greets_and_leaves_a_value() -> None:
    out: list[tuple[str, str]] = []
    ended = asyncio.run(HelloRunner().execute(_run({"name": "Ada", "times": 2}), lambda s, t: out.append((s, t)), 1))
    assert (ended.outcome, ended.value) == (Outcome.SUCCEEDED, {"greeted": "Ada"})
    assert out == [("stdout", "hello, Ada!\n")] * 2


def test_it_refuses_a_job_without_a_name() -> None:
    ended = asyncio.run(HelloRunner().execute(_run({"times": 2}), lambda s, t: None, 1))
    assert ended.outcome is Outcome.FAILED and "params.name" in (ended.error or "")


def test_a_timeout_stops_it() -> None:
    ended = asyncio.run(HelloRunner().execute(_run({"name": "Ada", "times": 50, "pause": 1}, timeout=0.2),
                                              lambda s, t: None, 1))
    assert ended.outcome is Outcome.TIMED_OUT
