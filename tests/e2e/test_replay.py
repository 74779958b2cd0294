"""End to end: replay (issue 12, point 3) with real `orch` processes, once per storage backend. A job that failed
for good (or was cancelled) is given a fresh set of attempts by `orch retry` or POST /v1/jobs/{id}/retry, runs
again under new attempt numbers, and its history keeps every earlier attempt and says who asked; a whole
dead-letter set goes at once with `orch retry --state failed --queue Q`; every other state is refused, naming it."""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import Iterator

import pytest

from helpers import (
    ended,
    events,
    http,
    job,
    one_worker_cluster,
    run_cli,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    with one_worker_cluster(tmp_path, orch_env, queues=("default", "email")) as running:
        yield running


def test_orch_retry_runs_a_failed_job_again_and_its_history_keeps_both_attempts(
        cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    marker = tmp_path / "fixed"  # the job fails until this file exists: the "bug" fixed before the replay
    status, sub = http("POST", url + "/v1/jobs", {"shell": f"test -f {marker} || exit 3", "max_attempts": 1})
    assert status == 201, sub
    jid = sub["id"]
    assert ended(url, jid, 30)["state"] == "failed"
    why = run_cli(["why", str(jid)], env)
    assert f"orch retry {jid}" in why.stdout, why.stdout

    marker.touch()
    done = run_cli(["retry", str(jid)], env)
    assert done.returncode == 0 and done.stdout.strip() == f"job {jid} queued again", (done.stdout, done.stderr)
    final = ended(url, jid, 30)
    assert final["state"] == "succeeded" and final["exit_code"] == 0, final
    assert [(a["attempt"], a["state"]) for a in final["attempts"]] == [(1, "failed"), (2, "succeeded")]
    assert final["max_attempts"] == 2  # one more (its spec's max_attempts), counted from attempt 1

    got = events(url, jid)
    moves = [(e["from"], e["to"]) for e in got]
    assert moves == [(None, "queued"), ("queued", "running"), ("running", "failed"), ("failed", "queued"),
                     ("queued", "running"), ("running", "succeeded")], got
    replay = [e for e in got if e["from"] == "failed"]
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    assert replay[0]["reason"] == f"replayed by {who} from 127.0.0.1", replay

    # A succeeded job is not replayed: exit 5 (a conflict), saying why; nothing changes.
    again = run_cli(["retry", str(jid)], env)
    assert again.returncode == 5 and "has succeeded" in again.stderr, (again.stdout, again.stderr)
    assert job(url, jid)["state"] == "succeeded"
    missing = run_cli(["retry", "987654"], env)
    assert missing.returncode == 4 and "no job 987654" in missing.stderr, missing.stderr


def test_the_http_route_refuses_every_other_state_and_bad_input_naming_the_field(
        cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    status, sub = http("POST", url + "/v1/jobs", {"command": ["true"], "delay": 3600})
    assert status == 201, sub
    jid = sub["id"]
    status, err = http("POST", f"{url}/v1/jobs/{jid}/retry")
    assert status == 409 and "scheduled" in err["error"]["message"], err
    status, err = http("POST", f"{url}/v1/jobs/{jid}/retry", {"by": "a\x1b[2Jb"})
    assert status == 400 and err["error"]["field"] == "by", err
    status, err = http("POST", f"{url}/v1/jobs/{jid}/retry", {"who": "x"})
    assert status == 400 and err["error"]["field"] == "who", err
    status, err = http("POST", f"{url}/v1/jobs/99999999/retry")
    assert status == 404 and err["error"]["field"] == "id", err
    for body, field in (({"ids": [jid], "state": "failed"}, "ids"), ({"state": "running"}, "state"), ({}, "state"),
                        ({"ids": []}, "ids"), ({"ids": [0]}, "ids[0]"), ({"state": "failed", "queue": "no way"}, "queue")):
        status, err = http("POST", url + "/v1/jobs/retry", body)
        assert status == 400 and err["error"]["field"] == field, (body, err)

    # Cancelled, it may be replayed (by the API, with who asks); queued again at once, not scheduled again.
    status, _ = http("POST", f"{url}/v1/jobs/{jid}/cancel")
    assert status == 200
    status, back = http("POST", f"{url}/v1/jobs/{jid}/retry", {"by": "ops-bot"})
    assert status == 200 and back["id"] == jid, back
    assert ended(url, jid, 30)["state"] == "succeeded"
    assert [e["reason"] for e in events(url, jid) if e["from"] == "cancelled"] == ["replayed by ops-bot from 127.0.0.1"]


def test_orch_retry_state_and_queue_replays_that_dead_letter_set_only(cluster: tuple[str, dict[str, str]],
                                                                      tmp_path: Path) -> None:
    url, env = cluster
    fixed = tmp_path / "fixed"
    failing = {"shell": f"test -f {fixed} || exit 1", "max_attempts": 1}
    status, sub = http("POST", url + "/v1/jobs/batch", {"jobs": [{**failing, "queue": "email"}] * 3 + [failing]})
    assert status == 201, sub
    ids = [j["id"] for j in sub["jobs"]]
    email, other = ids[:3], ids[3]
    for jid in ids:
        assert ended(url, jid, 30)["state"] == "failed"
    listed = run_cli(["jobs", "--state", "failed", "--queue", "email", "--json"], env)
    assert listed.returncode == 0, listed.stderr

    fixed.touch()
    done = run_cli(["retry", "--state", "failed", "--queue", "email"], env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.startswith("3 failed jobs of queue email queued again: "), done.stdout
    assert sorted(int(x) for x in done.stdout.split(": ")[1].split()) == sorted(email)
    for jid in email:
        assert ended(url, jid, 30)["state"] == "succeeded"
    assert job(url, other)["state"] == "failed"  # another queue's: left alone

    # By ids, some of which cannot be: the rest go, each refused one is named, and the exit says so.
    mixed = run_cli(["retry", str(other), str(email[0]), "987654"], env)
    assert mixed.returncode == 5, (mixed.stdout, mixed.stderr)
    assert mixed.stdout.startswith(f"1 of 3 jobs queued again: {other}"), mixed.stdout
    assert f"job {email[0]} has succeeded" in mixed.stderr and "no job 987654" in mixed.stderr, mixed.stderr
    assert ended(url, other, 30)["state"] == "succeeded"
    gone = run_cli(["retry", "987654", "987655"], env)
    assert gone.returncode == 4 and gone.stdout.startswith("0 of 2 jobs queued again"), (gone.stdout, gone.stderr)
    odd = run_cli(["retry", "\u00b2"], env)  # a digit to str.isdigit, not a job id
    assert odd.returncode == 2 and "a job id is a number" in odd.stderr, odd.stderr
    nothing = run_cli(["retry", "--state", "failed"], env)
    assert nothing.returncode == 0 and nothing.stdout.startswith("0 failed jobs queued again"), nothing.stdout
    usage = run_cli(["retry"], env)
    assert usage.returncode == 2 and "job ids, or --state" in usage.stderr, usage.stderr
