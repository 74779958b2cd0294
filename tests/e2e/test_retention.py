"""End to end: retention (issue 12, point 7) with real `orch` processes, once per storage backend. `orch purge
--older-than D [--state S]` deletes the jobs that ended longer ago than D, with all that is theirs, and nothing
else; `retention.finished_jobs` has the scheduler do it on its own; bad input is refused naming what is wrong."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from helpers import client_token, ended, http, job, run_cli, start_scheduler, start_worker, wait_until, workers_alive

pytestmark = pytest.mark.e2e


def test_orch_purge_deletes_what_ended_before_the_age_and_state_given(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, {**orch_env, "ORCH_RETENTION_FINISHED_JOBS": "0"})
    worker = start_worker(tmp_path, orch_env, url, "w1")
    env = {**orch_env, "ORCH_SERVER": url}
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        status, sub = http("POST", url + "/v1/jobs/batch", {"jobs": [
            {"command": ["true"]}, {"shell": "echo out; exit 1", "max_attempts": 1}, {"command": ["true"]},
            {"command": ["true"], "delay": 3600}]})
        assert status == 201, sub
        ok1, bad, ok2, later = (j["id"] for j in sub["jobs"])
        for jid in (ok1, bad, ok2):
            ended(url, jid, 30)
        assert job(url, bad)["state"] == "failed"

        young = run_cli(["purge", "--older-than", "1h"], env)
        assert young.returncode == 0 and young.stdout.strip() == "purged 0 ended jobs that ended more than 1h ago"
        failed = run_cli(["purge", "--older-than", "0s", "--state", "failed"], env)
        assert failed.returncode == 0, failed.stderr
        assert failed.stdout.strip() == "purged 1 failed job that ended more than 0s ago", failed.stdout
        status, err = http("GET", f"{url}/v1/jobs/{bad}")
        assert status == 404, err
        assert http("GET", f"{url}/v1/jobs/{bad}/events")[0] == 404
        assert job(url, ok1)["state"] == "succeeded"  # another state: kept
        every = run_cli(["purge", "--older-than", "0"], env)
        assert every.returncode == 0 and every.stdout.startswith("purged 2 ended jobs"), every.stdout
        status, page = http("GET", url + "/v1/jobs")
        assert [j["id"] for j in page["jobs"]] == [later]  # scheduled, not ended: never purged

        for bad_args, what in ((["--older-than", "soon"], "--older-than"), (["--older-than", "1d", "--state", "queued"],
                                                                             "--state")):
            out = run_cli(["purge", *bad_args], env)
            assert out.returncode == 2 and what in out.stderr, (bad_args, out.stderr)
        for body, field in (({"older_than": -1}, "older_than"), ({}, "older_than"),
                            ({"older_than": 1, "state": "running"}, "state"), ({"older_than": 1, "x": 1}, "x")):
            status, err = http("POST", url + "/v1/jobs/purge", body)
            assert status == 400 and err["error"]["field"] == field, (body, err)
    finally:
        worker.stop()
        sched.stop()


def test_retention_purges_ended_jobs_on_its_own_and_keeps_the_rest(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, {**orch_env, "ORCH_RETENTION_FINISHED_JOBS": "1",
                                            "ORCH_RETENTION_INTERVAL": "0.2"})
    worker = start_worker(tmp_path, orch_env, url, "w1")
    go = tmp_path / "go"
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        status, quick = http("POST", url + "/v1/jobs", {"command": ["true"]})
        assert status == 201
        status, slow = http("POST", url + "/v1/jobs", {"shell": f"while [ ! -f {go} ]; do sleep 0.02; done"})
        assert status == 201
        assert ended(url, quick["id"], 30)["state"] == "succeeded"
        wait_until(lambda: http("GET", f"{url}/v1/jobs/{quick['id']}")[0] == 404, 30, "retention to purge the job")
        assert job(url, slow["id"])["state"] == "running"  # running for longer than the retention: kept
        req = urllib.request.Request(url + "/metrics", headers={
            "Authorization": f"Bearer {client_token(Path(orch_env['ORCH_DATA_DIR']))}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            metrics = resp.read().decode()
        assert "orch_jobs_purged_total 1.0" in metrics, metrics
        go.touch()
        assert ended(url, slow["id"], 30)["state"] == "succeeded"
        wait_until(lambda: http("GET", f"{url}/v1/jobs/{slow['id']}")[0] == 404, 30, "retention to purge it too")
    finally:
        worker.stop()
        sched.stop()
