"""The python runner: a job's Python function, run in one of a small pool of long-lived child interpreters.

A job ``{"python": {"function": "pkg.mod:name", "args": [...], "kwargs": {...}}}`` is sent to an idle child
(orch/worker/pychild.py), which imports the function once (and what ``worker.imports`` preloads, at its start),
calls it with the job's env and cwd, and answers with its return value (the job's result value; one that is not
JSON fails the attempt saying so) or the exception it raised (the error; its traceback is in the output).
Import cost is paid once per child, not per task.

The pool holds up to ``python.pool`` children (default: the worker's concurrency), started when first needed (all
of them at the worker's start when there are modules to preload). A child is replaced after it crashed, after a
timeout or a cancel (its process group is sent SIGTERM, then SIGKILL: a function cannot be interrupted
otherwise), and after ``python.max_tasks`` tasks (memory a task leaked goes with it). A child whose worker died
ends on its own (its control pipe closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

import orch
from orch.core.states import Outcome
from orch.worker.runners.base import Attempt, Context, Ended, OnOutput, Run, Runner, RunnerError, files_dir, killpg
from orch.worker.runners.exec import inherited_env

log = logging.getLogger("orch.worker")

MAX_TASKS = 1000  # tasks a child runs before it is replaced
START_TIMEOUT = 60.0  # seconds a child may take to preload its modules and say it is ready
LINE_LIMIT = 1 << 24  # bytes of one message from a child (output comes in pieces of 64 KiB; values are bounded)


def _orch_root() -> str:
    """The sys.path entry orch is imported from (a directory, or the zipapp itself)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(orch.__file__)))


class _Child:
    """One child interpreter and its control channel."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.tasks = 0
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answer: asyncio.Future[dict[str, Any]] | None = None
        self.on_output: OnOutput | None = None
        self.dead = False
        self.overlong = False  # it sent a message over LINE_LIMIT (and was killed for it)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                try:
                    line = await self.proc.stdout.readline()
                except ValueError:  # a message over the line limit: not a child of ours any more
                    log.warning("python runner: child %s sent a message over %d bytes; replacing it", self.pid,
                                LINE_LIMIT)
                    self.overlong = True
                    self.signal(signal.SIGKILL)
                    break
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "o" in msg:
                    if self.on_output is not None:
                        self.on_output(msg["o"], msg["t"])
                elif "r" in msg:
                    if self.answer is not None and not self.answer.done():
                        self.answer.set_result(msg["r"])
                elif "ready" in msg and not self.ready.done():
                    self.ready.set_result(msg)
        finally:
            self.dead = True
            code = await self.proc.wait()
            ended = {"ok": False, "died": code}
            for fut in (self.ready, self.answer):
                if fut is not None and not fut.done():
                    fut.set_result(ended)

    def signal(self, sig: int) -> None:
        if not self.dead:
            killpg(self.pid, sig)

    async def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        self.signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await self.reader


class _PyAttempt(Attempt):
    def __init__(self, runner: PythonRunner, child: _Child, run: Run, inputs: str | None) -> None:
        self.runner, self.child, self.run, self.inputs = runner, child, run, inputs
        self.stopped = False

    async def wait(self) -> Ended:
        child, run = self.child, self.run
        assert child.answer is not None
        try:
            answer = await child.answer
        finally:
            child.on_output = None
            child.answer = None
            self.runner._release()
            if self.inputs is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.inputs)
        if "died" in answer:
            code = answer["died"]
            self.runner._retire(child)
            how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
                else f"exited with code {code}"
            if child.overlong:
                how = f"was killed: its answer was over {LINE_LIMIT:,} bytes"
            return Ended(Outcome.FAILED, 128 - code if code < 0 else code,
                         f"the python child interpreter {how} while running it", 0.0)
        child.tasks += 1
        if child.tasks >= self.runner.max_tasks:
            self.runner._retire(child)
        else:
            self.runner._idle(child)
        if answer.get("ok"):
            if answer.get("size", 0) > run.max_result:
                return Ended(Outcome.FAILED, 1, f"its return value is {answer['size']:,} bytes of JSON, over "
                             f"scheduler.max_result_bytes ({run.max_result:,})", 0.0)
            return Ended(Outcome.SUCCEEDED, 0, None, 0.0, answer.get("value"))
        return Ended(Outcome.FAILED, answer.get("exit_code") or 1, answer.get("error") or "failed", 0.0)

    def terminate(self) -> None:
        self.stopped = True
        self.child.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.child.signal(signal.SIGKILL)


class PythonRunner(Runner):
    """Python functions (``python``: function, args, kwargs) in a pool of long-lived child interpreters."""

    name = "python"
    summary = "Python functions in long-lived child interpreters (python.pool of them)"

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.imports: list[str] = list(self.settings.get("worker.imports") or ())
        self.max_tasks = int(self.settings.get("python.max_tasks") or MAX_TASKS)
        self.size = int(self.settings.get("python.pool") or self.settings.get("worker.concurrency") or 4)
        self.children: set[_Child] = set()
        self.idle: list[_Child] = []
        self.starting = 0
        self.slots: asyncio.Semaphore | None = None
        self.closing = False

    async def start(self, ctx: Context) -> None:
        if self.imports:  # preload everywhere now: a first task then pays nothing
            children = await asyncio.gather(*(self._spawn() for _ in range(self.size)), return_exceptions=True)
            for c in children:
                if isinstance(c, _Child):
                    self._idle(c)

    def check(self, run: Run) -> None:
        if not isinstance(run.spec.get("python"), dict) or "function" not in run.spec["python"]:
            raise RunnerError("the python runner needs a spec with python.function")

    async def _spawn(self) -> _Child:
        env = {**inherited_env()}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", ""), _orch_root()) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.starting += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "orch.worker.pychild", *self.imports, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=None, env=env, start_new_session=True,
                limit=LINE_LIMIT)
            child = _Child(proc)
            try:
                ready = await asyncio.wait_for(asyncio.shield(child.ready), START_TIMEOUT)
            except TimeoutError:
                await child.close()
                raise RunnerError(f"the python child interpreter did not start in {START_TIMEOUT:g}s") from None
            if "died" in ready:
                raise RunnerError(f"the python child interpreter exited at its start (code {ready['died']})")
            for module, error in ready.get("failed", ()):
                log.warning("python runner: preloading %s failed: %s", module, error)
            self.children.add(child)
            return child
        finally:
            self.starting -= 1

    def _idle(self, child: _Child) -> None:
        if child.dead or self.closing:
            self._retire(child)
        else:
            self.idle.append(child)

    def _retire(self, child: _Child) -> None:
        self.children.discard(child)
        with contextlib.suppress(ValueError):
            self.idle.remove(child)
        asyncio.ensure_future(child.close())

    async def _take(self) -> _Child:
        """An idle child, or a new one; at most ``size`` are busy at once (a permit each)."""
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.size)
        await self.slots.acquire()
        try:
            while self.idle:
                child = self.idle.pop()
                if not child.dead:
                    return child
                self._retire(child)
            return await self._spawn()
        except BaseException:
            self.slots.release()
            raise

    def _release(self) -> None:
        if self.slots is not None:
            self.slots.release()

    async def begin(self, run: Run, on_output: OnOutput) -> Attempt:
        child = await self._take()
        body = run.spec["python"]
        env = {**run.env, "ORCH_JOB_ID": str(run.job_id), "ORCH_ATTEMPT": str(run.attempt)}
        path: str | None = None
        if run.inputs is not None:
            path = os.path.join(files_dir(), f"{run.job_id}-{run.attempt}.inputs.json")
            with open(path, "w", encoding="utf-8") as f:
                f.write(run.inputs)
            env["ORCH_INPUTS_PATH"] = path
        request = {"function": body["function"], "args": body.get("args", []), "kwargs": body.get("kwargs", {}),
                   "env": env, "cwd": run.cwd, "max_result": run.max_result}
        child.on_output = on_output
        child.answer = asyncio.get_running_loop().create_future()
        run.pid = child.pid
        assert child.proc.stdin is not None
        try:
            child.proc.stdin.write((json.dumps(request, separators=(",", ":")) + "\n").encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died: the reader ends its answer
        return _PyAttempt(self, child, run, path)

    async def close(self) -> None:
        self.closing = True
        await asyncio.gather(*(c.close() for c in list(self.children)), return_exceptions=True)
        self.children.clear()
        self.idle.clear()
