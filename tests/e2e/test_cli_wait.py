"""End to end: waiting from the CLI. It never fails while the job runs (a full long-poll cap is waited out),
Ctrl-C leaves the job running and says how to stop it, and orch's own failures have an exit code of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import client_token, free_port, http, job, orch_cmd, run_cli, start_scheduler, start_worker, wait_until

pytestmark = pytest.mark.e2e


class Cli:
    """A running orch CLI whose stdout and stderr are read as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen([*orch_cmd(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(f, into), daemon=True)
                         for f, into in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(f, into: list[str]) -> None:
        for line in f:
            into.append(line)

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return "".join(self.err)

    def wait(self, timeout: float = 60) -> int:
        code = self.p.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(5)


def refused_long_polls(url: str) -> int:
    """Requests the scheduler answered 429, by its own metrics."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {client_token()}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    total = 0
    for fam in text_string_to_metric_families(text):
        if fam.name == "orch_http_request_duration_seconds":
            total += sum(int(s.value) for s in fam.samples
                         if s.name.endswith("_count") and s.labels.get("status") == "429")
    return total


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict):
    # A short drain: a stopped worker ends what it runs before the test's teardown would kill it.
    env = {**orch_env, "ORCH_SCHEDULER_MAX_CLIENT_LONG_POLLS": "1", "ORCH_WORKER_DRAIN_GRACE": "1",
           "ORCH_WORKER_KILL_GRACE": "1"}
    sched, url = start_scheduler(tmp_path, env)
    worker = start_worker(tmp_path, env, url, "w", concurrency=4)
    clis: list[Cli] = []
    try:
        yield tmp_path, {**env, "ORCH_SERVER": url}, url, clis
    finally:
        for c in clis:
            c.kill()
        worker.stop()
        sched.stop()


def test_waiting_clis_wait_out_a_full_long_poll_cap_and_exit_with_their_jobs_codes(cluster) -> None:
    tmp, env, url, clis = cluster
    release = tmp / "release"
    status, first = http("POST", url + "/v1/jobs", {"shell": f"while [ ! -e {release} ]; do sleep 0.05; done; echo A"})
    clis.append(logs := Cli(["logs", "-f", str(first["id"])], env))  # holds the one long-poll the cap allows
    wait_until(lambda: job(url, first["id"])["state"] == "running", 30, "job A to run")
    specs = tmp / "jobs.jsonl"
    specs.write_text("".join(f'{{"command": ["echo", "{i}"]}}\n' for i in range(20)))
    clis.append(many := Cli(["submit", "--file", str(specs), "--wait"], env))
    clis.append(one := Cli(["run", "--wait", "--retries", "0", "--", "sh", "-c", "echo seven; exit 7"], env))
    wait_until(lambda: refused_long_polls(url) >= 6, 60, "the waiting CLIs to be refused a few times")
    assert many.p.poll() is None and one.p.poll() is None  # refused, still waiting
    release.touch()
    assert logs.wait() == 0 and logs.stdout() == "A\n"
    assert many.wait() == 0, many.stderr()
    lines = many.stdout().splitlines()
    assert len(lines) == 21 and all(x.isdigit() for x in lines[:20]), lines
    assert lines[20].startswith("succeeded 20, failed 0, cancelled 0")
    assert one.wait() == 7, one.stderr()
    assert one.stdout() == "seven\n" and one.stderr().startswith("orch: job ")


def _running_cli(tmp: Path, env: dict, url: str, clis: list[Cli], *extra: str) -> tuple[Cli, int]:
    cli = Cli(["run", "--wait", *extra, "--", "sh", "-c", "echo started; exec sleep 600"], env)
    clis.append(cli)
    wait_until(lambda: cli.stdout() == "started\n", 30, "the job's first output")
    return cli, int(cli.stderr().split()[2])


def test_ctrl_c_leaves_the_job_running_and_says_how_to_stop_or_follow_it(cluster) -> None:
    tmp, env, url, clis = cluster
    cli, job_id = _running_cli(tmp, env, url, clis)
    cli.p.send_signal(signal.SIGINT)
    assert cli.wait(30) == 130
    assert (f"orch: job {job_id} is still running; orch cancel {job_id} stops it, "
            f"orch logs -f {job_id} follows it") in cli.stderr()
    assert "Traceback" not in cli.stderr()
    assert job(url, job_id)["state"] == "running"
    assert run_cli(["cancel", str(job_id)], env).returncode == 0


def test_a_second_ctrl_c_within_2s_cancels_and_so_does_cancel_on_interrupt(cluster) -> None:
    tmp, env, url, clis = cluster
    cli, job_id = _running_cli(tmp, env, url, clis)
    cli.p.send_signal(signal.SIGINT)
    wait_until(lambda: "is still running" in cli.stderr(), 20, "the first Ctrl-C to be answered")
    cli.p.send_signal(signal.SIGINT)
    assert cli.wait(30) == 130
    wait_until(lambda: job(url, job_id)["state"] == "cancelled", 30, "the job to be cancelled")
    cli, job_id = _running_cli(tmp, env, url, clis, "--cancel-on-interrupt")
    cli.p.send_signal(signal.SIGINT)
    assert cli.wait(30) == 130
    assert "is still running" not in cli.stderr()
    wait_until(lambda: job(url, job_id)["state"] == "cancelled", 30, "the job to be cancelled")


def test_orch_failures_under_wait_exit_125_which_a_job_exit_code_cannot_be_mistaken_for(cluster) -> None:
    tmp, env, url, clis = cluster
    nowhere = run_cli(["run", "--wait", "--server", f"http://127.0.0.1:{free_port()}", "echo", "hi"], env)
    assert nowhere.returncode == 125 and nowhere.stderr.startswith("orch: cannot reach"), nowhere.stderr
    assert len(nowhere.stderr.splitlines()) == 1
    bad = run_cli(["run", "--wait", "--queue", "no spaces", "echo", "hi"], env)
    assert bad.returncode == 125 and "queue" in bad.stderr
    # Without --wait, the usual codes: unreachable is 3.
    assert run_cli(["run", "--server", f"http://127.0.0.1:{free_port()}", "echo", "hi"], env).returncode == 3
    # A job's own exit codes come through as they are, 125 included.
    assert run_cli(["run", "--wait", "--", "sh", "-c", "exit 3"], env).returncode == 3
