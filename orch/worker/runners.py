"""Runs one attempt as a subprocess in its own process group: output, timeout, kill."""

from __future__ import annotations

import asyncio
import codecs
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from orch.models import Outcome

READ_CHUNK = 64 * 1024


@dataclass
class Run:
    """One attempt on this worker."""

    job_id: int
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    timeout: float | None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_outcome: Outcome | None = None  # why we were told to stop: cancelled or handed_back
    stop_reason: str = ""
    pid: int | None = None

    @property
    def ref(self) -> dict[str, int]:
        return {"job_id": self.job_id, "attempt": self.attempt}

    def request_stop(self, outcome: Outcome, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_outcome = outcome
            self.stop_reason = reason
            self.stop.set()

    @classmethod
    def from_lease(cls, job: dict[str, Any]) -> "Run":
        spec = job["spec"]
        return cls(job_id=job["job_id"], attempt=job["attempt"], argv=list(spec["argv"]),
                   env=dict(spec.get("env") or {}), cwd=spec.get("cwd"), timeout=spec.get("timeout"))


@dataclass
class Ended:
    outcome: Outcome
    exit_code: int | None
    error: str | None
    duration: float


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def execute(run: Run, on_output: Callable[[str, str], None], kill_grace: float) -> Ended:
    """Run the attempt to its end; ``on_output(stream, text)`` gets output as it comes."""
    started = time.monotonic()
    # The job knows who it is: ids to make side effects idempotent across attempts.
    # The worker's own ORCH_* settings (its server, later its token) are not the job's business.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env = {**inherited, **run.env, "ORCH_JOB_ID": str(run.job_id), "ORCH_ATTEMPT": str(run.attempt)}
    try:
        proc = await asyncio.create_subprocess_exec(
            *run.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=run.cwd, env=env, start_new_session=True,
        )
    except FileNotFoundError as e:
        missing = run.cwd if run.cwd and not os.path.isdir(run.cwd) else run.argv[0]
        what = "working directory" if missing == run.cwd else "command"
        return Ended(Outcome.FAILED, 127, f"{what} not found: {missing} ({e.strerror})", time.monotonic() - started)
    except PermissionError as e:
        return Ended(Outcome.FAILED, 126, f"permission denied: {run.argv[0]} ({e.strerror})", time.monotonic() - started)
    except OSError as e:
        return Ended(Outcome.FAILED, 126, f"cannot start {run.argv[0]}: {e}", time.monotonic() - started)
    run.pid = proc.pid
    readers = [
        asyncio.ensure_future(_pump(proc.stdout, "stdout", on_output)),
        asyncio.ensure_future(_pump(proc.stderr, "stderr", on_output)),
    ]
    exited = asyncio.ensure_future(proc.wait())
    stopped = asyncio.ensure_future(run.stop.wait())
    outcome: Outcome | None = None
    error: str | None = None
    try:
        done, _ = await asyncio.wait({exited, stopped}, timeout=run.timeout, return_when=asyncio.FIRST_COMPLETED)
        if exited not in done:
            if stopped in done:
                outcome, error = run.stop_outcome or Outcome.CANCELLED, run.stop_reason or "stopped"
            else:
                outcome, error = Outcome.TIMED_OUT, f"timed out after {run.timeout:g}s"
            _killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(exited), kill_grace)
            except asyncio.TimeoutError:
                _killpg(proc.pid, signal.SIGKILL)
                await exited
        # The leader is gone; children it left holding our pipes would keep the
        # readers open for ever. Give them a moment, then end the whole group.
        _, pending = await asyncio.wait(readers, timeout=1.0)
        if pending:
            _killpg(proc.pid, signal.SIGKILL)
            await asyncio.wait(readers, timeout=5.0)
    finally:
        stopped.cancel()
        for t in readers:
            t.cancel()
        if proc.returncode is None:
            _killpg(proc.pid, signal.SIGKILL)
    code = proc.returncode
    assert code is not None
    if code < 0:
        exit_code = 128 - code
        sig_error = f"killed by {_signal_name(-code)}"
    else:
        exit_code, sig_error = code, None
    if outcome is None:
        outcome = Outcome.SUCCEEDED if code == 0 else Outcome.FAILED
        error = sig_error
    return Ended(outcome, exit_code, error, time.monotonic() - started)


async def _pump(stream: asyncio.StreamReader | None, name: str, on_output: Callable[[str, str], None]) -> None:
    if stream is None:
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        data = await stream.read(READ_CHUNK)
        if not data:
            tail = decoder.decode(b"", final=True)
            if tail:
                on_output(name, tail)
            return
        text = decoder.decode(data)
        if text:
            on_output(name, text)


def use_fast_child_watcher() -> None:
    """On Python 3.11 asyncio reaps children with a thread per child; a pidfd watcher is faster.

    From 3.12 on asyncio picks the pidfd way by itself.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            pid = os.pidfd_open(os.getpid())
            os.close(pid)
        except OSError:
            return
        watcher = asyncio.PidfdChildWatcher()
        asyncio.set_child_watcher(watcher)
        watcher.attach_loop(asyncio.get_running_loop())
