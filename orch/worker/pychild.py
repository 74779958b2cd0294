"""A python runner's child interpreter: runs a worker's Python tasks one at a time, for many tasks.

Started by orch/worker/runners/python.py as ``python -m orch.worker.pychild MODULE...`` (the modules to preload).
It imports nothing of orch beyond this file: what it loads is the user's code.

Its stdin and stdout are the worker's control channel (JSON lines); fds 0, 1 and 2 are then made /dev/null and
two pipes of its own, read by a thread that sends what a task prints to the worker as output messages. Before
a task's result is sent, what it printed is flushed and read to the end: the worker gets a task's output
before its result. Messages to the worker:

- ``{"ready": PID, "failed": [[module, error], ...]}`` once, after the preloads;
- ``{"o": "stdout"|"stderr", "t": TEXT}``;
- ``{"r": {"ok": true, "value": V}}`` or ``{"r": {"ok": false, "error": "Type: message"}}`` (the traceback
  goes to the task's stderr).

A request is ``{"function": "pkg.mod:name", "args": [...], "kwargs": {...}, "env": {...}, "cwd": PATH}``. The
worker's end of stdin closing (the worker died) ends the child at once, whatever it is running.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib
import inspect
import json
import os
import select
import sys
import threading
import traceback
from typing import Any

_send_lock = threading.Lock()
_ctl: Any = None


def send(msg: dict[str, Any]) -> None:
    data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
    with _send_lock:
        _ctl.write(data)
        _ctl.flush()


class Forwarder(threading.Thread):
    """Sends what the task writes to its stdout and stderr pipes as it comes. ``drain()``, on the main thread,
    reads what is left in them itself (under the same lock): all that was written before it is sent when it
    returns, with no thread to wake when there is nothing."""

    def __init__(self, fds: dict[int, str]) -> None:
        super().__init__(daemon=True, name="orch-output")
        self.fds = fds
        self.decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in fds}
        self.lock = threading.Lock()
        self.closed: set[int] = set()
        for fd in fds:
            os.set_blocking(fd, False)

    def _read(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:  # the task closed its fd 1 or 2 (and every copy): nothing more comes from it
                self.closed.add(fd)
                return
            text = self.decoders[fd].decode(data)
            if text:
                send({"o": self.fds[fd], "t": text})
            if len(data) < 65536:
                return

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([f for f in self.fds if f not in self.closed] or [], [], [], None
                                        if len(self.closed) < len(self.fds) else 3600)
            with self.lock:
                for fd in ready:
                    self._read(fd)

    def drain(self) -> None:
        with self.lock:
            for fd in self.fds:
                if fd not in self.closed:
                    self._read(fd)


def _function(path: str, cache: dict[str, Any]) -> Any:
    fn = cache.get(path)
    if fn is None:
        module_name, _, attr = path.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        obj = getattr(obj, "fn", obj) if getattr(obj, "__orch_task__", False) else obj  # an @orch.task
        if not callable(obj):
            raise TypeError(f"{path} is not callable")
        fn = cache[path] = obj
    return fn


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_one(req: dict[str, Any], cache: dict[str, Any], fwd: Forwarder) -> dict[str, Any]:
    env = req.get("env") or {}
    env_before = {k: os.environ.get(k) for k in env}
    cwd_before = os.getcwd()
    try:
        os.environ.update(env)
        if req.get("cwd"):
            os.chdir(req["cwd"])
        fn = _function(req["function"], cache)
        value = fn(*req.get("args", ()), **req.get("kwargs", {}))
        if inspect.isawaitable(value):  # an async function: on the child's one loop, kept between tasks
            value = _loop().run_until_complete(_awaited(value))
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            answer = {"ok": False, "error": f"the return value of {req['function']} is not JSON: {e}"}
        else:
            limit = int(req.get("max_result") or 0)
            if limit and len(text) > limit:  # refused here: a value of gigabytes never crosses the pipe
                answer = {"ok": False, "error": f"its return value is {len(text):,} bytes of JSON, over "
                                                f"scheduler.max_result_bytes ({limit:,})"}
            else:
                answer = {"ok": True, "value": value, "size": len(text)}
    except SystemExit as e:
        answer = {"ok": False, "error": f"SystemExit({e.code!r})", "exit_code": e.code if isinstance(e.code, int)
                  else 1}
    except BaseException as e:  # noqa: BLE001 - the task's, all of it, is the job's error
        traceback.print_exc()
        answer = {"ok": False, "error": _describe(e)[:2000]}
    finally:
        for k, v in env_before.items():  # only what the job set is put back (the task's own changes stay)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            os.chdir(cwd_before)
        except OSError:
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a task that closed its stdout
                pass
        fwd.drain()
    return answer


_the_loop: asyncio.AbstractEventLoop | None = None


def _loop() -> asyncio.AbstractEventLoop:
    global _the_loop
    if _the_loop is None or _the_loop.is_closed():
        _the_loop = asyncio.new_event_loop()
    return _the_loop


async def _awaited(aw: Any) -> Any:
    return await aw


def main() -> None:
    global _ctl
    # The control channel: the worker's pipes, moved off fds 0 and 1.
    req_fd, ctl_fd = os.dup(0), os.dup(1)
    _ctl = os.fdopen(ctl_fd, "wb", buffering=0)
    requests = os.fdopen(req_fd, "rb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    fds: dict[int, str] = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        fds[r] = name
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    fwd = Forwarder(fds)
    fwd.start()

    def orphaned() -> None:
        """The worker's end of the requests pipe closing (it died, or let the child go) ends the child at once,
        mid-task or not. Waits for the hang-up alone: the requests themselves are read by the main thread."""
        watch = select.poll()
        watch.register(req_fd, 0)  # no events asked: poll still reports POLLHUP and POLLERR
        while True:
            for _, ev in watch.poll():
                if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    os._exit(0)

    threading.Thread(target=orphaned, daemon=True, name="orch-orphaned").start()
    cache: dict[str, Any] = {}
    failed = []
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - reported to the worker, which logs it
            failed.append([name, _describe(e)[:500]])
    fwd.drain()
    send({"ready": os.getpid(), "failed": failed})
    for line in requests:
        send({"r": run_one(json.loads(line), cache, fwd)})


if __name__ == "__main__":
    main()
