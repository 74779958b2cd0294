"""End to end fault tolerance: timeouts, cancel, retries, poison jobs, drain, reconnect, scheduler stalls."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from helpers import (
    ended,
    free_port,
    http,
    job,
    run_cli,
    start_scheduler,
    start_worker,
    submit,
    wait_until,
    workers_alive,
)

pytestmark = pytest.mark.e2e

FAST = {
    "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.3",
    "ORCH_SCHEDULER_LEASE_TTL": "2",
    "ORCH_SCHEDULER_RECOVERY_GRACE": "3",
    "ORCH_RETRY_BACKOFF_BASE": "0.1",
    "ORCH_WORKER_KILL_GRACE": "1",
}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str]):
    env = {**orch_env, **FAST}
    port = free_port()
    sched, url = start_scheduler(tmp_path, env, port=port)
    procs = {"scheduler": sched}
    try:
        yield tmp_path, env, url, procs, port
    finally:
        for p in reversed(list(procs.values())):  # workers first, while the scheduler still answers
            p.stop()


def test_timeout_kills_the_process_group_and_retries(cluster) -> None:
    tmp, env, url, procs, _ = cluster
    procs["w"] = start_worker(tmp, env, url, "w")
    pids = tmp / "pids"
    job_id = submit(url, {"shell": f"sleep 600 & echo $! >> {pids}; wait", "timeout": 0.5, "max_attempts": 2})
    final = ended(url, job_id)
    assert final["state"] == "failed"
    assert [a["state"] for a in final["attempts"]] == ["timed_out", "timed_out"]
    assert "timed out" in final["error"]
    # The job's own child went with it: the whole process group was killed.
    for pid in map(int, pids.read_text().split()):
        wait_until(lambda pid=pid: not pid_alive(pid), 10, f"child {pid} to be gone")


def test_cancel_running_queued_and_finished_jobs(cluster) -> None:
    tmp, env, url, procs, _ = cluster
    procs["w"] = start_worker(tmp, env, url, "w")
    cli_env = {**env, "ORCH_SERVER": url}
    running = submit(url, {"command": ["sleep", "600"]})
    wait_until(lambda: job(url, running)["state"] == "running", 20, "the job to run")
    r = run_cli(["cancel", str(running)], cli_env)
    assert r.returncode == 0 and "running" in r.stdout
    final = ended(url, running)
    assert final["state"] == "cancelled" and final["attempts"][0]["state"] == "cancelled"

    queued = submit(url, {"command": ["true"], "queue": "nobody"})
    r = run_cli(["cancel", str(queued)], cli_env)
    assert r.returncode == 0 and f"job {queued} cancelled" in r.stdout
    assert job(url, queued)["state"] == "cancelled"

    r = run_cli(["cancel", str(queued)], cli_env)
    assert r.returncode == 5 and "already ended" in r.stderr


def test_retries_with_backoff_keep_every_attempt(cluster) -> None:
    tmp, env, url, procs, _ = cluster
    procs["w"] = start_worker(tmp, env, url, "w")
    job_id = submit(url, {"shell": "echo try $ORCH_ATTEMPT; exit 4", "max_attempts": 3,
                          "backoff": {"base": 0.6, "factor": 1.0, "jitter": 0}})
    retrying = wait_until(lambda: (j := job(url, job_id))["state"] == "retrying" and j, 20, "a retry to be scheduled")
    assert retrying["retry_at"] is not None
    final = ended(url, job_id)
    assert final["state"] == "failed"
    assert [(a["state"], a["exit_code"]) for a in final["attempts"]] == [("failed", 4)] * 3
    assert final["result"]["stdout"] == "try 3\n"

    # Only the listed exit codes retry.
    job_id = submit(url, {"shell": "exit 4", "max_attempts": 3, "retry_on_exit": [75]})
    final = ended(url, job_id)
    assert final["state"] == "failed" and len(final["attempts"]) == 1


def test_poison_jobs_fail_without_slowing_the_others(cluster) -> None:
    tmp, env, url, procs, _ = cluster
    procs["w"] = start_worker(tmp, env, url, "w", concurrency=4)
    poison = [
        submit(url, {"shell": "kill -SEGV $$", "max_attempts": 2}),
        submit(url, {"shell": "kill -9 $$", "max_attempts": 2}),
        submit(url, {"shell": "while :; do :; done", "timeout": 0.5, "max_attempts": 2}),
    ]
    good = [submit(url, {"command": ["echo", str(i)]}) for i in range(30)]
    for job_id in good:
        assert ended(url, job_id)["state"] == "succeeded"
    outcomes = [ended(url, j) for j in poison]
    assert [o["state"] for o in outcomes] == ["failed"] * 3
    assert outcomes[0]["exit_code"] == 128 + signal.SIGSEGV and "SIGSEGV" in outcomes[0]["error"]
    assert outcomes[1]["exit_code"] == 128 + signal.SIGKILL
    assert [a["state"] for a in outcomes[2]["attempts"]] == ["timed_out", "timed_out"]


def test_worker_drain_hands_back_at_once(cluster) -> None:
    tmp, env, url, procs, _ = cluster
    drain_env = {**env, "ORCH_WORKER_DRAIN_GRACE": "0.5"}
    procs["first"] = start_worker(tmp, drain_env, url, "first")
    gate = tmp / "gate"
    job_id = submit(url, {"shell": f"while [ ! -e {gate} ]; do sleep 0.02; done; echo finished on $ORCH_ATTEMPT"})
    wait_until(lambda: job(url, job_id)["state"] == "running", 20, "the job to run")
    procs["first"].signal(signal.SIGTERM)
    assert procs["first"].wait(20) == 0
    after = job(url, job_id)
    # Handed back, not left to a lease expiry: queued again right away.
    assert after["state"] == "queued", after
    assert after["attempts"][0]["state"] == "handed_back"
    procs["second"] = start_worker(tmp, env, url, "second")
    gate.touch()
    final = ended(url, job_id)
    assert final["state"] == "succeeded" and final["result"]["stdout"] == "finished on 2\n"


def test_worker_keeps_results_while_the_scheduler_is_away(cluster) -> None:
    tmp, env, url, procs, port = cluster
    procs["w"] = start_worker(tmp, env, url, "w")
    gate = tmp / "gate"
    job_id = submit(url, {"shell": f"echo started; while [ ! -e {gate} ]; do sleep 0.02; done; echo done"})
    wait_until(lambda: job(url, job_id)["state"] == "running", 20, "the job to run")
    procs["scheduler"].kill9()
    gate.touch()  # the job ends while nobody listens
    wait_until(lambda: "keeping 1 results" in procs["w"].log() or "retrying in" in procs["w"].log(), 20,
               "the worker to notice the scheduler is gone")
    procs["scheduler"], url = start_scheduler(tmp, env, port=port, name="scheduler2")
    final = ended(url, job_id, 40)
    assert final["state"] == "succeeded"
    assert final["attempt"] == 1, final["attempts"]  # re-adopted, not re-run
    assert final["result"]["stdout"] == "started\ndone\n"


def test_stopped_scheduler_does_not_declare_workers_dead(cluster) -> None:
    tmp, env, url, procs, _ = cluster
    procs["w"] = start_worker(tmp, env, url, "w")
    wait_until(lambda: workers_alive(url) == 1, 20, "the worker")
    gate = tmp / "gate"
    job_id = submit(url, {"shell": f"while [ ! -e {gate} ]; do sleep 0.02; done"})
    wait_until(lambda: job(url, job_id)["state"] == "running", 20, "the job to run")
    sched = procs["scheduler"]
    sched.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # The condition is time itself: the stop must outlast the lease TTL (2 s).
        wait_until(lambda: time.monotonic() - stopped_at > 3.5, 10, "the stop to outlast the lease TTL")
    finally:
        sched.signal(signal.SIGCONT)
    wait_until(lambda: "stalled" in sched.log(), 20, "the scheduler to notice its stall")
    gate.touch()
    final = ended(url, job_id)
    assert final["state"] == "succeeded" and final["attempt"] == 1, final["attempts"]
    _, body = http("GET", f"{url}/v1/workers")
    assert [w["state"] for w in body["workers"]] == ["alive"]


def test_default_timings_rerun_a_killed_workers_job_within_15s(tmp_path: Path, orch_env: dict[str, str]) -> None:
    """The promise as shipped: default heartbeat, lease TTL and backoff."""
    sched, url = start_scheduler(tmp_path, orch_env)
    first = start_worker(tmp_path, orch_env, url, "first")
    second = None
    try:
        marker = tmp_path / "runs"
        script = f"echo run >> {marker}; [ $(wc -l < {marker}) -gt 1 ] || sleep 600"
        job_id = submit(url, {"shell": script})
        wait_until(lambda: marker.exists() and job(url, job_id)["state"] == "running", 30, "the job to start")
        second = start_worker(tmp_path, orch_env, url, "second")
        wait_until(lambda: workers_alive(url) == 2, 30, "the second worker")
        killed_at = time.time()
        first.kill9()
        final = ended(url, job_id, 40)
        assert final["state"] == "succeeded" and final["attempt"] == 2
        from datetime import datetime

        restarted = datetime.fromisoformat(final["attempts"][1]["started_at"].replace("Z", "+00:00")).timestamp()
        assert restarted - killed_at <= 15.0, f"running again after {restarted - killed_at:.1f}s"
    finally:
        first.stop()
        if second:
            second.stop()
        sched.stop()
