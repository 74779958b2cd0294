"""The runner interface: what every runner (built in, or a plugin's) is to the worker.

A runner runs the attempts of jobs of one kind (core.kinds): ``exec`` command lines, ``python`` functions,
``docker`` containers, or what a plugin brings. The worker makes each runner once, with its settings, then:

- ``unavailable()``: why it cannot run anything here (no Docker engine, say), or None. An unavailable runner
  is not advertised: the scheduler hands this worker none of its jobs, and `orch why` says so.
- ``await start(ctx)``: once, before the first lease: recover what an earlier worker on this machine left
  behind after a crash (the docker runner removes the containers of dead workers), warm up (the python runner
  preloads modules).
- ``check(run)``: refuse a job it cannot run, with a message the job's error shows (RunnerError).
- ``await begin(run, on_output)`` -> an ``Attempt``: start it; output is passed to ``on_output(stream, text)``
  as it comes. ``Attempt.wait()`` ends with an ``Ended``; ``terminate()`` asks it to stop, ``kill()`` makes it.
- ``await execute(run, on_output, kill_grace)``: the whole attempt. The default checks, begins and supervises:
  a timeout or a stop (cancel, drain) terminates, then kills ``kill_grace`` seconds later. The exec runner has
  its own (its hot path starts and reaps processes on the loop's thread).
- ``await close()``: the worker is stopping; nothing of it may be left running.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from orch.core.kinds import runner_of
from orch.core.spec import argv_of
from orch.core.states import Outcome

OnOutput = Callable[[str, str], None]


@dataclass
class Run:
    """One attempt on this worker."""

    job_id: int
    attempt: int
    argv: list[str]  # the exec runner's; [] for the others
    env: dict[str, str]
    cwd: str | None
    timeout: float | None
    queue: str = "default"  # for the worker's metrics
    runner: str = "exec"  # the runner it needs (core.kinds.runner_of)
    spec: dict[str, Any] = field(default_factory=dict)  # the job's spec as stored (the runner reads its part)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_outcome: Outcome | None = None  # why we were told to stop: cancelled or handed_back
    stop_reason: str = ""
    pid: int | None = None  # set as soon as the process exists (by the loop, or the attempt's thread)
    kill_signal: int | None = None  # set by the loop; honoured if the process starts later
    on_stop: Callable[[], None] | None = None  # execute()'s hook: request_stop() ends the run at once
    inputs: str | None = None  # a job with dependencies: the JSON text of what they left (its inputs file)
    max_result: int = 64 << 10  # bytes of JSON its result value may be (scheduler.max_result_bytes)

    @property
    def ref(self) -> dict[str, int]:
        return {"job_id": self.job_id, "attempt": self.attempt}

    def request_stop(self, outcome: Outcome, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_outcome = outcome
            self.stop_reason = reason
            self.stop.set()
            if self.on_stop is not None:
                self.on_stop()

    def signal(self, sig: int) -> None:
        """Signal the attempt's process group, now or as soon as it exists."""
        self.kill_signal = sig
        if self.pid is not None:
            killpg(self.pid, sig)

    @classmethod
    def from_lease(cls, job: dict[str, Any]) -> Run:
        spec = job["spec"]
        inputs = job.get("inputs")
        return cls(job_id=job["job_id"], attempt=job["attempt"], argv=argv_of(spec),
                   env=dict(spec.get("env") or {}), cwd=spec.get("cwd"), timeout=spec.get("timeout"),
                   queue=job.get("queue") or spec.get("queue") or "default", runner=runner_of(spec), spec=spec,
                   inputs=json.dumps(inputs) if inputs is not None else None)


@dataclass
class Ended:
    outcome: Outcome
    exit_code: int | None
    error: str | None
    duration: float
    value: Any = None  # what the job wrote to $ORCH_RESULT_PATH (None: nothing)


_files: str | None = None


def files_dir() -> str:
    """A directory of this worker's own (mode 0700) for the jobs' result and inputs files, made once."""
    global _files
    if _files is None or not os.path.isdir(_files):
        _files = tempfile.mkdtemp(prefix="orch-worker-")
        atexit.register(shutil.rmtree, _files, ignore_errors=True)
    return _files


def read_result(path: str, limit: int) -> tuple[Any, str | None]:
    """The JSON value a job wrote to its result file, and why it is refused (None: it is not). No file, or an
    empty one, is no value. The file is removed."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"could not read its result file $ORCH_RESULT_PATH: {e.strerror}"
    try:
        if size > 4 * limit + 4096:  # far over (a compact form can be no smaller than a quarter of it): unread
            return None, (f"its result ($ORCH_RESULT_PATH) is {size:,} bytes, over scheduler.max_result_bytes "
                          f"({limit:,})")
        with open(path, "rb") as f:
            raw = f.read()
        if not raw.strip():
            return None, None
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as e:
            return None, f"its result ($ORCH_RESULT_PATH) is not JSON: {str(e)[:200]}"
        compact = len(json.dumps(value, separators=(",", ":")))
        if compact > limit:
            return None, (f"its result ($ORCH_RESULT_PATH) is {compact:,} bytes of JSON, over "
                          f"scheduler.max_result_bytes ({limit:,})")
        return value, None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


class StartError(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass



class RunnerError(Exception):
    """A job this runner cannot run (its spec, or what this worker allows): the attempt fails saying so."""


@dataclass
class Context:
    """What a runner is told at the worker's start."""

    worker_name: str
    hostname: str
    concurrency: int
    settings: Mapping[str, Any]  # the worker's settings (config.KEYS), for the runner's own keys
    log: Any = None


class Attempt:
    """A started attempt, as ``Runner.execute`` supervises it."""

    async def wait(self) -> Ended:
        raise NotImplementedError

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM, a container's stop)."""

    def kill(self) -> None:
        """Make it stop now."""


class Runner:
    """A kind of job a worker can run. Subclasses set ``name`` (core.kinds.RUNNER_RE) and implement
    ``begin``, or ``execute`` whole."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, for `orch plugins`

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings: Mapping[str, Any] = settings or {}

    def unavailable(self) -> str | None:
        return None

    async def start(self, ctx: Context) -> None:
        return None

    def check(self, run: Run) -> None:
        return None

    async def begin(self, run: Run, on_output: OnOutput) -> Attempt:
        raise NotImplementedError

    async def execute(self, run: Run, on_output: OnOutput, kill_grace: float) -> Ended:
        started = time.monotonic()
        try:
            self.check(run)
        except RunnerError as e:
            return Ended(Outcome.FAILED, None, str(e), 0.0)
        try:
            attempt = await self.begin(run, on_output)
        except RunnerError as e:
            return Ended(Outcome.FAILED, None, str(e), time.monotonic() - started)
        return await supervise(attempt, run, kill_grace, started)

    async def close(self) -> None:
        return None


class Stops:
    """How an attempt is ended early, for every runner's supervisor: its timeout or a stop (cancel, drain) calls
    ``terminate`` at once and ``kill`` ``kill_grace`` seconds later; the first reason is kept in ``ending``.
    ``over()``: the attempt has ended already (nothing to stop). ``disarm()`` once it is over."""

    __slots__ = ("run", "loop", "terminate", "kill", "kill_grace", "over", "ending", "timers")

    def __init__(self, run: Run, terminate: Callable[[], None], kill: Callable[[], None], kill_grace: float,
                 over: Callable[[], bool] = lambda: False) -> None:
        self.run, self.terminate, self.kill, self.kill_grace, self.over = run, terminate, kill, kill_grace, over
        self.loop = asyncio.get_running_loop()
        self.ending: tuple[Outcome, str] | None = None
        self.timers: list[asyncio.TimerHandle] = []
        if run.timeout is not None:
            self.timers.append(self.loop.call_later(run.timeout, self.end, Outcome.TIMED_OUT,
                                                    f"timed out after {run.timeout:g}s"))
        run.on_stop = self.stopped
        if run.stop.is_set():
            self.stopped()

    def end(self, outcome: Outcome, error: str) -> None:
        if self.ending is not None or self.over():
            return
        self.ending = (outcome, error)
        self.terminate()
        self.timers.append(self.loop.call_later(self.kill_grace, self.kill))

    def stopped(self) -> None:
        self.end(self.run.stop_outcome or Outcome.CANCELLED, self.run.stop_reason or "stopped")

    def disarm(self) -> None:
        self.run.on_stop = None
        for t in self.timers:
            t.cancel()


async def supervise(attempt: Attempt, run: Run, kill_grace: float, started: float) -> Ended:
    """Wait for a started attempt; its timeout or a stop (cancel, drain) terminates it, then kills it
    ``kill_grace`` seconds later (Stops). The end says why it was stopped."""
    stops = Stops(run, attempt.terminate, attempt.kill, kill_grace)
    waiting = asyncio.ensure_future(attempt.wait())
    try:
        ended = await asyncio.shield(waiting)
    except asyncio.CancelledError:
        attempt.kill()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(waiting, kill_grace + 5)
        raise
    finally:
        stops.disarm()
    ended.duration = time.monotonic() - started
    if stops.ending is not None:
        ended.outcome, ended.error = stops.ending
        ended.value = None
    return ended
