"""Runs one attempt as a subprocess in its own process group: output, timeout, kill.

Each attempt's process is started, read and reaped on a thread of its own
(blocking Popen, poll and waitpid), and the event loop hears of output and the
exit through call_soon_threadsafe. Measured on 2 cores, this starts ~950
`echo hello`/s against ~500/s for asyncio's subprocess transports: starting a
process blocks until the child has exec'd, and on threads several can be
starting at once while the loop carries on. Timeouts and cancels stay on the
loop: it signals the process group, and the thread sees the pipes close.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import select
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from orch.models import Outcome

READ_CHUNK = 64 * 1024
DRAIN_AFTER_EXIT = 1.0  # seconds left-over children may hold the job's pipes once it has exited


@dataclass
class Run:
    """One attempt on this worker."""

    job_id: int
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    timeout: float | None
    queue: str = "default"  # for the worker's metrics
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_outcome: Outcome | None = None  # why we were told to stop: cancelled or handed_back
    stop_reason: str = ""
    pid: int | None = None  # set by the attempt's thread once the process exists
    kill_signal: int | None = None  # set by the loop; the thread honours it if it starts late

    @property
    def ref(self) -> dict[str, int]:
        return {"job_id": self.job_id, "attempt": self.attempt}

    def request_stop(self, outcome: Outcome, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_outcome = outcome
            self.stop_reason = reason
            self.stop.set()

    def signal(self, sig: int) -> None:
        """Signal the attempt's process group, now or as soon as it exists."""
        self.kill_signal = sig
        if self.pid is not None:
            _killpg(self.pid, sig)

    @classmethod
    def from_lease(cls, job: dict[str, Any]) -> Run:
        spec = job["spec"]
        return cls(job_id=job["job_id"], attempt=job["attempt"], argv=list(spec["argv"]),
                   env=dict(spec.get("env") or {}), cwd=spec.get("cwd"), timeout=spec.get("timeout"),
                   queue=job.get("queue") or spec.get("queue") or "default")


@dataclass
class Ended:
    outcome: Outcome
    exit_code: int | None
    error: str | None
    duration: float


class StartError(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


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


_where: dict[tuple[str, str], str] = {}


def _resolve(name: str, search: str) -> str:
    """The executable's path, as execvp would find it; found paths are remembered.

    Searching costs a failed exec per PATH entry before the right one on every
    job; a miss is never remembered, so a program installed later is found.
    """
    if "/" in name:
        return name
    key = (name, search)
    found = _where.get(key)
    if found is None or not os.access(found, os.X_OK):
        found = shutil.which(name, path=search)
        if found is None:
            raise StartError(127, f"command not found: {name}")
        _where[key] = found
    return found


_inherited: dict[str, str] | None = None


def inherited_env() -> dict[str, str]:
    """The worker's environment as jobs see it (read once: building it costs ~0.3 ms).

    The worker's own ORCH_* settings (its server, later its token) are not the jobs' business.
    """
    global _inherited
    if _inherited is None:
        _inherited = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    return _inherited


_threads: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _threads
    if _threads is None:
        # One thread per running attempt; the worker never runs more than its concurrency.
        _threads = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="orch-job")
    return _threads


def _run_blocking(run: Run, env: dict[str, str], emit: Callable[[str, str], None]) -> int:
    """On the attempt's thread: start the process, pass its output on, reap it; the return code."""
    path = _resolve(run.argv[0], env.get("PATH", os.defpath))
    if run.cwd is not None and not os.path.isdir(run.cwd):
        raise StartError(127, f"working directory not found: {run.cwd}")
    try:
        proc = subprocess.Popen(run.argv, executable=path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=run.cwd, start_new_session=True)
    except FileNotFoundError as e:
        raise StartError(127, f"command not found: {run.argv[0]} ({e.strerror})") from None
    except PermissionError as e:
        raise StartError(126, f"permission denied: {run.argv[0]} ({e.strerror})") from None
    except OSError as e:
        raise StartError(126, f"cannot start {run.argv[0]}: {e.strerror or e}") from None
    run.pid = proc.pid
    if run.kill_signal is not None:  # the loop asked before the process existed
        _killpg(proc.pid, run.kill_signal)
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in streams}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = None
    exited_at: float | None = None
    try:
        while streams:
            # Until the leader exits, wait on its pipes and its pidfd only; then give
            # children it left behind DRAIN_AFTER_EXIT to let go of the pipes.
            if exited_at is None and (pidfd is None and proc.poll() is not None):
                exited_at = time.monotonic()
            if exited_at is None:
                timeout_ms = None if pidfd is not None else 100
            else:
                left = DRAIN_AFTER_EXIT - (time.monotonic() - exited_at)
                if left <= 0:
                    _killpg(proc.pid, signal.SIGKILL)
                    exited_at = time.monotonic() + 3600  # keep reading what they flushed
                    left = 5.0
                timeout_ms = int(left * 1000) + 1
            for fd, _ in poller.poll(timeout_ms):
                if fd == pidfd:
                    poller.unregister(pidfd)
                    exited_at = time.monotonic()
                    continue
                data = os.read(fd, READ_CHUNK)
                name = streams.get(fd)
                if name is None:
                    continue
                if data:
                    text = decoders[fd].decode(data)
                else:
                    text = decoders[fd].decode(b"", final=True)
                    poller.unregister(fd)
                    del streams[fd]
                if text:
                    emit(name, text)
        return proc.wait()
    finally:
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def execute(run: Run, on_output: Callable[[str, str], None], kill_grace: float) -> Ended:
    """Run the attempt to its end; ``on_output(stream, text)`` gets output as it comes."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    # The job knows who it is: ids to make side effects idempotent across attempts.
    env = {**inherited_env(), **run.env, "ORCH_JOB_ID": str(run.job_id), "ORCH_ATTEMPT": str(run.attempt)}

    def emit(name: str, text: str) -> None:
        loop.call_soon_threadsafe(on_output, name, text)

    done = loop.run_in_executor(_pool(), _run_blocking, run, env, emit)
    stopped = asyncio.ensure_future(run.stop.wait())
    outcome: Outcome | None = None
    error: str | None = None
    try:
        finished, _ = await asyncio.wait({done, stopped}, timeout=run.timeout, return_when=asyncio.FIRST_COMPLETED)
        if done not in finished:
            if stopped in finished:
                outcome, error = run.stop_outcome or Outcome.CANCELLED, run.stop_reason or "stopped"
            else:
                outcome, error = Outcome.TIMED_OUT, f"timed out after {run.timeout:g}s"
            run.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(done), kill_grace)
            except TimeoutError:
                run.signal(signal.SIGKILL)
        try:
            code = await done
        except StartError as e:
            return Ended(Outcome.FAILED, e.exit_code, e.message, time.monotonic() - started)
    finally:
        stopped.cancel()
        if not done.done():  # we are being cancelled ourselves: leave nothing running
            run.signal(signal.SIGKILL)
    if code < 0:
        exit_code = 128 - code
        sig_error: str | None = f"killed by {_signal_name(-code)}"
    else:
        exit_code, sig_error = code, None
    if outcome is None:
        outcome = Outcome.SUCCEEDED if code == 0 else Outcome.FAILED
        error = sig_error
    # The thread queued its output callbacks before its result, so on_output has seen all of it.
    return Ended(outcome, exit_code, error, time.monotonic() - started)


def shutdown() -> None:
    """Let the attempt threads go (they end with their processes)."""
    if _threads is not None:
        _threads.shutdown(wait=False)

