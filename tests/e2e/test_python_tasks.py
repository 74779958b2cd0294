"""End to end: Python tasks and the SDK (issue 14, point 3) with real `orch` processes, once per storage backend.

A function decorated with ``@orch.task`` is submitted from this process through the SDK and run by a worker's
python runner in a long-lived child interpreter: its return value comes back, a raised exception fails it with
its traceback in the output, children are preloaded (--import), reused, and replaced after a crash, a timeout
and python.max_tasks tasks; a worker killed with -9 leaves no child behind and its job runs elsewhere."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import client_token, http, start_scheduler, start_worker, wait_until, workers_alive

pytestmark = pytest.mark.e2e

TASKS = '''
import json, os, sys, time
from orch import task

MARK = os.environ.get("SHOP_MARK")
if MARK:  # each child interpreter that imports this module says so, once
    with open(MARK, "a") as f:
        f.write(f"{os.getpid()}\\n")

@task(max_attempts=1, timeout=60)
def resize(path: str, width: int) -> dict:
    print(f"resizing {path} to {width}")
    return {"path": path, "width": width}

@task(max_attempts=1)
def broken(n: int) -> None:
    raise ValueError(f"cannot handle {n}")

@task(max_attempts=1)
def opaque() -> object:
    return {1, 2}

@task(max_attempts=1)
def bulky() -> str:
    return "x" * (100 << 10)

@task(max_attempts=1)
def crash() -> None:
    os._exit(9)

@task(max_attempts=1, timeout=1)
def sleepy() -> None:
    time.sleep(60)

@task(max_attempts=1)
def pid() -> int:
    return os.getpid()

@task(max_attempts=1)
def total() -> int:
    got = json.load(open(os.environ["ORCH_INPUTS_PATH"]))
    return sum(v["value"]["width"] for v in got.values())

@task(max_attempts=2)
def slow_once(marker: str) -> str:
    print("child", os.getpid(), flush=True)
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)
    return "done"

async def doubled(x: int) -> int:
    return 2 * x
'''


@pytest.fixture
def tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    lib = tmp_path / "tasklib"
    lib.mkdir()
    (lib / "shop_tasks.py").write_text(TASKS)
    monkeypatch.syspath_prepend(str(lib))
    sys.modules.pop("shop_tasks", None)
    import shop_tasks

    yield shop_tasks
    sys.modules.pop("shop_tasks", None)


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str], tasks: Any,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str], Any]]:
    env = {**orch_env, "PYTHONPATH": str(tmp_path / "tasklib"), "SHOP_MARK": str(tmp_path / "marks"),
           "ORCH_PYTHON_MAX_TASKS": "5", "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.3", "ORCH_SCHEDULER_LEASE_TTL": "2"}
    sched, url = start_scheduler(tmp_path, env)
    worker = start_worker(tmp_path, env, url, "w1", concurrency=2, extra=["--import", "shop_tasks"])
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        # The SDK finds the scheduler and the token as the CLI does.
        monkeypatch.setenv("ORCH_SERVER", url)
        monkeypatch.setenv("ORCH_DATA_DIR", env["ORCH_DATA_DIR"])
        monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
        yield url, env, worker
    finally:
        import orch.sdk

        if orch.sdk._default is not None:
            orch.sdk._default.close()
            orch.sdk._default = None
        worker.stop()
        sched.stop()


def _marks(tmp_path: Path) -> list[int]:
    path = tmp_path / "marks"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_a_task_returns_its_value_and_a_raised_exception_fails_it_with_its_traceback(
        cluster: tuple[str, dict[str, str], Any], tasks: Any) -> None:
    from orch import Client, JobFailed
    from orch.core.errors import ValidationError

    job = tasks.resize.submit("/data/a.png", width=640)  # the issue's own lines, on the default client
    assert job.result(timeout=30) == {"path": "/data/a.png", "width": 640}
    assert job.status() == "succeeded"
    info = job.info()
    assert info["spec"]["python"] == {"function": "shop_tasks:resize", "args": ["/data/a.png"],
                                      "kwargs": {"width": 640}}
    assert info["result"]["stdout"] == "resizing /data/a.png to 640\n"
    assert info["command"] == 'shop_tasks:resize("/data/a.png", width=640)'
    # run: the submit and the wait for the end in one request, the return value back.
    assert tasks.resize.run("/data/b.png", width=320) == {"path": "/data/b.png", "width": 320}

    with Client(cluster[0], token=client_token()) as client:
        failed = client.submit(tasks.broken, 7)
        with pytest.raises(JobFailed) as err:
            failed.result(timeout=30)
        assert err.value.state == "failed"
        assert err.value.error == "ValueError: cannot handle 7"
        assert "Traceback (most recent call last)" in err.value.stderr
        assert 'raise ValueError(f"cannot handle {n}")' in err.value.stderr

        with pytest.raises(JobFailed) as err:  # the same through run, in one request
            client.run(tasks.broken, 8)
        assert err.value.error == "ValueError: cannot handle 8" and "Traceback" in err.value.stderr
        assert client.run({"python": {"function": "shop_tasks:doubled", "args": [4]}, "max_attempts": 1}) == 8

        with pytest.raises(JobFailed) as err:
            client.submit(tasks.opaque).result(timeout=30)
        assert "return value of shop_tasks:opaque is not JSON" in (err.value.error or "")

        # A value over scheduler.max_result_bytes (64 KiB) is refused in the child: it never crosses the pipe.
        with pytest.raises(JobFailed) as err:
            client.submit(tasks.bulky).result(timeout=30)
        assert "over scheduler.max_result_bytes (65,536)" in (err.value.error or "")

        # Arguments that are not JSON are refused at the submit, naming the argument, before any request.
        with pytest.raises(ValidationError) as bad:
            tasks.resize.spec(Path("/x"), width=3)
        assert bad.value.field == "args[0]"
        with pytest.raises(ValidationError) as bad:
            tasks.resize.spec("/x", width=float("nan"))
        assert bad.value.field == "kwargs.width"

        # An async function is a task too, run on the child's own loop.
        spec = {"python": {"function": "shop_tasks:doubled", "args": [21]}, "max_attempts": 1}
        assert client.submit(spec).result(timeout=30) == 42

        # A function the worker cannot import fails saying so.
        missing = client.submit({"python": {"function": "shop_tasks:nowhere"}, "max_attempts": 1})
        with pytest.raises(JobFailed) as err:
            missing.result(timeout=30)
        assert "AttributeError" in (err.value.error or "") and "nowhere" in (err.value.error or "")

    # A bad python spec over HTTP is a 400 naming the field.
    status, body = http("POST", cluster[0] + "/v1/jobs", {"python": {"function": "not a path"}})
    assert status == 400 and body["error"]["field"] == "python.function", body


def test_children_are_preloaded_reused_and_replaced_after_a_crash_a_timeout_and_max_tasks(
        cluster: tuple[str, dict[str, str], Any], tasks: Any, tmp_path: Path) -> None:
    from orch import Client, JobFailed

    # --import: both children of the pool (concurrency 2) imported the module before any job.
    wait_until(lambda: len(_marks(tmp_path)) == 2, 30, "two preloaded children")
    preloaded = set(_marks(tmp_path))
    with Client(cluster[0], token=client_token()) as client:
        first = client.results([client.submit(tasks.pid) for _ in range(4)], timeout=60)
        assert set(first) <= preloaded  # no new interpreter for them: import cost paid once

        # A crash fails the job saying what happened; the child is replaced.
        with pytest.raises(JobFailed) as err:
            client.submit(tasks.crash).result(timeout=30)
        assert "python child interpreter exited with code 9" in (err.value.error or "")
        # A timeout kills the child (a function cannot be interrupted otherwise).
        started = time.monotonic()
        with pytest.raises(JobFailed) as err:
            client.submit(tasks.sleepy).result(timeout=30)
        assert "timed out after 1s" in (err.value.error or "") and time.monotonic() - started < 20

        # python.max_tasks (5 here): a child that ran 5 tasks is replaced. One at a time, 12 tasks cannot all
        # have run in the two children there were.
        pids = [client.submit(tasks.pid).result(timeout=30) for _ in range(12)]
        assert len(set(pids)) >= 3, pids
        assert all(p in _marks(tmp_path) for p in pids)  # each new child imported the module once, at its start
        # Every child that ran a task did it in a process of its own, never the worker's.
        assert not {int(p) for p in pids} & {os.getpid()}


def test_a_workflow_from_handles_and_the_async_client_waiting_for_many(
        cluster: tuple[str, dict[str, str], Any], tasks: Any) -> None:
    from orch import AsyncClient

    async def main() -> None:
        async with AsyncClient(cluster[0], token=client_token()) as client:
            a = await client.submit(tasks.resize, "a", width=10)
            b = await client.submit(tasks.resize, "b", width=20)
            summed = await client.submit(tasks.total.options(depends_on=[a, b]).spec())
            assert await summed.result(timeout=60) == 30
            # A whole workflow in one atomic batch: refs and depends_on.
            batch = await client.submit_many([
                tasks.resize.options(ref="x").spec("x", width=1),
                tasks.resize.options(ref="y").spec("y", width=2),
                tasks.total.options(ref="sum", depends_on=["x", "y"]).spec()])
            assert await batch[2].result(timeout=60) == 3
            many = [await client.submit(tasks.resize, f"p{i}", width=i) for i in range(30)]
            values = await client.results(many, timeout=60)
            assert [v["width"] for v in values] == list(range(30))
            assert await tasks.resize.run_async(client, "r", width=5) == {"path": "r", "width": 5}

    asyncio.run(main())


def test_a_worker_killed_mid_task_leaves_no_child_and_its_job_runs_elsewhere(
        cluster: tuple[str, dict[str, str], Any], tasks: Any, tmp_path: Path) -> None:
    from orch import Client

    url, env, w1 = cluster
    with Client(url, token=client_token()) as client:
        job = client.submit(tasks.slow_once, str(tmp_path / "once"))
        out = wait_until(lambda: (client.job(job.id).info().get("result") or {}).get("stdout", "")
                         or None, 30, "the task's first line")
        child = int(out.split()[1])
        w1.kill9()
        # The child sees its worker's end of the pipe close and ends itself, mid-task.
        wait_until(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), 15, "the orphaned child to end")
        w2 = start_worker(tmp_path, env, url, "w2", concurrency=1)
        try:
            assert job.result(timeout=60) == "done"
            assert job.info()["attempt"] == 2
        finally:
            w2.stop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True
