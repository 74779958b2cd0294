"""The Python SDK: tasks as functions, submitted to an orch cluster and awaited for their return values.

    from orch import Client, task

    @task(queue="default", max_attempts=5, timeout=60)
    def resize(path: str, width: int) -> dict: ...

    job = resize.submit("/data/a.png", width=640)   # a Job: .id, .status(), .result(timeout=)
    print(job.result(timeout=30))                   # the return value, or raises JobFailed
    print(resize.run("/data/b.png", width=320))     # submit and wait in one request: the return value

A task is a function a worker can import (``pkg.mod:name``): a job of it is ``{"python": {"function", "args",
"kwargs"}}``, run by a worker's python runner in a long-lived child interpreter. Its arguments must be JSON
(checked at the submit, naming the one that is not); its return value comes back as JSON.

``Client`` is synchronous (it runs its own event loop on a thread); ``AsyncClient`` is the same for asyncio
code. Both find the scheduler and the client token as the CLI does (ORCH_SERVER, ORCH_TOKEN, the config file,
the data dir's tokens.json), or take them as arguments. ``task.submit`` uses a default Client made on first use.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, Iterable, Mapping, ParamSpec, Sequence, TypeVar, overload

from orch.client import Client as _HttpClient
from orch.core.errors import ApiError, OrchError, ValidationError
from orch.core.states import JobState

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

TERMINAL = frozenset(s.value for s in JobState if s.terminal)  # the states a job ends in
OPTION_NAMES = frozenset({"queue", "priority", "max_attempts", "timeout", "name", "labels", "env", "cwd", "backoff",
                          "retry_on_exit", "run_at", "delay", "idempotency_key", "rate_keys", "concurrency",
                          "depends_on", "ref"})
RUN_WAIT = 30.0  # seconds a run's submit holds for the end; then it waits on in GET /v1/jobs/{id}/wait
Dependency = Any  # a Job, a job id, a ref of the same batch, or {"job": ..., "on": ...}


class JobFailed(OrchError):
    """A job ended otherwise than succeeded: ``job`` is its JSON (``state``, ``error``, ``result`` with its
    output tail: a Python task's traceback is in ``result["stderr"]``)."""

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        self.state = str(job.get("state"))
        result = job.get("result") or {}
        self.error = job.get("error") or result.get("error")
        self.stderr = result.get("stderr") or ""
        tail = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
        extra = f" ({tail[0][:300]})" if tail and (not self.error or tail[0] not in self.error) else ""
        super().__init__(f"job {job.get('id')} {self.state}: {self.error or 'no error given'}{extra}")


class WaitTimeout(OrchError):
    """The job had not ended when the timeout passed (it goes on)."""


def _check_json(value: Any, where: str) -> None:
    """Raise ValidationError naming ``where`` (and the place within it) if ``value`` is not plain JSON."""
    def walk(v: Any, at: str, depth: int) -> None:
        if depth > 100:
            raise ValidationError(f"{at} is nested too deep for JSON", field=at)
        if v is None or isinstance(v, (bool, str)):
            return
        if isinstance(v, int):
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValidationError(f"{at} is {v!r}, which JSON cannot carry", field=at)
            return
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{at}[{i}]", depth + 1)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValidationError(f"{at} has a key {k!r} that is not a string", field=at)
                walk(x, f"{at}.{k}", depth + 1)
            return
        raise ValidationError(f"{at} is a {type(v).__name__}, which is not JSON (pass str, int, float, bool, None, "
                              "lists and dicts of them)", field=at)

    walk(value, where, 0)


def _dep(d: Dependency) -> Any:
    if isinstance(d, (Job, AsyncJob)):
        return d.id
    if isinstance(d, dict) and isinstance(d.get("job"), (Job, AsyncJob)):
        return {**d, "job": d["job"].id}
    return d


def _path_of(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    if module == "__main__":  # run as a script: the worker imports it by the name it would have as a module
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
        else:
            file = getattr(main, "__file__", None)
            module = Path(file).stem if file else None
    qual = getattr(fn, "__qualname__", "")
    if not module or "<" in qual:
        raise TypeError(f"{qual or fn!r} cannot be a task: a worker imports tasks by module and name, so define it "
                        "at the top level of a module")
    return f"{module}:{qual}"


class Task(Generic[P, R]):
    """A function made a task by ``@task``. Calling it runs it here; ``submit`` runs it on the cluster."""

    __orch_task__ = True

    def __init__(self, fn: Callable[P, R], options: Mapping[str, Any], function: str | None = None,
                 client: Client | None = None) -> None:
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown task option {unknown[0]!r}")
        self.fn = fn
        self.function = function or _path_of(fn)
        self.defaults = dict(options)
        self.client = client
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def options(self, **options: Any) -> Task[P, R]:
        """The same task with other job options for its next submits: ``resize.options(queue="gpu",
        depends_on=[job]).submit(...)``."""
        return Task(self.fn, {**self.defaults, **options}, self.function, self.client)

    def spec(self, *args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
        """The job spec of a call (for batches and workflows: ``client.submit_many([...])``)."""
        _check_json(list(args), "args")
        _check_json(kwargs, "kwargs")
        body: dict[str, Any] = {"function": self.function}
        if args:
            body["args"] = list(args)
        if kwargs:
            body["kwargs"] = dict(kwargs)
        spec: dict[str, Any] = {"python": body}
        for k, v in self.defaults.items():
            if v is None:
                continue
            spec[k] = [_dep(d) for d in v] if k == "depends_on" else v
        if "name" not in spec:
            spec["name"] = self.function
        return spec

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Submit a call; the Job is answered once the scheduler has it (durably)."""
        client = self.client or default_client()
        return client.submit(self.spec(*args, **kwargs))

    async def submit_async(self, client: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> AsyncJob:
        return await client.submit(self.spec(*args, **kwargs))

    def run(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run a call on the cluster and return its return value (JobFailed if it did not succeed): the submit
        and the wait for its end in one request. Waits as long as it takes (the task's timeout bounds it)."""
        client = self.client or default_client()
        return client.run(self.spec(*args, **kwargs))

    async def run_async(self, client: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> Any:
        return await client.run(self.spec(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<orch task {self.function}>"


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(*, queue: str | None = ..., max_attempts: int | None = ..., timeout: float | None = ...,
         priority: int | None = ..., name: str | None = ..., labels: Mapping[str, str] | None = ...,
         client: Client | None = ..., **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(fn: Any = None, /, *, client: Client | None = None, **options: Any) -> Any:
    """Make a function a task: ``@task`` or ``@task(queue=..., max_attempts=..., timeout=..., ...)`` with any
    job option (queue, priority, max_attempts, timeout, labels, env, backoff, concurrency, ...)."""
    if fn is not None:
        return Task(fn, options, client=client)

    def wrap(f: Callable[P, R]) -> Task[P, R]:
        return Task(f, options, client=client)

    return wrap


def _settings(server: str | None, token: str | None, ca: str | None) -> tuple[str, str | None, str | None]:
    """The scheduler, token and CA, found as the CLI finds them."""
    from orch.auth import pick
    from orch.config import load_settings

    settings = load_settings(None, {"client.server": server} if server else {})
    return (settings["client.server"], pick(token, settings["auth.token"], settings.data_dir, "client"),
            ca or settings["tls.ca"] or None)


def _value(job: Mapping[str, Any]) -> Any:
    if job.get("state") != JobState.SUCCEEDED.value:
        raise JobFailed(job)
    result = job.get("result") or {}
    return result.get("value")


class AsyncJob:
    """A submitted job, for asyncio code."""

    def __init__(self, client: AsyncClient, job_id: int, info: Mapping[str, Any] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.last: dict[str, Any] = dict(info or {})

    async def info(self) -> dict[str, Any]:
        self.last = await self.client.http.job(self.id)
        return self.last

    async def status(self) -> str:
        return str((await self.info())["state"])

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The job once it has ended (its JSON); WaitTimeout if it has not within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
            job = await self.client.http.wait(self.id, timeout=left)
            self.last = job
            if job.get("state") in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {self.id} is still {job.get('state')} after {timeout:g}s")

    async def result(self, timeout: float | None = None) -> Any:
        """Its return value (a Python task's) or result value; JobFailed if it did not succeed."""
        return _value(await self.wait(timeout))

    async def cancel(self) -> dict[str, Any]:
        return await self.client.http.cancel(self.id)

    async def retry(self) -> dict[str, Any]:
        return await self.client.http.retry(self.id)

    def __repr__(self) -> str:
        return f"<orch job {self.id}>"


class AsyncClient:
    """The SDK's client for asyncio code: ``async with AsyncClient() as c: job = await c.submit(spec)``."""

    def __init__(self, server: str | None = None, *, token: str | None = None, ca: str | None = None) -> None:
        self.server, self.token, self.ca = _settings(server, token, ca)
        self.http = _HttpClient(self.server, token=self.token, ca=self.ca)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.close()

    async def submit(self, spec: Mapping[str, Any] | Task[..., Any], *args: Any, **kwargs: Any) -> AsyncJob:
        """Submit a job spec (a dict, ``task.spec(...)``), or a task with its arguments."""
        if isinstance(spec, Task):
            spec = spec.spec(*args, **kwargs)
        body = _prepared(spec)
        got = await self.http.submit(body)
        return AsyncJob(self, int(got["id"]), got)

    async def run(self, spec: Mapping[str, Any] | Task[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit a job (as ``submit``) and return its return value or result value once it has ended (JobFailed
        if it did not succeed). One request does both (``POST /v1/jobs?wait=``), asked again while it runs on.
        If it raises ServerUnavailable (the connection broke while it waited), the job may have been submitted
        and may run: give the spec an ``idempotency_key`` to run it once however often this is retried."""
        if isinstance(spec, Task):
            spec = spec.spec(*args, **kwargs)
        got = await self.http.submit(_prepared(spec), wait=RUN_WAIT)
        if got.get("state") in TERMINAL:
            return _value(got)
        return await AsyncJob(self, int(got["id"]), got).result()

    async def submit_many(self, specs: Iterable[Mapping[str, Any]]) -> list[AsyncJob]:
        """Submit jobs in one atomic batch (a workflow: ``ref`` names a job, ``depends_on`` names refs, ids or
        Jobs). All or none are submitted."""
        got = await self.http.submit_many([_prepared(s) for s in specs])
        return [AsyncJob(self, int(j["id"]), j) for j in got]

    def job(self, job_id: int) -> AsyncJob:
        return AsyncJob(self, int(job_id))

    async def wait_all(self, jobs: Sequence[AsyncJob | int], timeout: float | None = None) -> list[dict[str, Any]]:
        """Every job once it has ended, in the order given (one long-poll at a time for all of them)."""
        ids = [j.id if isinstance(j, AsyncJob) else int(j) for j in jobs]
        left_ids = list(dict.fromkeys(ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while left_ids:
            for at in range(0, len(left_ids), 1000):
                part = left_ids[at:at + 1000]
                left = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
                reply = await self.http.wait_many(part, timeout=left)
                done = {int(j["id"]) for j in reply.get("ended", ())}
                left_ids = [i for i in left_ids if i not in done]
            if left_ids and deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"{len(left_ids)} of {len(set(ids))} jobs had not ended after {timeout:g}s")
        found = dict(zip(dict.fromkeys(ids), await asyncio.gather(*(self.http.job(i) for i in dict.fromkeys(ids))),
                         strict=True))
        return [found[i] for i in ids]

    async def results(self, jobs: Sequence[AsyncJob | int], timeout: float | None = None) -> list[Any]:
        """Every job's return value, in order; JobFailed for the first that did not succeed."""
        return [_value(j) for j in await self.wait_all(jobs, timeout)]


def _prepared(spec: Mapping[str, Any]) -> dict[str, Any]:
    body = dict(spec)
    if "depends_on" in body:
        body["depends_on"] = [_dep(d) for d in body["depends_on"]]
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"the job spec is not JSON: {e}") from None
    return body


class _Loop:
    """An event loop on a thread of its own, for the sync client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="orch-sdk", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("the sync orch Client cannot be used on its own loop's thread")
        return asyncio.run_coroutine_threadsafe(_awaited(coro), self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


async def _awaited(coro: Awaitable[T]) -> T:
    return await coro


class Job:
    """A submitted job: ``.id``, ``.status()``, ``.info()``, ``.wait()``, ``.result(timeout=)``, ``.cancel()``."""

    def __init__(self, client: Client, inner: AsyncJob) -> None:
        self.client = client
        self.inner = inner
        self.id = inner.id

    def info(self) -> dict[str, Any]:
        return self.client._run(self.inner.info())

    def status(self) -> str:
        return self.client._run(self.inner.status())

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return self.client._run(self.inner.wait(timeout))

    def result(self, timeout: float | None = None) -> Any:
        return self.client._run(self.inner.result(timeout))

    def cancel(self) -> dict[str, Any]:
        return self.client._run(self.inner.cancel())

    def retry(self) -> dict[str, Any]:
        return self.client._run(self.inner.retry())

    def __repr__(self) -> str:
        return f"<orch job {self.id}>"


class Client:
    """The SDK's synchronous client: ``Client()`` (found as the CLI finds it) or ``Client("host:8080",
    token=...)``. Safe to share between threads."""

    def __init__(self, server: str | None = None, *, token: str | None = None, ca: str | None = None) -> None:
        self._loop = _Loop()
        try:
            self._async = self._loop.run(_make_async(server, token, ca))
        except BaseException:
            self._loop.stop()
            raise
        self.server = self._async.server

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run(coro)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            self._loop.stop()

    def submit(self, spec: Mapping[str, Any] | Task[..., Any], *args: Any, **kwargs: Any) -> Job:
        return Job(self, self._run(self._async.submit(spec, *args, **kwargs)))

    def submit_many(self, specs: Iterable[Mapping[str, Any]]) -> list[Job]:
        return [Job(self, j) for j in self._run(self._async.submit_many(list(specs)))]

    def run(self, spec: Mapping[str, Any] | Task[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit a job and return its value once it has ended, in one request (see ``AsyncClient.run``)."""
        return self._run(self._async.run(spec, *args, **kwargs))

    def job(self, job_id: int) -> Job:
        return Job(self, self._async.job(job_id))

    def wait_all(self, jobs: Sequence[Job | int], timeout: float | None = None) -> list[dict[str, Any]]:
        return self._run(self._async.wait_all([j.id if isinstance(j, Job) else j for j in jobs], timeout))

    def results(self, jobs: Sequence[Job | int], timeout: float | None = None) -> list[Any]:
        return self._run(self._async.results([j.id if isinstance(j, Job) else j for j in jobs], timeout))


async def _make_async(server: str | None, token: str | None, ca: str | None) -> AsyncClient:
    return AsyncClient(server, token=token, ca=ca)


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The Client ``task.submit`` uses: made on first use, as the CLI would find the scheduler."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
            atexit.register(_default.close)
        return _default


__all__ = ["ApiError", "AsyncClient", "AsyncJob", "Client", "Job", "JobFailed", "Task", "WaitTimeout",
           "default_client", "task"]
