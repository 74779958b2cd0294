"""End to end: queues (issue 12, point 4) with real `orch` processes, once per storage backend. `orch queues`
shows each queue's depth, running, scheduled and retrying jobs, whether it is paused and its oldest queued job's
wait; `orch queue pause Q` stops Q's jobs from being handed out (its running jobs go on, and `orch why` says
why the rest wait) and `orch queue resume Q` hands them out again, at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from helpers import (
    ended,
    http,
    job,
    one_worker_cluster,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    with one_worker_cluster(tmp_path, orch_env, queues=("email", "default")) as running:
        yield running


def queues(env: dict[str, str]) -> dict[str, dict[str, object]]:
    out = run_cli(["queues", "--json"], env)
    assert out.returncode == 0, out.stderr
    return {q["name"]: q for q in json.loads(out.stdout)["queues"]}


def test_a_paused_queue_hands_out_nothing_its_running_job_goes_on_and_resume_runs_the_rest(
        cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    go = tmp_path / "go"
    status, running = http("POST", url + "/v1/jobs", {"shell": f"while [ ! -f {go} ]; do sleep 0.02; done",
                                                     "queue": "email"})
    assert status == 201, running
    wait_until(lambda: job(url, running["id"])["state"] == "running", 30, "the first email job to start")

    paused = run_cli(["queue", "pause", "email"], env)
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == ("queue email paused: none of its 0 queued jobs will start until "
                                     "`orch queue resume email`; 1 running go on"), paused.stdout
    again = run_cli(["queue", "pause", "email"], env)
    assert again.returncode == 0 and again.stdout.strip() == "queue email was paused already", again.stdout

    status, held = http("POST", url + "/v1/jobs/batch", {"jobs": [{"command": ["true"], "queue": "email"}] * 3})
    assert status == 201, held
    held_ids = [j["id"] for j in held["jobs"]]
    # A job of another queue, submitted after them, runs: the worker asked, and was handed it, not them.
    status, other = http("POST", url + "/v1/jobs", {"command": ["true"]})
    assert ended(url, other["id"], 30)["state"] == "succeeded"
    assert [job(url, i)["state"] for i in held_ids] == ["queued"] * 3
    why = run_cli(["why", str(held_ids[0])], env)
    assert why.returncode == 0 and "which is paused" in why.stdout and "orch queue resume email" in why.stdout, why.stdout

    shown = queues(env)["email"]
    assert (shown["paused"], shown["queued"], shown["running"]) == (True, 3, 1), shown
    assert isinstance(shown["oldest_queued_age"], float) and shown["oldest_queued_age"] >= 0, shown
    table = run_cli(["queues"], env)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == [
        "QUEUE", "STATE", "QUEUED", "RUNNING", "SCHEDULED", "RETRYING", "LIMIT", "HELD", "OLDEST", "QUEUED"
    ], table.stdout
    assert [line.split()[:4] for line in table.stdout.splitlines()[1:] if line.startswith("email")] == [
        ["email", "paused", "3", "1"]], table.stdout

    go.touch()  # the running job was not stopped by the pause: it ends as it would have
    assert ended(url, running["id"], 30)["state"] == "succeeded"
    assert [job(url, i)["state"] for i in held_ids] == ["queued"] * 3

    resumed = run_cli(["queue", "resume", "email"], env)
    assert resumed.returncode == 0 and resumed.stdout.strip() == "queue email resumed (3 queued)", resumed.stdout
    for i in held_ids:
        assert ended(url, i, 30)["state"] == "succeeded"
    assert queues(env)["email"]["paused"] is False


def test_queue_commands_refuse_bad_names_and_the_api_names_the_field(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    bad = run_cli(["queue", "pause", "no way"], env)
    assert bad.returncode == 2 and "queue must be 1-64 characters" in bad.stderr, (bad.stdout, bad.stderr)
    status, err = http("POST", url + "/v1/queues/%20x/pause")
    assert status == 400 and err["error"]["field"] == "queue", err
    status, err = http("GET", url + "/v1/queues?x=1")
    assert status == 400 and err["error"]["field"] == "x", err
    status, body = http("POST", url + "/v1/queues/fresh/resume")  # never paused: nothing changes
    assert status == 200 and body["changed"] is False and body["paused"] is False, body


def test_a_queue_limit_of_2_runs_no_third_job_of_it_on_a_worker_of_8_slots(
        cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    out = run_cli(["queue", "set", "email", "--concurrency", "2"], env)
    assert out.returncode == 0 and out.stdout.strip() == "queue email: at most 2 of its jobs run at once", out
    log = tmp_path / "email.log"
    go = tmp_path / "go"  # the jobs wait for it: until then two run and six wait, whatever the machine's speed
    line = (f"echo start $(date +%s.%N) >> {log}; while [ ! -e {go} ]; do sleep 0.02; done; sleep 0.05;"
            f" echo end $(date +%s.%N) >> {log}")
    status, sub = http("POST", url + "/v1/jobs/batch", {"jobs": [{"shell": line, "queue": "email"}] * 8
                                                        + [{"command": ["true"]}] * 4})
    assert status == 201, sub
    wait_until(lambda: queues(env)["email"]["running"] == 2, 30, "two email jobs to run")
    shown = queues(env)["email"]
    assert shown["concurrency"] == 2 and shown["running"] == 2 and shown["queued"] == 6, shown
    wait_until(lambda: sum(job(url, j["id"])["state"] == "succeeded" for j in sub["jobs"][8:]) == 4, 30,
               "the default queue's jobs, not held up by email's limit")
    waiting = next(j for j in sub["jobs"][:8] if job(url, j["id"])["state"] == "queued")
    why = run_cli(["why", str(waiting["id"])], env)
    assert why.stdout.startswith(f"queue_limited: job {waiting['id']} is queued on email, whose concurrency limit "
                                 "of 2 is reached (2 running)"), why.stdout
    table = run_cli(["queues"], env).stdout.splitlines()
    assert table[0].split()[6:8] == ["LIMIT", "HELD"], table
    assert [r.split()[6] for r in table if r.startswith("email ")] == ["2"], table
    go.touch()
    finals = [ended(url, j["id"], 60) for j in sub["jobs"]]
    assert all(f["state"] == "succeeded" for f in finals)
    marks = sorted((float(t), 1 if w == "start" else -1) for w, t in (x.split() for x in log.read_text().split("\n") if x))
    running = most = 0
    for _, step in marks:
        running += step
        most = max(most, running)
    assert most == 2 and len(marks) == 16
    out = run_cli(["queue", "set", "email", "--unlimited"], env)
    assert out.returncode == 0 and out.stdout.strip() == "queue email: no limit", out.stdout
    assert queues(env).get("email", {}).get("concurrency") is None
    # Bad input: a message and exit 2, a 400 naming the field.
    bad = run_cli(["queue", "set", "email"], env)
    assert bad.returncode == 2 and "--concurrency N or --unlimited" in bad.stderr, bad.stderr
    for body, field in [({"concurrency": 0}, "concurrency"), ({}, "concurrency"), ({"concurrency": "2"}, "concurrency"),
                        ({"concurrency": 2, "paused": True}, "paused")]:
        status, err = http("PATCH", url + "/v1/queues/email", body)
        assert status == 400 and err["error"]["field"] == field, (body, err)
