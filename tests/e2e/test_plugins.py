"""End to end: runners from plugins and the routing of jobs by runner (issue 14, points 1 and 2), with real
`orch` processes, once per storage backend. A job of a runner no live worker has waits, and `orch why` says so;
a worker that loads the plugin (by the plugins setting) advertises it and runs the job; a broken plugin is one
line in the worker's log and nothing more; `orch plugins` lists what entry points and the setting bring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from helpers import ROOT, ended, http, run_cli, start_scheduler, start_worker, submit, wait_until, workers_alive

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "orch-hello-runner"


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    # No Docker engine for w1, whatever this machine has: its docker runner is unavailable.
    env = {**orch_env, "ORCH_DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    sched, url = start_scheduler(tmp_path, env)
    w1 = start_worker(tmp_path, env, url, "w1", concurrency=2)
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        yield url, env
    finally:
        w1.stop()
        sched.stop()


def test_a_job_waits_for_a_worker_with_its_runner_and_why_says_so(cluster: tuple[str, dict[str, str]],
                                                                    tmp_path: Path) -> None:
    url, env = cluster
    jid = submit(url, {"runner": "hello", "params": {"name": "Ada", "times": 2}, "max_attempts": 1})
    status, why = http("GET", f"{url}/v1/jobs/{jid}/why")
    assert status == 200 and why["reason"] == "no_runner", why
    assert "no live worker has runner hello" in why["message"]
    status, body = http("GET", url + "/v1/workers")
    assert body["workers"][0]["runners"] == ["exec", "python"]
    # A machine without Docker: the runner is unavailable, said once in the log, and its jobs wait.
    assert "runner docker is unavailable here: no Docker engine answers at unix:///nonexistent/docker.sock" in \
        (tmp_path / "w1.log").read_text()
    djid = submit(url, {"docker": {"image": "busybox"}})
    status, why = http("GET", f"{url}/v1/jobs/{djid}/why")
    assert why["reason"] == "no_runner" and "no live worker has runner docker" in why["message"], why
    assert http("POST", f"{url}/v1/jobs/{djid}/cancel")[0] == 200
    # w1 never takes it, however often it asks.
    assert http("GET", f"{url}/v1/jobs/{jid}")[1]["state"] == "queued"

    # A second worker loads the example plugin by the plugins setting (and a broken one beside it).
    w2 = start_worker(tmp_path, {**env, "PYTHONPATH": str(EXAMPLE)}, url, "w2", concurrency=1,
                      extra=["--plugin", "orch_hello:HelloRunner", "--plugin", "no_such_plugin"])
    try:
        job = ended(url, jid, 60)
        assert job["state"] == "succeeded", job
        assert job["worker"] and job["result"]["value"] == {"greeted": "Ada"}
        assert job["result"]["stdout"] == "hello, Ada!\nhello, Ada!\n"
        assert job["command"] == 'hello {"name":"Ada","times":2}'
        named = [w for w in http("GET", url + "/v1/workers")[1]["workers"] if w["name"] == "w2"]
        assert "hello" in named[0]["runners"]
        log = (tmp_path / "w2.log").read_text()
        broken = [line for line in log.splitlines() if "no_such_plugin" in line]
        assert len(broken) == 1 and "is broken and left out" in broken[0], log
        # The runner checks its own params: a bad job fails saying why, on the worker.
        bad = ended(url, submit(url, {"runner": "hello", "params": {"times": 2}, "max_attempts": 1}), 60)
        assert bad["state"] == "failed" and "params.name" in bad["error"], bad
    finally:
        w2.stop()

    # Built-in names and malformed ones are refused at the submit, naming the field.
    for spec, field in (({"runner": "docker"}, "runner"), ({"runner": "Bad Name"}, "runner"),
                        ({"runner": "hello", "params": [1]}, "params"), ({"command": ["x"], "params": {}}, "params")):
        status, body = http("POST", url + "/v1/jobs", spec)
        assert status == 400 and body["error"]["field"] == field, (spec, body)


def test_orch_plugins_lists_entry_points_and_the_plugins_setting(tmp_path: Path, orch_env: dict[str, str]) -> None:
    # An installed distribution, as pip leaves one: the module and its dist-info with the entry point.
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "orch_hello.py", site / "orch_hello.py")
    info = site / "orch_hello_runner-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orch-hello-runner\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[orch.runners]\nhello = orch_hello:HelloRunner\n")
    env = {**orch_env, "PYTHONPATH": str(site), "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    got = run_cli(["plugins", "--json"], env)
    assert got.returncode == 0, got.stderr
    runners = {r["name"]: r for r in json.loads(got.stdout)["runners"]}
    assert runners["hello"]["source"] == "entry point of orch-hello-runner 0.1.0"
    assert runners["hello"]["status"] == "available"
    assert runners["exec"]["source"] == runners["python"]["source"] == "built in"
    # Without an engine the docker runner is unavailable, saying so; nothing else changes.
    assert runners["docker"]["status"] == "unavailable"
    assert "no Docker engine answers at unix:///nonexistent/docker.sock" in runners["docker"]["detail"]

    # A file by its path (the zipapp's way), and a broken plugin: listed, exit 1.
    broken = run_cli(["plugins", "--plugin", str(EXAMPLE / "orch_hello.py") + ":HelloRunner"],
                     {**orch_env, "ORCH_PLUGINS": "no_such_plugin"})
    assert broken.returncode == 1
    lines = broken.stdout.splitlines()
    assert any(line.startswith("hello") and "plugins setting" in line for line in lines), broken.stdout
    assert any("no_such_plugin" in line and "broken" in line for line in lines), broken.stdout
