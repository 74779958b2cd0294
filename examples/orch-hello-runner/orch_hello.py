"""An example orch plugin: the ``hello`` runner.

A job ``{"runner": "hello", "params": {"name": "Ada", "times": 2}}`` prints a greeting ``times`` times (one a
``pause`` seconds apart), and leaves ``{"greeted": NAME}`` as its result value. It shows the parts of a runner:
``check`` refuses what it cannot run, ``begin`` starts an attempt, and the Attempt's ``wait``, ``terminate`` and
``kill`` are what the worker's supervisor calls for the end, a timeout, a cancel and a drain.

Found by orch through this package's entry point (pyproject.toml), or, without installing it, by the plugins
setting: ``orch worker --plugin orch_hello:HelloRunner`` (with this directory on PYTHONPATH).
"""

from __future__ import annotations

import asyncio

from orch.core.states import Outcome
from orch.worker.runners import Attempt, Ended, Run, Runner, RunnerError


class _Greeting(Attempt):
    def __init__(self, run: Run, on_output) -> None:  # type: ignore[no-untyped-def]
        self.params = run.spec.get("params", {})
        self.on_output = on_output
        self.task = asyncio.ensure_future(self._greet())

    async def _greet(self) -> None:
        for i in range(int(self.params.get("times", 1))):
            if i:
                await asyncio.sleep(float(self.params.get("pause", 0)))
            self.on_output("stdout", f"hello, {self.params['name']}!\n")

    async def wait(self) -> Ended:
        try:
            await self.task
        except asyncio.CancelledError:
            return Ended(Outcome.FAILED, 143, "stopped", 0.0)
        return Ended(Outcome.SUCCEEDED, 0, None, 0.0, {"greeted": self.params["name"]})

    def terminate(self) -> None:
        self.task.cancel()

    def kill(self) -> None:
        self.task.cancel()


class HelloRunner(Runner):
    name = "hello"
    summary = "greets (an example plugin)"

    def check(self, run: Run) -> None:
        params = run.spec.get("params", {})
        if not isinstance(params.get("name"), str) or not params["name"]:
            raise RunnerError("hello: params.name must be a non-empty string")
        times = params.get("times", 1)
        if not isinstance(times, int) or not 1 <= times <= 100:
            raise RunnerError("hello: params.times must be an integer from 1 to 100")

    async def begin(self, run: Run, on_output) -> Attempt:  # type: ignore[no-untyped-def]
        return _Greeting(run, on_output)
