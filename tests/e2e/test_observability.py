"""End to end observability: real scheduler and worker processes, their /metrics endpoints read by a real
Prometheus exposition parser (prometheus_client's) and by promtool, logs, job history, `orch why`.

promtool comes from Debian's `prometheus` package; `.ci/run` installs it. Where it is missing the promtool
test fails under CI (the CI environment variable set, as CI services do) and is skipped on a developer's
machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    URL_RE,
    Proc,
    client_token,
    http,
    job,
    orch_cmd,
    orch_test_env,
    run_cli,
    start_scheduler,
    start_worker,
    wait_until,
    workers_alive,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # metrics exposition and log formats: not about storage

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port(avoid: tuple[int, ...] = ()) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def free_port_block(n: int) -> int:
    """A port P with P .. P+n-1 all free just now."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no block of {n} free ports")


def scrape(url: str, token: str | None = None) -> str:
    """GET a /metrics page; ``token``: the client token, which /metrics on the API port asks for."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read().decode()


def samples(text: str) -> Samples:
    """Every sample, read by prometheus_client's parser of the text exposition format."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def val(m: Samples, metric: str, **labels: str) -> float:
    return m.get((metric, tuple(sorted(labels.items()))), 0.0)


def submit(url: str, **spec: Any) -> int:
    status, body = http("POST", f"{url}/v1/jobs", spec)
    assert status == 201, body
    return body["id"]


def ended(url: str, ids: list[int]) -> bool:
    return all(job(url, i)["state"] in ("succeeded", "failed", "cancelled") for i in ids)


# --------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A scheduler and a worker with metrics listeners on free ports, and a known mix of jobs run on them:
    5 succeed at once, 1 fails once and then succeeds, 1 fails twice and ends failed."""
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "data").mkdir()
    env = orch_test_env(tmp / "data", ORCH_SCHEDULER_HEARTBEAT_INTERVAL="0.2")
    sport = free_port()
    wport = free_port(avoid=(sport,))
    sched, url = start_scheduler(tmp, env, extra=["--metrics-port", str(sport)])
    procs = [sched]
    try:
        sched_metrics = f"http://127.0.0.1:{sport}/metrics"
        assert f"metrics: {sched_metrics}" in sched.log()
        before = scrape(sched_metrics)
        procs.append(start_worker(tmp, env, url, "w1", concurrency=2, extra=["--metrics-port", str(wport)]))
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        worker_metrics = f"http://127.0.0.1:{wport}/metrics"
        worker_before = wait_until(lambda: scrape(worker_metrics), 30, "the worker's metrics")
        fast = {"base": 0.05, "jitter": 0}
        marker = tmp / "flaky-marker"
        ids = [submit(url, command=["true"]) for _ in range(5)]
        ids.append(submit(url, shell=f"test -f {marker} || {{ touch {marker}; exit 4; }}", max_attempts=3,
                          backoff=fast))
        ids.append(submit(url, shell="exit 3", max_attempts=2, backoff=fast))
        wait_until(lambda: ended(url, ids), 60, "the jobs to end")
        yield {
            "before": before, "worker_before": worker_before,
            "scheduler": scrape(sched_metrics), "api": scrape(url + "/metrics", client_token(tmp / "data")), "worker": scrape(worker_metrics),
            "url": url, "ids": ids,
        }
    finally:
        for p in reversed(procs):
            p.stop()


def test_metrics_values_move_as_jobs_run(metrics_run: dict[str, Any]) -> None:
    before, after = samples(metrics_run["before"]), samples(metrics_run["scheduler"])
    assert val(before, "orch_jobs_submitted_total", queue="default") == 0
    assert val(before, "orch_jobs", state="succeeded") == 0
    # The counts match the jobs run: 7 submitted, 6 succeeded, 1 failed, 2 retries (one each).
    assert val(after, "orch_jobs_submitted_total", queue="default") == 7
    assert val(after, "orch_jobs_completed_total", queue="default", outcome="succeeded") == 6
    assert val(after, "orch_jobs_completed_total", queue="default", outcome="failed") == 1
    assert val(after, "orch_job_retries_total", queue="default") == 2
    assert val(after, "orch_attempts_started_total", queue="default") == 9
    assert val(after, "orch_attempts_ended_total", queue="default", outcome="failed") == 3
    assert val(after, "orch_job_duration_seconds_count", queue="default") == 9
    assert val(after, "orch_job_queue_wait_seconds_count", queue="default") == 7
    assert val(after, "orch_jobs", state="succeeded") == 6 and val(after, "orch_jobs", state="failed") == 1
    assert val(after, "orch_jobs", state="queued") == 0
    assert val(after, "orch_workers", state="alive") == 1
    assert val(after, "orch_cluster_slots", state="free") == 2
    ages = [v for (n, _), v in after.items() if n == "orch_worker_heartbeat_age_seconds"]
    assert len(ages) == 1 and 0 <= ages[0] < 5
    assert val(after, "orch_http_request_duration_seconds_count", method="POST", route="/v1/jobs", status="201") == 7
    assert val(after, "orch_workers_lost_total") == 0
    # The API port serves the same registry.
    api = samples(metrics_run["api"])
    assert val(api, "orch_jobs_completed_total", queue="default", outcome="succeeded") == 6
    # The worker's own endpoint: attempts by outcome, execution time, slots.
    wb, w = samples(metrics_run["worker_before"]), samples(metrics_run["worker"])
    assert val(wb, "orch_worker_slots", state="free") == 2
    assert val(w, "orch_worker_jobs_total", queue="default", outcome="succeeded") == 6
    assert val(w, "orch_worker_jobs_total", queue="default", outcome="failed") == 3
    assert val(w, "orch_worker_job_duration_seconds_count", queue="default") == 9
    assert val(w, "orch_worker_slots", state="busy") == 0 and val(w, "orch_worker_slots", state="free") == 2


def test_promtool_checks_both_endpoints(metrics_run: dict[str, Any], tmp_path: Path) -> None:
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs it (Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus); CI installs it")
    for name in ("scheduler", "api", "worker"):
        r = subprocess.run([exe, "check", "metrics"], input=metrics_run[name], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (name, r.stdout, r.stderr)


def test_metrics_port_in_use_is_a_clear_error(orch_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (["scheduler", "--port", "0", "--metrics-port", str(port)],
                     ["worker", "--join", "127.0.0.1:9", "--metrics-port", str(port)],
                     ["up", "--port", "0", "--workers", "0", "--metrics-port", str(port)]):
            r = run_cli(args, orch_env, timeout=60)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert f"cannot listen on 127.0.0.1:{port} for metrics" in r.stderr, r.stderr
            assert "already in use" in r.stderr.lower() and "--metrics-port" in r.stderr
            assert "Traceback" not in r.stderr + r.stdout


def test_up_gives_its_workers_the_next_metrics_ports(tmp_path: Path, orch_env: dict[str, str]) -> None:
    base = free_port_block(3)
    up = Proc([*orch_cmd(), "up", "--port", "0", "--workers", "2", "--concurrency", "1", "--metrics-port", str(base)],
              tmp_path / "up.log", orch_env)
    try:
        url = wait_until(lambda: (m := URL_RE.search(up.log())) and m.group(1), 30, "orch up to print its URL")
        wait_until(lambda: workers_alive(url) == 2, 30, "two local workers")
        assert "orch_jobs{" in scrape(f"http://127.0.0.1:{base}/metrics")
        for i in (1, 2):
            text = wait_until(lambda i=i: scrape(f"http://127.0.0.1:{base + i}/metrics"), 30, f"worker {i}'s metrics")
            assert val(samples(text), "orch_worker_slots", state="free") == 1
    finally:
        up.stop()


# --------------------------------------------------------------------------- logs


def test_logs_json_fields_levels_and_no_secrets(tmp_path: Path, orch_env: dict[str, str]) -> None:
    secret_env, secret_arg = "tok-env-5f1e0c9a", "tok-arg-77d2b3e1"
    env = {**orch_env, "ORCH_LOGGING_LEVEL": "debug"}
    sched, url = start_scheduler(tmp_path, env, extra=["--log-format", "json"])
    w = start_worker(tmp_path, env, url, "w", extra=["--log-format", "json"])
    quiet = None
    try:
        # The job checks that the secret reached it; the secret is also one of its arguments.
        jid = submit(url, command=["sh", "-c", f'test "$SECRET_TOKEN" = {secret_env}', "--token=" + secret_arg],
                     env={"SECRET_TOKEN": secret_env})
        wait_until(lambda: job(url, jid)["state"] == "succeeded", 30, "the job with a secret")
        w.stop()
        sched.stop()
        lines = []
        for p in (sched, w):
            for line in p.log().splitlines():
                if line.startswith("{"):
                    lines.append(json.loads(line))  # every log line is one JSON object
                else:  # what the commands print on stdout
                    assert line.startswith(("orch scheduler listening on", "database:", "tokens:")), line
        assert any(x["level"] == "debug" for x in lines), "logging.level debug is honoured"
        changes = [x for x in lines if x.get("job_id") == jid]
        assert [x["state"] for x in changes] == ["queued", "running", "succeeded"], changes
        done = changes[-1]
        assert done["level"] == "info" and done["logger"] == "orch.scheduler"
        assert done["attempt"] == 1 and done["queue"] == "default" and done["worker"].startswith("w-")
        assert done["outcome"] == "succeeded" and 0 <= done["duration"] < 30
        assert f"job {jid} attempt 1 -> succeeded" in done["message"]
        assert "queue_wait" in changes[1]
        for path in tmp_path.glob("*.log"):
            text = path.read_text(errors="replace")
            assert secret_env not in text and secret_arg not in text, f"a secret reached {path.name}"

        # logging.level warning: no info lines for state changes.
        quiet, qurl = start_scheduler(tmp_path, {**orch_env, "ORCH_LOGGING_LEVEL": "warning"}, name="quiet")
        qid = submit(qurl, command=["true"])
        assert job(qurl, qid)["state"] == "queued"
        quiet.stop()
        assert "-> queued" not in quiet.log() and " INFO " not in quiet.log()
    finally:
        for p in (w, sched, quiet):
            if p is not None:
                p.stop()


# --------------------------------------------------------------------------- history


def test_status_and_events_follow_show_attempts_and_reasons(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    w = start_worker(tmp_path, orch_env, url, "w")
    follower = None
    try:
        env = {**orch_env, "ORCH_SERVER": url}
        gate, marker = tmp_path / "gate", tmp_path / "marker"
        script = f"while [ ! -f {gate} ]; do sleep 0.02; done; test -f {marker} || {{ touch {marker}; exit 4; }}"
        jid = submit(url, shell=script, max_attempts=3, backoff={"base": 0.05, "jitter": 0})
        out = tmp_path / "events.out"
        with open(out, "w") as sink:
            follower = subprocess.Popen([*orch_cmd(), "events", str(jid), "--follow", "--json"], env=env,
                                        stdout=sink, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: '"to":"running"' in out.read_text(), 30, "the follower to see the job start")
        assert follower.poll() is None, "--follow keeps going while the job runs"
        gate.touch()
        assert follower.wait(30) == 0, follower.stderr.read() if follower.stderr else ""
        events = [json.loads(line) for line in out.read_text().splitlines()]
        assert [e["to"] for e in events] == ["queued", "running", "retrying", "queued", "running", "succeeded"]
        assert events[2]["reason"].startswith("exited 4; retry in") and events[3]["reason"] == "backoff over"
        assert [e["attempt"] for e in events] == [0, 1, 1, 1, 2, 2]

        r = run_cli(["events", str(jid)], env)
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 6, r.stderr
        assert "running -> retrying  exited 4; retry in" in r.stdout

        r = run_cli(["status", str(jid)], env)
        assert r.returncode == 0, r.stderr
        wid = job(url, jid)["worker"]
        attempts = r.stdout.split("attempts:")[1].split("history:")[0]
        first, second = [line for line in attempts.splitlines() if line.strip()]
        assert "#1" in first and "failed" in first and f"worker {wid}" in first and "exit 4" in first
        assert "#2" in second and "succeeded" in second and "exit 0" in second
        history = r.stdout.split("history:")[1]
        for reason in ("submitted", f"claimed by {wid}", "exited 4; retry in", "backoff over", "exited 0"):
            assert reason in history, (reason, r.stdout)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        w.stop()
        sched.stop()


# --------------------------------------------------------------------------- orch why


def test_why_explains_each_reason(tmp_path: Path, orch_env: dict[str, str]) -> None:
    env = {**orch_env, "ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.2", "ORCH_SCHEDULER_LEASE_TTL": "30"}
    sched, url = start_scheduler(tmp_path, env)
    cli_env = {**env, "ORCH_SERVER": url}
    procs = [sched]

    def why(jid: int) -> dict[str, Any]:
        r = run_cli(["why", str(jid), "--json"], cli_env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def why_text(jid: int) -> str:
        r = run_cli(["why", str(jid)], cli_env)
        assert r.returncode == 0, r.stderr
        assert 1 <= len(r.stdout.strip().splitlines()) <= 2
        return r.stdout

    try:
        # No live worker serves the queue; then cancelled.
        lonely = submit(url, command=["true"], queue="nobody")
        assert why_text(lonely).startswith(f"no_worker: job {lonely} is queued, but no live worker serves queue nobody")
        assert run_cli(["cancel", str(lonely)], cli_env).returncode == 0
        assert why(lonely)["reason"] == "cancelled"

        # Backoff, succeeded, failed: on a worker of queue b.
        procs.append(start_worker(tmp_path, env, url, "wb", concurrency=2, extra=["--queue", "b"]))
        flaky = submit(url, shell="exit 3", queue="b", max_attempts=2, backoff={"base": 120, "jitter": 0})
        good = submit(url, command=["true"], queue="b")
        bad = submit(url, shell="exit 5", queue="b", max_attempts=1)
        wait_until(lambda: job(url, flaky)["state"] == "retrying", 30, "the flaky job to back off")
        w = why(flaky)
        assert w["reason"] == "backoff" and "in backoff until" in w["message"] and 100 < w["retry_in"] <= 120
        wait_until(lambda: ended(url, [good, bad]), 30, "the good and the bad job")
        assert why(good)["reason"] == "succeeded"
        assert why(bad)["reason"] == "failed" and "exited 5" in why(bad)["message"]

        # Waiting for a slot, running, and a lease held by a worker that went quiet: queue a, one slot.
        wa = start_worker(tmp_path, env, url, "wa", concurrency=1, extra=["--queue", "a"])
        procs.append(wa)
        gate = tmp_path / "gate"
        blocker = submit(url, shell=f"while [ ! -f {gate} ]; do sleep 0.02; done", queue="a")
        wait_until(lambda: job(url, blocker)["state"] == "running", 30, "the blocker to start")
        behind = submit(url, command=["true"], queue="a")
        w = why(behind)
        assert w["reason"] == "waiting_for_slot" and w["position"] == 1, w
        assert f"job {behind} is waiting for a free slot on queue a (position 1 of 1)" in w["message"]
        wid = job(url, blocker)["worker"]
        w = wait_until(lambda: (x := why(blocker))["reason"] == "running" and x, 30, "a running explanation")
        assert wid in w["message"] and "last heartbeated" in w["message"]

        wa.signal(signal.SIGSTOP)  # the worker freezes; its job's process (own session) carries on
        try:
            w = wait_until(lambda: (x := why(blocker))["reason"] == "lease_held" and x, 30, "the lease to look held")
            assert f"held by a lease on worker {wid} (wa), which last heartbeated" in w["message"]
            assert w["heartbeat_age"] > 0.4
        finally:
            wa.signal(signal.SIGCONT)
        gate.touch()
        wait_until(lambda: ended(url, [blocker, behind]), 30, "queue a to drain")
        assert why(behind)["reason"] == "succeeded"
    finally:
        for p in reversed(procs):
            p.stop()
