"""End to end: real orch processes on free ports, real HTTP, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import (
    URL_RE,
    Proc,
    database_shown,
    db_rows,
    free_port,
    http,
    job,
    orch_cmd,
    run_cli,
    start_scheduler,
    start_worker,
    wait_until,
    workers_alive,
)

pytestmark = pytest.mark.e2e


def test_up_run_wait_seed_form_and_second_worker(tmp_path: Path, orch_env: dict[str, str]) -> None:
    up = Proc([*orch_cmd(), "up", "--port", "0", "--concurrency", "2"], tmp_path / "up.log", orch_env)
    extra: list[Proc] = []
    try:
        url = wait_until(lambda: (m := URL_RE.search(up.log())) and m.group(1), 30, "orch up to print its URL")
        wait_until(lambda: "try: " in up.log(), 30, "orch up to print how to try it")  # (printed after the URL)
        assert "database: " + database_shown(orch_env) in up.log()
        assert f"dashboard: {url}/ui" in up.log()
        wait_until(lambda: workers_alive(url) == 1, 30, "the local worker")
        env = {**orch_env, "ORCH_SERVER": url}

        r = run_cli(["run", "echo", "hello", "--wait"], env)
        assert (r.returncode, r.stdout) == (0, "hello\n"), r.stderr

        r = run_cli(["run", "--wait", "--retries", "0", "--", "sh", "-c", "echo oops >&2; exit 3"], env)
        assert r.returncode == 3, r.stderr
        assert "oops" in r.stderr

        # orch's own options are recognised before the command, the command's after it.
        r = run_cli(["run", "--wait", "--", "ls", "-la", str(tmp_path)], env)
        assert r.returncode == 0 and "up.log" in r.stdout, r.stderr

        # Without --wait: the job id, and the job runs anyway.
        r = run_cli(["run", "--env", "GREETING=hi there", "--", "sh", "-c", "echo $GREETING"], env)
        assert r.returncode == 0, r.stderr
        job_id = int(r.stdout.strip())
        done = wait_until(lambda: (j := job(url, job_id))["state"] == "succeeded" and j, 30, "the env job")
        assert done["result"]["stdout"] == "hi there\n"

        # The seed form from the original README.
        status, body = http("POST", f"{url}/job", {"task": "echo", "args": ["hello"]})
        assert status == 201 and isinstance(body["id"], int), body
        seeded = wait_until(lambda: (j := job(url, body["id"]))["state"] == "succeeded" and j, 30, "the seed job")
        assert seeded["result"]["stdout"] == "hello\n"
        assert seeded["created_at"] and seeded["started_at"] and seeded["finished_at"]

        # A second worker joins from "another terminal".
        extra.append(start_worker(tmp_path, orch_env, url.removeprefix("http://"), "second"))
        wait_until(lambda: workers_alive(url) == 2, 30, "the second worker")
        r = run_cli(["workers"], env)
        assert r.returncode == 0 and "second" in r.stdout and "local-1" in r.stdout

        r = run_cli(["status", str(body["id"])], env)
        assert r.returncode == 0
        assert "succeeded" in r.stdout and "queued -> running" in r.stdout and "running -> succeeded" in r.stdout

        r = run_cli(["jobs", "--json", "--limit", "2"], env)
        page = json.loads(r.stdout)
        assert len(page["jobs"]) == 2 and page["next_cursor"]
        r = run_cli(["jobs", "--state", "failed"], env)
        assert "sh -c" in r.stdout and "echo hello" not in r.stdout

        r = run_cli(["logs", str(body["id"])], env)
        assert r.stdout == "hello\n"
    finally:
        for p in extra:
            p.stop()
        up.signal(signal.SIGTERM)
        try:
            assert up.wait(30) == 0, up.log()
        finally:
            up.stop()
    assert "orch stopped" in up.log()


def test_two_hundred_jobs_spread_over_two_workers(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    ws = [start_worker(tmp_path, orch_env, url, f"w{i}", concurrency=4) for i in range(2)]
    try:
        wait_until(lambda: workers_alive(url) == 2, 30, "two workers")
        specs = [{"shell": f"echo job-{i}"} for i in range(200)]
        status, body = http("POST", f"{url}/v1/jobs/batch", {"jobs": specs})
        assert status == 201, body
        ids = [j["id"] for j in body["jobs"]]

        def all_done() -> bool:
            _, page = http("GET", f"{url}/v1/jobs?state=succeeded&limit=1000")
            return len(page["jobs"]) == 200

        wait_until(all_done, 60, "200 jobs to succeed")
        for n, job_id in enumerate(ids[::10]):
            assert job(url, job_id)["result"]["stdout"] == f"job-{n * 10}\n"
        _, page = http("GET", f"{url}/v1/jobs?limit=1000")
        workers_used = {j["worker"] for j in page["jobs"]}
        assert len(workers_used) == 2, workers_used
    finally:
        for w in ws:
            w.stop()
        sched.stop()


def test_output_streams_while_the_job_runs(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    w = start_worker(tmp_path, orch_env, url, "w")
    gate = tmp_path / "gate"
    follower = None
    try:
        script = f"echo first; while [ ! -e {gate} ]; do sleep 0.02; done; echo second"
        status, body = http("POST", f"{url}/v1/jobs", {"shell": script})
        follower = subprocess.Popen([*orch_cmd(), "logs", "--follow", str(body["id"])], env={**orch_env, "ORCH_SERVER": url},
                                    stdout=subprocess.PIPE, text=True)
        assert follower.stdout is not None
        # The first line arrives while the job is still blocked on the gate.
        assert follower.stdout.readline() == "first\n"
        assert job(url, body["id"])["state"] == "running"
        gate.touch()
        assert follower.stdout.readline() == "second\n"
        assert follower.wait(30) == 0
    finally:
        if follower and follower.poll() is None:
            follower.kill()
        w.stop()
        sched.stop()


def test_scheduler_restart_keeps_finished_and_queued_jobs(tmp_path: Path, orch_env: dict[str, str]) -> None:
    port = free_port()
    sched, url = start_scheduler(tmp_path, orch_env, port=port)
    w = start_worker(tmp_path, orch_env, url, "w")
    try:
        status, done = http("POST", f"{url}/v1/jobs/batch", {"jobs": [{"command": ["echo", str(i)]} for i in range(5)]})
        wait_until(lambda: all(job(url, j["id"])["state"] == "succeeded" for j in done["jobs"]), 30, "first jobs")
        # Jobs on a queue nobody serves stay queued across the restart.
        status, waiting = http("POST", f"{url}/v1/jobs/batch", {"jobs": [{"command": ["true"], "queue": "later"}] * 5})
        assert status == 201
        before = {j["id"]: job(url, j["id"]) for j in done["jobs"] + waiting["jobs"]}
        sched.kill9()
        sched, url = start_scheduler(tmp_path, orch_env, port=port, name="scheduler2")
        for job_id, old in before.items():
            new = job(url, job_id)
            assert new["state"] == old["state"]
            assert new["result"] == old["result"]
        # The worker rode out the restart and still takes work.
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["echo", "after"]})
        after = wait_until(lambda: (j := job(url, body["id"]))["state"] == "succeeded" and j, 40, "a job after restart")
        assert after["result"]["stdout"] == "after\n"
    finally:
        w.stop()
        sched.stop()


def test_killed_worker_job_finishes_elsewhere(tmp_path: Path, orch_env: dict[str, str]) -> None:
    env = {**orch_env, "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.3", "ORCH_SCHEDULER_LEASE_TTL": "2",
           "ORCH_RETRY_BACKOFF_BASE": "0.1"}
    sched, url = start_scheduler(tmp_path, env)
    first = start_worker(tmp_path, env, url, "first")
    second = None
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "first worker")
        marker = tmp_path / "attempts"
        script = f"echo run >> {marker}; n=$(wc -l < {marker}); if [ $n -eq 1 ]; then sleep 600; fi; echo done"
        status, body = http("POST", f"{url}/v1/jobs", {"shell": script, "max_attempts": 3})
        wait_until(lambda: job(url, body["id"])["state"] == "running" and marker.exists(), 30, "the job to start")
        second = start_worker(tmp_path, env, url, "second")
        wait_until(lambda: workers_alive(url) == 2, 30, "second worker")
        first.kill9()
        final = wait_until(lambda: (j := job(url, body["id"]))["state"] in ("succeeded", "failed") and j, 30,
                           "the job to finish on the other worker")
        assert final["state"] == "succeeded", final
        assert final["attempt"] == 2
        assert final["attempts"][0]["state"] == "lost"
        _, workers = http("GET", f"{url}/v1/workers")
        states = {w["name"]: w["state"] for w in workers["workers"]}
        assert states["first"] == "lost" and states["second"] == "alive"
    finally:
        first.stop()
        if second:
            second.stop()
        sched.stop()


def test_cli_against_a_server_that_is_down(orch_env: dict[str, str]) -> None:
    port = free_port()
    for args in (["jobs"], ["run", "echo", "hi", "--wait"], ["status", "1"], ["workers", "--json"]):
        r = run_cli([*args, "--server", f"127.0.0.1:{port}"], orch_env)
        # Under --wait orch's own failure is 125, which no job's exit code is taken for.
        assert r.returncode == (125 if "--wait" in args else 3), (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1 and "cannot reach the orch scheduler" in r.stderr


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    try:
        env = {**orch_env, "ORCH_SERVER": url}
        r = run_cli(["run", "--queue", "no spaces allowed", "true"], env)
        assert r.returncode == 2 and "queue" in r.stderr and "Traceback" not in r.stderr
        r = run_cli(["status", "999"], env)
        assert r.returncode == 4 and "no job 999" in r.stderr
        bad = tmp_path / "bad.yaml"
        bad.write_text("worker:\n  concurrencyy: 3\n")
        r = run_cli(["jobs", "--config", str(bad)], env)
        assert r.returncode == 2 and "worker.concurrencyy" in r.stderr and str(bad) in r.stderr
    finally:
        sched.stop()


def test_up_sigterm_leaves_nothing_running(tmp_path: Path, orch_env: dict[str, str]) -> None:
    env = {**orch_env, "ORCH_WORKER_DRAIN_GRACE": "0.5"}
    up = Proc([*orch_cmd(), "up", "--port", "0"], tmp_path / "up.log", env)
    try:
        url = wait_until(lambda: (m := URL_RE.search(up.log())) and m.group(1), 30, "orch up to print its URL")
        wait_until(lambda: workers_alive(url) == 1, 30, "the local worker")
        status, body = http("POST", f"{url}/v1/jobs", {"command": ["sleep", "600"]})
        wait_until(lambda: job(url, body["id"])["state"] == "running", 30, "the job to run")
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0, up.log()
    finally:
        up.stop()
    ((state, attempts),) = db_rows(orch_env, "SELECT state, attempt FROM jobs WHERE id = ?", (body["id"],))
    assert state == "queued", state  # handed back, ready for the next worker
    assert db_rows(orch_env, "SELECT state FROM attempts WHERE job_id = ?", (body["id"],)) == [("handed_back",)]
