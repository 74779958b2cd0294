"""End to end: what the CLI prints for people. Server text shown escaped, answers that are not orch named as
such, bad addresses refused in one line, `orch workers --all`, and `orch up`'s try: line run as printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import (
    run_cli,
    start_scheduler,
    start_worker,
    wait_until,
    workers_alive,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("args", [
    ["jobs", "--server", "htp://127.0.0.1:8080"],
    ["run", "--server", "http://127.0.0.1:80a80", "echo", "hi"],
    ["workers", "--server", "http://:8080"],
    ["status", "1", "--server", "http://a b:8080"],
    ["run", "--env", "NOVALUE", "echo", "hi"],
    ["run", "--env", "=x", "echo", "hi"],
])
def test_bad_input_is_one_line_and_exit_2(orch_env: dict[str, str], args: list[str]) -> None:
    r = run_cli(args, orch_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("orch: ") and "Traceback" not in r.stderr, r.stderr


def test_workers_all_shows_stopped_workers_past_the_retention(tmp_path: Path, orch_env: dict[str, str]) -> None:
    env = {**orch_env, "ORCH_SCHEDULER_WORKER_RETENTION": "0"}
    sched, url = start_scheduler(tmp_path, env)
    burst = start_worker(tmp_path, env, url, "burst", extra=["--burst"])
    steady = start_worker(tmp_path, env, url, "steady")
    try:
        assert burst.wait(30) == 0, burst.log()  # no work: it stops at once
        wait_until(lambda: workers_alive(url) == 1, 30, "the steady worker")
        cli_env = {**env, "ORCH_SERVER": url}
        r = run_cli(["workers"], cli_env)
        assert r.returncode == 0 and "steady" in r.stdout and "burst" not in r.stdout, r.stdout
        r = run_cli(["workers", "--all"], cli_env)
        row = next(line.split() for line in r.stdout.splitlines() if "burst" in line)
        assert row[2] == "stopped" and row[5] == "0/4", r.stdout
    finally:
        steady.stop()
        burst.stop()
        sched.stop()
