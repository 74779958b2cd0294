"""End to end: concurrency limits by key (issue 12, points 5 and 8) with real `orch` processes, once per storage
backend. A limit of 2 over 3 workers of 8 slots never has a third job of the key running, whether counted by the
jobs themselves (each writes when it starts and ends) or sampled from the API every 10 ms through a 200-job run;
jobs of other keys and of no key are not held up behind it; a worker killed -9 holding the key's slot gives it
back once its lease expires; `orch why` names the key that holds a job, and skip_new ends a job at once."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from helpers import (
    ended,
    events,
    http,
    job,
    run_cli,
    start_scheduler,
    start_worker,
    wait_until,
    workers_alive,
)

pytestmark = pytest.mark.e2e


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _most_at_once(lines: list[str]) -> int:
    """The most jobs that ran at once, from their 'start'/'end' lines (each line: word, time)."""
    marks = sorted((float(t), 1 if w == "start" else -1) for w, t in (line.split() for line in lines if line))
    most = now = 0
    for _, step in marks:  # at one time an end sorts before a start: -1 < 1
        now += step
        most = max(most, now)
    return most


def test_a_limit_of_2_over_3_workers_of_8_slots_never_has_a_third_running(
        tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    workers = [start_worker(tmp_path, orch_env, url, f"w{i}", concurrency=8) for i in range(3)]
    stop = threading.Event()
    samples: list[int] = []

    def sample() -> None:  # every 10 ms: the key's jobs the scheduler says run
        while not stop.is_set():
            status, body = http("GET", url + "/v1/jobs?state=running&limit=500")
            if status == 200:
                samples.append(sum(1 for j in body["jobs"] if (j["name"] or "").startswith("tenant-7 ")))
            stop.wait(0.01)

    try:
        wait_until(lambda: workers_alive(url) == 3, 30, "three workers")
        log = tmp_path / "runs.log"
        line = f"echo start $(date +%s.%N) >> {log}; sleep 0.05; echo end $(date +%s.%N) >> {log}"
        keyed = [{"shell": line, "name": f"tenant-7 {i}", "concurrency": {"key": "tenant-7", "limit": 2}}
                 for i in range(200)]
        others = [{"command": ["true"], "name": f"other {i}",
                   **({"concurrency": {"key": f"other-{i}", "limit": 1}} if i % 2 else {})} for i in range(40)]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        status, sub = http("POST", url + "/v1/jobs/batch", {"jobs": keyed + others})
        assert status == 201, sub
        ids = [j["id"] for j in sub["jobs"]]
        finals = [ended(url, i, 120) for i in ids[:200]]
        other_ends = [ended(url, i, 60) for i in ids[200:]]
        assert all(j["state"] == "succeeded" for j in other_ends)
        # The other keys' jobs and those of no key, behind 200 of tenant-7 in one queue, were not held up by it:
        # all had ended before the 50th of tenant-7 started.
        starts = sorted(ts(j["attempts"][0]["started_at"]) for j in finals)
        assert max(ts(j["finished_at"]) for j in other_ends) < starts[49]
        stop.set()
        sampler.join(10)
        assert all(j["state"] == "succeeded" for j in finals), {j["state"] for j in finals}
        lines = log.read_text().splitlines()
        assert len(lines) == 400
        assert _most_at_once(lines) == 2  # never a third, and the limit was used
        assert len(samples) > 100 and max(samples) <= 2, (len(samples), max(samples))
        assert 2 in samples
        # The 200 were shared by the three workers: the limit is the cluster's, not one worker's.
        assert len({j["worker"] for j in finals}) >= 2
    finally:
        stop.set()
        for w in workers:
            w.stop()
        sched.stop()


def test_a_workers_slot_is_back_after_its_lease_expires_when_it_is_killed(
        tmp_path: Path, orch_env: dict[str, str]) -> None:
    env = {**orch_env, "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.3", "ORCH_SCHEDULER_LEASE_TTL": "2"}
    sched, url = start_scheduler(tmp_path, env)
    first = start_worker(tmp_path, env, url, "first")
    second = None
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the first worker")
        cli = {**env, "ORCH_SERVER": url}
        long = run_cli(["run", "--concurrency-key", "deploy", "--retries", "0", "--", "sleep", "600"], cli)
        assert long.returncode == 0, long.stderr
        held = run_cli(["run", "--concurrency-key", "deploy", "--", "echo", "next"], cli)
        slow, nxt = int(long.stdout), int(held.stdout)
        wait_until(lambda: job(url, slow)["state"] == "running", 30, "the first job to start")
        why = run_cli(["why", str(nxt)], cli)
        assert why.returncode == 0 and why.stdout.startswith(
            f"concurrency_limited: job {nxt} is queued on default and held by concurrency key 'deploy': "
            f"its 1 slot is taken (by job {slow})"), why.stdout
        second = start_worker(tmp_path, env, url, "second")
        wait_until(lambda: workers_alive(url) == 2, 30, "the second worker")
        assert job(url, nxt)["state"] == "queued"  # a free worker changes nothing: the key is full
        killed = time.time()
        first.kill9()
        done = ended(url, nxt, 30)
        assert done["state"] == "succeeded" and done["result"]["stdout"] == "next\n"
        assert done["worker"] != job(url, slow)["worker"]
        lost = job(url, slow)
        assert lost["state"] == "failed" and lost["attempts"][0]["state"] == "lost"
        # It started once the lease (2 s) had run out, not before.
        started = [e for e in events(url, nxt) if e["to"] == "running"][0]
        lost_at = [e for e in events(url, slow) if e["to"] == "failed"][0]
        assert ts(started["at"]) >= ts(lost_at["at"]) >= killed + 1.0
        assert time.time() - killed < 20
    finally:
        first.stop()
        if second:
            second.stop()
        sched.stop()


def test_skip_new_ends_the_new_job_and_bad_concurrency_is_refused_naming_the_field(
        tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)  # no worker: the first job keeps its slot, queued
    try:
        cli = {**orch_env, "ORCH_SERVER": url}
        first = run_cli(["run", "--concurrency-key", "sync", "--on-limit", "skip_new", "--", "true"], cli)
        again = run_cli(["run", "--concurrency-key", "sync", "--on-limit", "skip_new", "--json", "--", "true"], cli)
        assert first.returncode == 0 and again.returncode == 0, again.stderr
        skipped = job(url, json.loads(again.stdout)["id"])
        assert skipped["state"] == "skipped"
        assert events(url, skipped["id"])[-1]["reason"].startswith(
            "skipped: concurrency key 'sync' has 1 of 1 slots taken (on_limit skip_new)")
        assert job(url, int(first.stdout))["state"] == "queued"
        for body, field in [({"key": "k"}, "concurrency.limit"), ({"key": "k", "limit": 0}, "concurrency.limit"),
                            ({"limit": 2}, "concurrency.key"), ({"key": "k", "limit": 1, "on_limit": "drop"},
                                                                "concurrency.on_limit"),
                            ({"key": "a\nb", "limit": 1}, "concurrency.key"), ("k", "concurrency")]:
            status, err = http("POST", url + "/v1/jobs", {"command": ["true"], "concurrency": body})
            assert status == 400 and err["error"]["field"] == field, (body, err)
        status, err = http("POST", url + "/v1/jobs", {"command": ["true"], "delay": 5,
                                                      "concurrency": {"key": "k", "limit": 1, "on_limit": "skip_new"}})
        assert status == 400 and err["error"]["field"] == "concurrency.on_limit", err
        bad = run_cli(["run", "--concurrency-limit", "2", "--", "true"], cli)
        assert bad.returncode == 2 and "--concurrency-key" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        sched.stop()
