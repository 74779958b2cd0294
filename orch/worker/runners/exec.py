"""The exec runner (command, shell, task): one attempt as a subprocess in its own process group.

The fast path starts, reads and reaps the process on the event loop's own
thread: os.posix_spawn (the child in a session of its own, stdin from
/dev/null, stdout and stderr on pipes, SIGPIPE and SIGXFSZ back at their
default, an empty signal mask), loop readers on the two non-blocking pipes and
on a pidfd (os.pidfd_open), which becomes readable when the process exits, and
os.waitpid to reap it. Measured on 2 cores for 2,000 `echo hello`, 8 in
flight: ~1,830/s and 0.157 ms of the worker's CPU a job, against ~1,710/s and
0.30 ms for 8 threads each running subprocess.run, and ~1,200/s for
posix_spawn on 8 threads (each holds the GIL while its child gets to exec).
Starting blocks the loop only until the child has exec'd, a fraction of a
millisecond, and nothing crosses threads. posix_spawn cannot close the
worker's other fds in the child as Popen's close_fds does; Python opens all its
own fds close-on-exec, and the fds the worker inherited are made so once.

The thread path is the fallback: the process is started, read and reaped on a
thread of its own (blocking Popen, poll and waitpid), and the loop hears of
output and the exit through call_soon_threadsafe. It is used for a job with a
working directory (Python's posix_spawn has no chdir), where os.posix_spawn or
os.pidfd_open are missing or the kernel refuses pidfds, where the loop cannot
watch fds or /proc/self/fd cannot be read, and when FAST_SPAWN is off.

On both paths timeouts and cancels stay on the loop: it signals the process
group, and the readers see the pipes close.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from orch.core.states import Outcome
from orch.worker.runners.base import Ended, Run, Runner, StartError, Stops, files_dir, killpg, read_result, signal_name

log = logging.getLogger("orch.worker")

READ_CHUNK = 64 * 1024
DRAIN_AFTER_EXIT = 1.0  # seconds left-over children may hold the job's pipes once it has exited
READ_AFTER_KILL = 5.0  # seconds to read what they flushed once they were killed; then the pipes are let go
# Start processes on the loop's thread (posix_spawn + pidfd); off, or where unavailable: a thread per attempt.
FAST_SPAWN = all(hasattr(os, n) for n in ("posix_spawn", "pidfd_open", "POSIX_SPAWN_OPEN", "POSIX_SPAWN_DUP2")) \
    and hasattr(select, "epoll")
# Python ignores these; the child gets them at their default, as with Popen(restore_signals=True).
_SIGDEF = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, n))



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
    except OSError as e:
        raise _start_error(run.argv[0], e) from None
    run.pid = proc.pid
    if run.kill_signal is not None:  # the loop asked before the process existed
        killpg(proc.pid, run.kill_signal)
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in streams}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    try:
        opened = os.pidfd_open(proc.pid)
        poller.register(opened, select.POLLIN)
        pidfd: int | None = opened
    except (AttributeError, OSError):
        pidfd = None
    exited_at: float | None = None
    give_up_at: float | None = None  # once the group was killed: stop reading then
    try:
        while streams:
            # Until the leader exits, wait on its pipes and its pidfd only; then give
            # children it left behind DRAIN_AFTER_EXIT to let go of the pipes.
            if exited_at is None and (pidfd is None and proc.poll() is not None):
                exited_at = time.monotonic()
            if exited_at is None:
                timeout_ms = None if pidfd is not None else 100
            else:
                now = time.monotonic()
                if give_up_at is None and now - exited_at >= DRAIN_AFTER_EXIT:
                    killpg(proc.pid, signal.SIGKILL)
                    give_up_at = now + READ_AFTER_KILL  # keep reading what they flushed
                if give_up_at is None:
                    left = DRAIN_AFTER_EXIT - (now - exited_at)
                else:
                    left = give_up_at - now
                    if left <= 0:  # something outside the group holds the pipes: let them go
                        for fd, name in streams.items():
                            text = decoders[fd].decode(b"", final=True)
                            if text:
                                emit(name, text)
                        break
                timeout_ms = int(left * 1000) + 1
            for fd, _ in poller.poll(timeout_ms):
                if fd == pidfd:
                    poller.unregister(pidfd)
                    exited_at = time.monotonic()
                    continue
                data = os.read(fd, READ_CHUNK)
                stream = streams.get(fd)
                if stream is None:
                    continue
                if data:
                    text = decoders[fd].decode(data)
                else:
                    text = decoders[fd].decode(b"", final=True)
                    poller.unregister(fd)
                    del streams[fd]
                if text:
                    emit(stream, text)
        return proc.wait()
    finally:
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        if proc.poll() is None:
            killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start_error(name: str, e: OSError) -> StartError:
    """What an exec error means for the job (Popen and posix_spawn raise the same ones)."""
    if isinstance(e, FileNotFoundError):
        return StartError(127, f"command not found: {name} ({e.strerror})")
    if isinstance(e, PermissionError):
        return StartError(126, f"permission denied: {name} ({e.strerror})")
    return StartError(126, f"cannot start {name}: {e.strerror or e}")


def _waitpid(pid: int) -> int:
    """On a pool thread: the wait status, once the process has ended."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # reaped by someone else: Popen calls that 0 too
        return 0


_sealed_in: int | None = None  # the pid of the process whose inherited fds were made close-on-exec


def _seal_inherited_fds() -> bool:
    """Once per process: make the fds the worker was started with close-on-exec; False if it cannot.

    Popen closes every fd but 0/1/2 in the child (close_fds); posix_spawn here has no closefrom,
    so an inheritable fd would reach every job (and a pipe a supervisor waits on stay open while
    a job's leftovers live). Python makes every fd it opens non-inheritable, so what the worker
    inherited is all there is to seal, once; scanning on every start would cost ~35 us a job.
    """
    global _sealed_in
    if _sealed_in == os.getpid():
        return True
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:  # the directory listdir had open, or one closed since
                pass
    _sealed_in = os.getpid()
    return True


class _Poller:
    """One epoll set for every attempt's pipes and pidfd, watched by the loop as one fd.

    asyncio's add_reader/remove_reader cost ~10 us each (a handle, selector keys), and an
    attempt has three fds: at 1,500 jobs/s that was a tenth of the worker's time. Here
    each is one epoll_ctl. Level-triggered: a callback reads once; more data, another round.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ep = select.epoll()
        self.callbacks: dict[int, Callable[[], None]] = {}
        try:
            loop.add_reader(self.ep.fileno(), self._ready)
        except BaseException:
            self.ep.close()
            raise

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        self.ep.register(fd, select.EPOLLIN)
        self.callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        if self.callbacks.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def _ready(self) -> None:
        for fd, _ in self.ep.poll(0):
            callback = self.callbacks.get(fd)
            if callback is not None:  # not removed by an earlier callback of this round
                callback()


# One poller per event loop (tests run many loops); it goes, with its epoll fd, with its loop.
_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller] = weakref.WeakKeyDictionary()


def _poller(loop: asyncio.AbstractEventLoop) -> _Poller:
    poller = _pollers.get(loop)
    if poller is None:
        poller = _pollers[loop] = _Poller(loop)
    return poller


class _Child:
    """An attempt's process on the fast path: started on the loop's thread, read and reaped by the loop.

    ``done`` gets the return code once the process has been reaped and both pipes are
    closed; close() undoes everything on any path and kills what is still running.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_output: Callable[[str, str], None]) -> None:
        self.loop = loop
        self.on_output = on_output
        self.done: asyncio.Future[int] = loop.create_future()
        self.pid: int | None = None
        self.code: int | None = None  # once reaped
        self._streams: dict[int, tuple[str, codecs.IncrementalDecoder]] = {}  # our read ends
        self._pidfd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reaper_thread = False  # a pool thread waits for the process (no pidfd)
        self._closed = False
        self._poller: _Poller | None = None

    def start(self, run: Run, path: str, env: dict[str, str]) -> bool:
        """Start the process; False (nothing started, nothing left open) if this path cannot be used."""
        global FAST_SPAWN
        child_ends: list[int] = []
        started = False
        try:
            for name in ("stdout", "stderr"):
                try:
                    r, w = os.pipe()  # both ends close-on-exec: the child keeps only the dup2'd copy
                except OSError as e:
                    raise StartError(126, f"cannot start {run.argv[0]}: {e.strerror or e}") from None
                child_ends.append(w)
                self._streams[r] = (name, codecs.getincrementaldecoder("utf-8")(errors="replace"))
            if min(*self._streams, *child_ends) <= 2:
                return False  # our own stdio is closed: the file actions below would trip over each other
            if not _seal_inherited_fds():
                log.info("starting jobs on threads: cannot list /proc/self/fd")
                FAST_SPAWN = False
                return False
            try:
                self._poller = _poller(self.loop)
            except (NotImplementedError, OSError):  # a loop that cannot watch fds
                return False
            for r in self._streams:
                os.set_blocking(r, False)
                self._poller.add(r, functools.partial(self._readable, r))
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_DUP2, child_ends[0], 1),
                       (os.POSIX_SPAWN_DUP2, child_ends[1], 2)]
            try:
                self.pid = os.posix_spawn(path, run.argv, env, file_actions=actions, setsid=True,
                                          setsigmask=(), setsigdef=_SIGDEF)
            except NotImplementedError as e:  # e.g. no POSIX_SPAWN_SETSID in this libc
                log.info("starting jobs on threads: %s", e)
                FAST_SPAWN = False
                return False
            except OSError as e:
                raise _start_error(run.argv[0], e) from None
            started = True
            run.pid = self.pid
            for w in child_ends:
                os.close(w)
            child_ends.clear()
            if run.kill_signal is not None:  # asked before the process existed
                killpg(self.pid, run.kill_signal)
            self._watch_exit()
            return True
        finally:
            for w in child_ends:
                os.close(w)
            if not started:
                self.close()

    def _watch_exit(self) -> None:
        global FAST_SPAWN
        assert self.pid is not None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):  # an old kernel, or a sandbox
                log.info("starting jobs on threads: pidfd_open: %s", e.strerror or e)
                FAST_SPAWN = False
            # This one is running already: a pool thread waits for it.
            self._wait_on_thread()
            return
        assert self._poller is not None
        self._poller.add(self._pidfd, self._exited)

    def _wait_on_thread(self) -> None:
        assert self.pid is not None
        self._reaper_thread = True
        self.loop.run_in_executor(_pool(), _waitpid, self.pid).add_done_callback(self._reaped_on_thread)

    def _reaped_on_thread(self, fut: asyncio.Future[int]) -> None:
        if not self._closed and not fut.cancelled():
            self._reaped(fut.result())

    def _exited(self) -> None:
        """The pidfd is readable: the process has ended."""
        assert self.pid is not None and self._pidfd is not None and self._poller is not None
        self._poller.remove(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: Popen calls that 0 too
            pid, status = self.pid, 0
        if pid == 0:  # not waitable yet after all: never block the loop on it
            self._wait_on_thread()
            return
        self._reaped(status)

    def _reaped(self, status: int) -> None:
        self.code = os.waitstatus_to_exitcode(status)
        if self._streams:  # children it left behind hold the pipes: give them DRAIN_AFTER_EXIT
            self._timer = self.loop.call_later(DRAIN_AFTER_EXIT, self._drain_over)
        self._maybe_done()

    def _drain_over(self) -> None:
        assert self.pid is not None
        killpg(self.pid, signal.SIGKILL)
        self._timer = self.loop.call_later(READ_AFTER_KILL, self._give_up)  # read what they flushed

    def _give_up(self) -> None:
        """Something outside the group still holds the pipes: let them go."""
        self._timer = None
        rest = []
        for fd, (name, decoder) in list(self._streams.items()):
            rest.append((name, decoder.decode(b"", final=True)))
            self._close_stream(fd)
        self._maybe_done()
        for name, text in rest:
            if text:
                self.on_output(name, text)

    def _readable(self, fd: int) -> None:
        entry = self._streams.get(fd)
        if entry is None:
            return
        name, decoder = entry
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            text = decoder.decode(data)
        else:
            text = decoder.decode(b"", final=True)
            self._close_stream(fd)
            self._maybe_done()
        # Last: should on_output raise, the loop reports it and our state is whole.
        if text:
            self.on_output(name, text)

    def _close_stream(self, fd: int) -> None:
        del self._streams[fd]
        if self._poller is not None:
            self._poller.remove(fd)
        os.close(fd)

    def _maybe_done(self) -> None:
        if self.code is not None and not self._streams:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self.done.done():
                self.done.set_result(self.code)

    def close(self) -> None:
        """Remove the readers, close every fd; if it has not finished, kill the group and see it reaped."""
        if self._closed:
            return
        self._closed = True
        unfinished = not self.done.done() or self.done.cancelled()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fd in list(self._streams):
            self._close_stream(fd)
        if self._pidfd is not None:
            if self._poller is not None:
                self._poller.remove(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self.pid is None or not unfinished:
            return
        killpg(self.pid, signal.SIGKILL)
        if self.code is not None or self._reaper_thread:
            return
        try:
            reaped = os.waitpid(self.pid, os.WNOHANG)[0]
        except ChildProcessError:
            reaped = self.pid
        if reaped == 0:  # not dead yet: a pool thread reaps it, the loop never blocks on it
            try:
                _pool().submit(_waitpid, self.pid)
            except RuntimeError:  # shut down: the worker is exiting, and its zombies go with it
                pass


async def execute(run: Run, on_output: Callable[[str, str], None], kill_grace: float) -> Ended:
    """Run the attempt to its end; ``on_output(stream, text)`` gets output as it comes. The job finds its
    dependencies' results in the file named by $ORCH_INPUTS_PATH and may leave a JSON value of its own in the one
    named by $ORCH_RESULT_PATH (refused over ``run.max_result`` bytes, or when not JSON: a success then fails)."""
    # The job knows who it is: ids to make side effects idempotent across attempts.
    env = {**inherited_env(), **run.env, "ORCH_JOB_ID": str(run.job_id), "ORCH_ATTEMPT": str(run.attempt)}
    # Where it may leave a JSON value (its result, its dependents' input), and where it finds its dependencies'.
    base = os.path.join(files_dir(), f"{run.job_id}-{run.attempt}")
    result_path = env["ORCH_RESULT_PATH"] = base + ".result.json"
    inputs_path: str | None = None
    with contextlib.suppress(OSError):
        os.unlink(result_path)  # one an earlier run of this attempt left (a worker that crashed)
    if run.inputs is not None:
        inputs_path = env["ORCH_INPUTS_PATH"] = base + ".inputs.json"
        try:
            with open(inputs_path, "w", encoding="utf-8") as f:
                f.write(run.inputs)
        except OSError as e:
            return Ended(Outcome.FAILED, None, f"could not write its inputs file: {e.strerror}", 0.0)
    try:
        ended = await _execute(run, on_output, kill_grace, env)
    finally:
        if inputs_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(inputs_path)
    value, refused = read_result(result_path, run.max_result)
    if refused is not None:
        if ended.outcome is Outcome.SUCCEEDED:
            return Ended(Outcome.FAILED, ended.exit_code, refused, ended.duration)
        return ended
    ended.value = value
    return ended


async def _execute(run: Run, on_output: Callable[[str, str], None], kill_grace: float, env: dict[str, str]) -> Ended:
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    child: _Child | None = None
    if FAST_SPAWN and run.cwd is None:
        child = _Child(loop, on_output)
        try:
            if not child.start(run, _resolve(run.argv[0], env.get("PATH", os.defpath)), env):
                child = None
        except StartError as e:
            return Ended(Outcome.FAILED, e.exit_code, e.message, time.monotonic() - started)
    if child is not None:
        done: asyncio.Future[int] = child.done
    else:
        def emit(name: str, text: str) -> None:
            loop.call_soon_threadsafe(on_output, name, text)

        done = loop.run_in_executor(_pool(), _run_blocking, run, env, emit)
    # A stop or the timeout ends it: SIGTERM to the group now, SIGKILL after kill_grace. Timers and
    # a callback, not a task per attempt waiting on them: at thousands of jobs a second they add up.
    stops = Stops(run, functools.partial(run.signal, signal.SIGTERM), functools.partial(run.signal, signal.SIGKILL),
                  kill_grace, done.done)
    try:
        try:
            code = await asyncio.shield(done)  # cancelled ourselves: done carries on, and is killed below
        except StartError as e:
            return Ended(Outcome.FAILED, e.exit_code, e.message, time.monotonic() - started)
    finally:
        stops.disarm()
        if not done.done():  # we are being cancelled ourselves: leave nothing running
            run.signal(signal.SIGKILL)
        if child is not None:
            child.close()  # readers and fds; kills and reaps what is unfinished
    outcome: Outcome | None = None
    error: str | None = None
    if stops.ending is not None:
        outcome, error = stops.ending
    if code < 0:
        exit_code = 128 - code
        sig_error: str | None = f"killed by {signal_name(-code)}"
    else:
        exit_code, sig_error = code, None
    if outcome is None:
        outcome = Outcome.SUCCEEDED if code == 0 else Outcome.FAILED
        error = sig_error
    # Fast path: output was passed on by the loop's readers before ``done`` was set. Threads:
    # the thread queued its output callbacks before its result, so on_output has seen all of it.
    return Ended(outcome, exit_code, error, time.monotonic() - started)


def shutdown() -> None:
    """Let the attempt threads go (they end with their processes)."""
    if _threads is not None:
        _threads.shutdown(wait=False)


class ExecRunner(Runner):
    """Command lines: ``command`` (an argv), ``shell`` (/bin/sh -c) and ``task`` + ``args``."""

    name = "exec"
    summary = "command lines: command, shell, task"

    async def execute(self, run: Run, on_output: Callable[[str, str], None], kill_grace: float) -> Ended:
        return await execute(run, on_output, kill_grace)
