"""End to end: cron schedules (issue 13, points 7-10) with real `orch` processes, once per storage backend. A
schedule every second fires exactly once per second across a kill -9 of the scheduler and its restart (the
ticks of the downtime within the catch-up window fire once each on restart; those of a schedule with no
window are missed, counted, and never fired); the `orch schedule` verbs and bad input."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from helpers import client_token, free_port, http, run_cli, start_scheduler, start_worker, wait_until, workers_alive

pytestmark = pytest.mark.e2e


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _metrics(url: str) -> str:
    import urllib.request

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {client_token()}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def _schedule_jobs(url: str, name: str) -> list[dict[str, object]]:
    status, page = http("GET", url + "/v1/jobs?limit=1000")
    assert status == 200, page
    out = []
    for j in page["jobs"]:
        _, full = http("GET", f"{url}/v1/jobs/{j['id']}")
        if full["spec"]["labels"].get("schedule") == name:
            out.append(full)
    return sorted(out, key=lambda j: j["id"])


def test_a_schedule_every_second_fires_once_a_second_across_a_kill_9_of_the_scheduler(
        tmp_path: Path, orch_env: dict[str, str]) -> None:
    port = free_port()
    sched, url = start_scheduler(tmp_path, orch_env, port=port)
    cli = {**orch_env, "ORCH_SERVER": url}
    w = start_worker(tmp_path, orch_env, url, "w1")
    second = None
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        add = run_cli(["schedule", "add", "tick", "--cron", "* * * * * *", "--overlap", "allow", "--shell", "--",
                       "echo", "$ORCH_SCHEDULE", "$ORCH_SCHEDULED_FOR"], cli)
        assert add.returncode == 0 and add.stdout.startswith("schedule tick: * * * * * * (UTC), next "), add
        strict = run_cli(["schedule", "add", "strict", "--cron", "* * * * * *", "--catchup", "0", "--", "true"], cli)
        assert strict.returncode == 0, strict.stderr
        wait_until(lambda: len(_schedule_jobs(url, "tick")) >= 3, 20, "three ticks")
        sched.kill9()
        down_at = time.time()
        time.sleep(3)  # down for three seconds: ticks fall meanwhile (this is the test's subject, not a wait)
        second, url2 = start_scheduler(tmp_path, orch_env, port=port, name="scheduler-2")
        assert url2 == url
        up_at = time.time()
        wait_until(lambda: len([j for j in _schedule_jobs(url, "tick")
                                if _ts(str(j["spec"]["env"]["ORCH_SCHEDULED_FOR"])) > up_at]) >= 2,  # type: ignore[index]
                   30, "two ticks after the restart")
        assert run_cli(["schedule", "delete", "tick"], cli).returncode == 0
        assert run_cli(["schedule", "delete", "strict"], cli).returncode == 0
        jobs = _schedule_jobs(url, "tick")
        times = [_ts(str(j["spec"]["env"]["ORCH_SCHEDULED_FOR"])) for j in jobs]  # type: ignore[index]
        # Exactly one job a second, every second from the first to the last, the downtime's too.
        assert times == [times[0] + i for i in range(len(times))], times
        assert len(times) >= 8  # three before, three while it was down, two after
        keys = [j["spec"]["idempotency_key"] for j in jobs]  # type: ignore[index]
        assert len(set(keys)) == len(keys)
        # On PostgreSQL the new scheduler fires once the killed one's hold on the reaper's role has run out.
        firing_at = min(_ts(str(j["created_at"])) for j in jobs if _ts(str(j["created_at"])) > up_at)
        for j, t in zip(jobs, times, strict=True):
            assert _ts(str(j["created_at"])) >= t  # never before its time
            if t < down_at - 1 or t > firing_at:  # ticks that fell while it was up and firing: within 1 s
                assert _ts(str(j["created_at"])) - t < 1.0, (j["id"], j["created_at"], t)
        done = wait_until(lambda: all(x["state"] == "succeeded" for x in _schedule_jobs(url, "tick"))
                          and _schedule_jobs(url, "tick"), 30, "every tick's job to end")
        assert str(done[0]["result"]["stdout"]).startswith("tick 20")  # type: ignore[index]
    finally:
        w.stop()
        if second is not None:
            second.stop()
        sched.stop()


def test_a_schedule_without_a_catch_up_window_misses_the_ticks_of_a_downtime_and_counts_them(
        tmp_path: Path, orch_env: dict[str, str]) -> None:
    port = free_port()
    sched, url = start_scheduler(tmp_path, orch_env, port=port)
    cli = {**orch_env, "ORCH_SERVER": url}
    second = None
    try:
        # (No worker: its jobs stay queued; --overlap allow fires each tick all the same.)
        assert run_cli(["schedule", "add", "strict", "--cron", "* * * * * *", "--catchup", "0", "--overlap", "allow",
                        "--", "true"], cli).returncode == 0
        wait_until(lambda: http("GET", url + "/v1/schedules/strict")[1]["fired"] >= 2, 20, "two ticks")
        sched.kill9()
        time.sleep(3)  # ticks fall while it is down
        second, _ = start_scheduler(tmp_path, orch_env, port=port, name="scheduler-2")
        got = wait_until(lambda: (x := http("GET", url + "/v1/schedules/strict")[1])["missed"] >= 2 and x, 20,
                         "the missed ticks counted")
        assert got["last_missed_at"] is not None
        listed = run_cli(["schedule", "list"], cli)
        row = [line for line in listed.stdout.splitlines() if line.startswith("strict")][0].split()
        assert int(row[-1]) == got["missed"] or int(row[-1]) >= 2, listed.stdout
        metrics = _metrics(url)
        missed = [line for line in metrics.splitlines() if line.startswith('orch_schedule_ticks_total{outcome="missed"}')]
        assert missed and float(missed[0].split()[-1]) >= 2, missed
        # None of the missed ticks ran: the jobs are those it fired, one a tick, none of the downtime's. (Paused
        # first: it fires every second, so a tick may fall between reading its jobs and reading its count.)
        assert run_cli(["schedule", "pause", "strict"], cli).returncode == 0
        wait_until(lambda: len(_schedule_jobs(url, "strict")) == http("GET", url + "/v1/schedules/strict")[1]["fired"],
                   10, "one job per fired tick")
    finally:
        if second is not None:
            second.stop()
        sched.stop()


def test_the_schedule_verbs_and_bad_input(tmp_path: Path, orch_env: dict[str, str]) -> None:
    sched, url = start_scheduler(tmp_path, orch_env)
    cli = {**orch_env, "ORCH_SERVER": url}
    try:
        add = run_cli(["schedule", "add", "backup", "--cron", "30 2 * * *", "--tz", "America/New_York",
                       "--queue", "ops", "--", "./backup.sh", "--full"], cli)
        assert add.returncode == 0, add.stderr
        nxt = run_cli(["schedule", "next", "backup", "-n", "3"], cli)
        lines = nxt.stdout.splitlines()
        assert len(lines) == 3 and all("02:30:00" in line or "03:00:00" in line for line in lines), nxt.stdout
        assert all(line.split()[1].startswith("(") and "America/New_York" in line for line in lines)
        listed = run_cli(["schedule", "list", "--json"], cli)
        (x,) = json.loads(listed.stdout)["schedules"]
        assert x["job"] == {"command": ["./backup.sh", "--full"], "queue": "ops"} and x["tz"] == "America/New_York"
        assert run_cli(["schedule", "pause", "backup"], cli).stdout.strip() == "schedule backup paused"
        assert http("GET", url + "/v1/schedules/backup")[1]["next_at"] is None
        resumed = run_cli(["schedule", "resume", "backup"], cli)
        assert resumed.stdout.startswith("schedule backup resumed: next "), resumed.stdout
        trig = run_cli(["schedule", "trigger", "backup"], cli)
        assert trig.returncode == 0, trig.stderr
        _, job = http("GET", f"{url}/v1/jobs/{int(trig.stdout)}")
        assert job["queue"] == "ops" and job["spec"]["env"]["ORCH_SCHEDULE"] == "backup"

        plan = tmp_path / "schedules.yaml"
        plan.write_text("schedules:\n"
                        "  backup:\n    cron: '0 3 * * *'\n    tz: America/New_York\n"
                        "    job: {command: [./backup.sh, --full], queue: ops}\n"
                        "  report:\n    cron: '*/15 * * * *'\n    catchup: 10m\n    job: {shell: ./report.sh}\n")
        applied = run_cli(["schedule", "apply", "-f", str(plan)], cli)
        assert applied.stdout.splitlines() == ["change backup: cron", "create report"], applied.stdout
        again = run_cli(["schedule", "apply", "-f", str(plan)], cli)
        assert again.stdout.splitlines() == ["keep backup", "keep report"], again.stdout
        plan.write_text("schedules:\n  report:\n    cron: '*/15 * * * *'\n    catchup: 10m\n    job: {shell: ./report.sh}\n")
        pruned = run_cli(["schedule", "apply", "-f", str(plan), "--prune"], cli)
        assert pruned.stdout.splitlines() == ["keep report", "delete backup"], pruned.stdout
        assert http("GET", url + "/v1/schedules/backup")[0] == 404

        for args, words in ((["schedule", "add", "x", "--cron", "61 * * * *", "--", "true"], "not an expression"),
                            (["schedule", "add", "x", "--cron", "* * * * *", "--tz", "Nowhere/Land", "--", "true"],
                             "no time zone"),
                            (["schedule", "add", "report", "--cron", "* * * * *", "--", "true"], "exists already"),
                            (["schedule", "add", "x", "--cron", "* * * * *", "--catchup", "soon", "--", "true"],
                             "--catchup")):
            bad = run_cli(args, cli)
            assert bad.returncode in (2, 5) and words in bad.stderr and "Traceback" not in bad.stderr, bad
        status, err = http("POST", url + "/v1/schedules", {"name": "y", "cron": "* * * * *",
                                                           "job": {"command": ["true"], "delay": 3}})
        assert status == 400 and err["error"]["field"] == "job.delay", err
        status, err = http("PATCH", url + "/v1/schedules/report", {"overlap": "sometimes"})
        assert status == 400 and err["error"]["field"] == "overlap", err
        assert run_cli(["schedule", "delete", "nope"], cli).returncode == 4
    finally:
        sched.stop()
