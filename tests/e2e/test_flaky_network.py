"""End to end, through a real reverse proxy that fails on command (tests/proxy.py): a worker waits out every
transient failure while its jobs keep running, and stops only when it is refused for good."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from helpers import ROOT, Proc, ended, http, job, start_scheduler, start_worker, submit, wait_until

pytestmark = pytest.mark.e2e

ENV = {"ORCH_SCHEDULER_HEARTBEAT_INTERVAL": "0.3", "ORCH_SCHEDULER_LEASE_TTL": "8",
       "ORCH_SCHEDULER_RECOVERY_GRACE": "3"}


class Proxy:
    def __init__(self, tmp: Path, upstream: str) -> None:
        self.control, self.stats = tmp / "proxy-mode", tmp / "proxy-stats.json"
        self.proc = Proc([sys.executable, str(ROOT / "tests" / "proxy.py"), upstream, str(self.control),
                          str(self.stats)], tmp / "proxy.log", dict(os.environ))
        self.url = wait_until(lambda: (m := re.search(r"proxy listening on (http://\S+)", self.proc.log()))
                              and m.group(1), 20, "the proxy to listen")

    def set(self, mode: str) -> None:
        self.control.write_text(mode)

    def answered(self, mode: str) -> int:
        try:
            return json.loads(self.stats.read_text()).get(mode, 0)
        except (OSError, ValueError):
            return 0

    def fail_for(self, mode: str, requests: int) -> None:
        """Fail every request in ``mode`` until the proxy has so answered ``requests`` of them."""
        start = self.answered(mode)
        self.set(mode)
        wait_until(lambda: self.answered(mode) >= start + requests, 30, f"{requests} requests answered {mode}")


def workers(url: str) -> list[dict]:
    return http("GET", url + "/v1/workers")[1]["workers"]


@pytest.fixture
def through_a_proxy(tmp_path: Path, orch_env: dict):
    env = {**orch_env, **ENV}
    sched, url = start_scheduler(tmp_path, env)
    proxy = Proxy(tmp_path, url)
    procs = [proxy.proc, sched]
    try:
        yield tmp_path, env, url, proxy, procs
    finally:
        for p in reversed(procs):
            p.stop()


def test_a_worker_waits_out_503s_500s_429s_and_resets_while_its_job_runs(through_a_proxy) -> None:
    tmp, env, url, proxy, procs = through_a_proxy
    proxy.set("503")  # down before the worker even joins: it keeps trying
    worker = start_worker(tmp, env, proxy.url, "w", concurrency=2)
    procs.append(worker)
    wait_until(lambda: proxy.answered("503") >= 3, 30, "the worker to try to join through the proxy")
    proxy.set("pass")
    wait_until(lambda: [w["state"] for w in workers(url)] == ["alive"], 30, "the worker to join")
    (joined,) = workers(url)
    lines = 40
    long = submit(url, {"shell": f"for i in $(seq 1 {lines}); do echo line-$i; sleep 0.1; done", "max_attempts": 1})
    wait_until(lambda: job(url, long)["state"] == "running", 30, "the job to start")
    # Heartbeats, reports and leases all fail for a while, each way in turn.
    proxy.fail_for("503", 8)
    during = submit(url, {"command": ["echo", "submitted while the proxy failed"], "max_attempts": 1})
    proxy.fail_for("500", 5)
    proxy.fail_for("429", 5)
    proxy.fail_for("reset", 5)
    proxy.set("pass")
    final = ended(url, long)
    assert final["state"] == "succeeded" and final["attempt"] == 1, final
    assert final["result"]["stdout"] == "".join(f"line-{i}\n" for i in range(1, lines + 1))
    other = ended(url, during)
    assert other["state"] == "succeeded" and other["attempt"] == 1, other
    # The same worker all along: never exited, never marked lost, never joined again.
    assert worker.alive()
    assert [(w["id"], w["state"]) for w in workers(url)] == [(joined["id"], "alive")]
    log = worker.log()
    assert "Traceback" not in log, log
    assert "retrying in" in log


def test_a_worker_refused_for_good_stops_with_one_line(through_a_proxy) -> None:
    tmp, env, url, proxy, procs = through_a_proxy
    worker = start_worker(tmp, env, proxy.url, "w")
    procs.append(worker)
    wait_until(lambda: any(w["state"] == "alive" for w in workers(url)), 30, "the worker to join")
    pid_file = tmp / "pid"
    running = submit(url, {"shell": f"echo $$ > {pid_file}; exec sleep 600", "max_attempts": 2})
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the job to start")
    pid = int(pid_file.read_text())
    proxy.set("401")  # its credential, and then its join token, are refused
    code = worker.wait(30)
    assert code == 6
    log = worker.log()
    assert "Traceback" not in log, log
    last = [line for line in log.splitlines() if line.startswith("orch:")]
    assert len(last) == 1 and "refused this worker" in last[0], log
    # It did not leave its job running behind it.
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
               20, "the job's process to be gone")
    proxy.set("pass")
    assert job(url, running)["state"] in ("running", "queued", "retrying")  # its lease runs out; it runs again
