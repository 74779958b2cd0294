"""End to end: the docker runner (issue 14, point 4) against a real Docker engine, with real `orch` processes,
once per storage backend. The engine is DOCKER_HOST's or a dockerd the tests start (tests/dockerd.py); the image
is built locally, FROM scratch with a static busybox (no registry is reachable)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import ended, http, start_scheduler, start_worker, submit, wait_until, workers_alive

# The runner speaks to the engine, not the store: once, on SQLite (routing by runner runs on both backends in
# test_plugins.py and test_python_tasks.py).
pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]

IMAGE = "orch-test-busybox"


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    (d / "data.txt").write_text("from the host\n")
    os.chmod(d, 0o777)
    return d


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str], docker_engine: Any,
            shared: Path) -> Iterator[tuple[str, dict[str, str], Any]]:
    env = {**orch_env, "ORCH_DOCKER_HOST": docker_engine.host, "ORCH_DOCKER_VOLUMES": str(shared),
           "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.3", "ORCH_SCHEDULER_LEASE_TTL": "2", "ORCH_WORKER_KILL_GRACE": "1"}
    sched, url = start_scheduler(tmp_path, env)
    worker = start_worker(tmp_path, env, url, "w1", concurrency=4)
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        yield url, env, worker
    finally:
        worker.stop()
        sched.stop()


def _docker(command: list[str], **more: Any) -> dict[str, Any]:
    return {"docker": {"image": IMAGE, "command": command, "network": "none", "pull": "never",
                       **more.pop("docker", {})}, "max_attempts": 1, **more}


def _containers(engine: Any, job_id: int) -> list[dict[str, Any]]:
    return engine.containers(f"org.orch.job={job_id}")


def test_a_container_streams_its_output_is_stopped_on_cancel_and_timeout_and_removed(
        cluster: tuple[str, dict[str, str], Any], docker_engine: Any, shared: Path) -> None:
    url = cluster[0]
    status, body = http("GET", url + "/v1/workers")
    assert "docker" in body["workers"][0]["runners"], body

    # Exit code, env, stdout and stderr, a volume from the allow-list.
    jid = submit(url, _docker(["sh", "-c", "echo out $GREETING $ORCH_JOB_ID; echo err >&2; cat /in/data.txt; exit 3"],
                              docker={"env": {"GREETING": "hi"}, "volumes": [f"{shared}:/in:ro"]}))
    job = ended(url, jid, 60)
    assert (job["state"], job["exit_code"]) == ("failed", 3), job
    assert job["result"]["stdout"] == f"out hi {jid}\nfrom the host\n"
    assert job["result"]["stderr"] == "err\n"
    assert job["command"] == f"docker {IMAGE} sh -c 'echo out $GREETING $ORCH_JOB_ID; echo err >&2; cat " \
                             "/in/data.txt; exit 3'"
    wait_until(lambda: not _containers(docker_engine, jid), 15, "its container to be removed")

    # Output streams live; the container is named and labelled; a cancel stops and removes it.
    jid = submit(url, _docker(["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done"]))
    wait_until(lambda: "tick 3" in http("GET", f"{url}/v1/jobs/{jid}/output")[1].get("stdout", ""), 30,
               "live output")
    (c,) = _containers(docker_engine, jid)
    assert c["Labels"]["org.orch.attempt"] == "1" and c["Labels"]["org.orch.worker"] == "w1"
    assert c["Names"][0].startswith(f"/orch-{jid}-1-")
    assert http("POST", f"{url}/v1/jobs/{jid}/cancel")[0] == 200
    assert ended(url, jid, 30)["state"] == "cancelled"
    wait_until(lambda: not _containers(docker_engine, jid), 15, "the cancelled container to be removed")

    # A timeout: SIGTERM (which sleep as pid 1 ignores), SIGKILL after worker.kill_grace, removed.
    jid = submit(url, _docker(["sleep", "300"], timeout=1))
    job = ended(url, jid, 30)
    assert "timed out after 1s" in job["error"], job
    wait_until(lambda: not _containers(docker_engine, jid), 15, "the timed-out container to be removed")

    # The memory limit: an OOM kill says so.
    jid = submit(url, _docker(["sh", "-c", "x=a; while true; do x=$x$x; done"], docker={"memory": "8m"}))
    job = ended(url, jid, 60)
    assert job["state"] == "failed" and "out of memory" in job["error"] and job["exit_code"] == 137, job

    # A volume outside the worker's docker.volumes, and an image that is not there with pull never.
    job = ended(url, submit(url, _docker(["true"], docker={"volumes": ["/etc:/x"]})), 30)
    assert job["state"] == "failed" and "volume /etc is not allowed on this worker" in job["error"], job
    job = ended(url, submit(url, {"docker": {"image": "no-such-image:1", "pull": "never"}, "max_attempts": 1}), 30)
    assert "image no-such-image:1 is not on this machine" in job["error"], job
    job = ended(url, submit(url, _docker(["true"])), 30)
    assert job["state"] == "succeeded", job

    # Bad docker specs are refused at the submit, naming the field.
    for spec, field in (({"docker": {}}, "docker.image"), ({"docker": {"image": IMAGE, "memory": "1m"}}, "docker.memory"),
                        ({"docker": {"image": IMAGE, "volumes": ["relative:/x"]}}, "docker.volumes"),
                        ({"docker": {"image": IMAGE, "pull": "sometimes"}}, "docker.pull"),
                        ({"docker": {"image": IMAGE, "privileged": True}}, "docker.privileged")):
        status, body = http("POST", url + "/v1/jobs", spec)
        assert status == 400 and body["error"]["field"] == field, (spec, body)


def test_a_worker_started_again_removes_the_containers_a_killed_worker_left(
        cluster: tuple[str, dict[str, str], Any], docker_engine: Any, shared: Path, tmp_path: Path) -> None:
    url, env, w1 = cluster
    jid = submit(url, _docker(["sh", "-c", "if [ -e /in/once ]; then echo second; else touch /in/once; sleep 300; fi"],
                              docker={"volumes": [f"{shared}:/in"]}, max_attempts=2))
    wait_until(lambda: (shared / "once").exists(), 30, "the first attempt to start")
    (left,) = _containers(docker_engine, jid)
    w1.kill9()
    assert [c["State"] for c in _containers(docker_engine, jid)] == ["running"]  # the engine keeps it
    w2 = start_worker(tmp_path, env, url, "w2", concurrency=1)
    try:
        # w2's start removes it (its worker process is gone); the job, lost with w1, runs again on w2.
        wait_until(lambda: left["Id"] not in {c["Id"] for c in _containers(docker_engine, jid)}, 30,
                   "the left container to be removed")
        job = ended(url, jid, 60)
        assert (job["state"], job["attempt"]) == ("succeeded", 2), job
        assert job["result"]["stdout"] == "second\n"
        assert "removed container orch-" in (tmp_path / "w2.log").read_text()
    finally:
        w2.stop()
    assert json.dumps(_containers(docker_engine, jid)) == "[]"
