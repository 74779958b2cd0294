"""End to end: idempotency keys (issue 12, point 2) with real `orch` processes, once per storage backend. A submit
that is retried (a client that timed out, a script run twice) with the key of a kept job gets that job back, 200
with idempotent_replay, and the job runs once; the same key with another spec is a 409 naming the key; the key may
come as the spec's field or as the Idempotency-Key header (as Stripe takes it), and `orch run --idempotency-key`
uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from helpers import (
    ended,
    http,
    job,
    one_worker_cluster,
    run_cli,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    with one_worker_cluster(tmp_path, orch_env) as running:
        yield running


def test_a_retried_submit_with_its_key_gets_the_same_job_which_runs_once(cluster: tuple[str, dict[str, str]],
                                                                        tmp_path: Path) -> None:
    url, env = cluster
    ran = tmp_path / "ran"
    spec = {"shell": f"echo charged >> {ran}", "idempotency_key": "order-42"}
    status, first = http("POST", url + "/v1/jobs", spec)
    assert status == 201 and "idempotent_replay" not in first, first
    assert ended(url, first["id"], 30)["state"] == "succeeded"
    status, again = http("POST", url + "/v1/jobs", spec)
    assert status == 200, again
    assert again["idempotent_replay"] is True and again["id"] == first["id"] and again["state"] == "succeeded"
    # The header is the same key: the same job again.
    body = {k: v for k, v in spec.items() if k != "idempotency_key"}
    status, by_header = http("POST", url + "/v1/jobs", body, headers={"Idempotency-Key": "order-42"})
    assert status == 200 and by_header["id"] == first["id"], by_header
    assert ran.read_text() == "charged\n"  # it ran once
    # Another spec with the key: refused, naming the key; nothing submitted.
    status, err = http("POST", url + "/v1/jobs", {"command": ["true"], "idempotency_key": "order-42"})
    assert status == 409, err
    assert err["error"]["code"] == "idempotency_key_reused" and "'order-42'" in err["error"]["message"], err
    assert err["error"]["field"] == "idempotency_key"
    status, page = http("GET", url + "/v1/jobs")
    assert [j["id"] for j in page["jobs"]] == [first["id"]]
    # Header and field at odds: a 409 naming the header (each is valid alone).
    status, err = http("POST", url + "/v1/jobs", spec, headers={"Idempotency-Key": "other"})
    assert status == 409 and err["error"]["field"] == "Idempotency-Key", err
    # A batch with a header, a key with a control character, an empty one, a lone surrogate: 400 naming the field.
    for sent in ({"command": ["true"], "idempotency_key": "a\x07b"}, {"command": ["true"], "idempotency_key": ""},
                 {"command": ["true"], "idempotency_key": "\udb3b"}):
        status, err = http("POST", url + "/v1/jobs", sent)
        assert status == 400 and err["error"]["field"] == "idempotency_key", err
    status, err = http("POST", url + "/v1/jobs/batch", {"jobs": [body]}, headers={"Idempotency-Key": "x"})
    assert status == 400 and err["error"]["field"] == "Idempotency-Key", err


def test_a_batch_replays_the_keyed_jobs_it_names_again(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    jobs = [{"command": ["true"], "idempotency_key": f"k-{i}"} for i in range(3)]
    status, first = http("POST", url + "/v1/jobs/batch", {"jobs": jobs})
    assert status == 201 and not any("idempotent_replay" in j for j in first["jobs"]), first
    status, again = http("POST", url + "/v1/jobs/batch", {"jobs": [*jobs, {"command": ["true"]}]})
    assert status == 201, again  # one of them is new
    assert [j.get("idempotent_replay", False) for j in again["jobs"]] == [True, True, True, False]
    assert [j["id"] for j in again["jobs"][:3]] == [j["id"] for j in first["jobs"]]
    status, all_again = http("POST", url + "/v1/jobs/batch", {"jobs": jobs})
    assert status == 200 and all(j["idempotent_replay"] for j in all_again["jobs"]), all_again


def test_orch_run_with_an_idempotency_key_twice_runs_once(cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    ran = tmp_path / "ran"
    cmd = ["run", "--idempotency-key", "nightly-2026-12-02", "--wait", "--shell", f"echo once >> {ran}; echo done"]
    first = run_cli(cmd, env)
    assert first.returncode == 0 and first.stdout == "done\n", first.stderr
    second = run_cli(cmd, env)
    assert second.returncode == 0 and second.stdout == "done\n", second.stderr  # the same job's output
    assert "was submitted before with idempotency key 'nightly-2026-12-02'" in second.stderr, second.stderr
    assert ran.read_text() == "once\n"
    job_id = int(run_cli(["run", "--idempotency-key", "nightly-2026-12-02", "--shell", "x"], env).stdout or 0)
    assert job_id == 0  # another command under the key: refused, no id printed
    refused = run_cli(["run", "--idempotency-key", "nightly-2026-12-02", "--shell", "x"], env)
    assert refused.returncode != 0 and "idempotency key 'nightly-2026-12-02'" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    listed = [j for j in http("GET", url + "/v1/jobs")[1]["jobs"]]
    assert len(listed) == 1 and job(url, listed[0]["id"])["spec"]["idempotency_key"] == "nightly-2026-12-02"
