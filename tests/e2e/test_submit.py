"""`orch submit --file`: batches from a JSON-lines file, progress while waiting, a summary, exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest

from helpers import ROOT, http, orch_test_env, run_cli, start_scheduler, start_worker, wait_until, workers_alive

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("submit")
    data = tmp / "data"
    data.mkdir()
    env = orch_test_env(data)
    sched, url = start_scheduler(tmp, env)
    worker = start_worker(tmp, env, url, "w1", concurrency=8)
    try:
        wait_until(lambda: workers_alive(url) == 1, 30, "the worker")
        yield url, {**env, "ORCH_SERVER": url}
    finally:
        worker.stop()
        sched.stop()


def job_count(url: str) -> int:
    n, cursor = 0, None
    while True:
        status, page = http("GET", f"{url}/v1/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, page
        n += len(page["jobs"])
        cursor = page["next_cursor"]
        if not cursor:
            return n


SUMMARY = re.compile(r"succeeded (\d+), failed (\d+), cancelled (\d+), elapsed [0-9.]+ s, [0-9.,]+ jobs/s")


def test_submit_in_batches_and_wait(cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    lines = ["# two hundred jobs, some blank lines and comments", ""]
    lines += [json.dumps({"command": ["echo", f"job {i}"], "labels": {"n": str(i)}}) for i in range(200)]
    lines.insert(50, "   ")
    lines.insert(120, "# halfway")
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")

    r = run_cli(["submit", "--file", str(path), "--wait", "--batch-size", "64"], env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    ids = [int(x) for x in out[:-1]]
    assert len(ids) == 200 and ids == sorted(ids) and len(set(ids)) == 200
    m = SUMMARY.fullmatch(out[-1])
    assert m and m.groups() == ("200", "0", "0"), r.stdout
    assert "200/200" in r.stderr  # the progress bar's last state
    for job_id, n in ((ids[0], 0), (ids[-1], 199)):
        status, job = http("GET", f"{url}/v1/jobs/{job_id}")
        assert status == 200 and job["state"] == "succeeded", job
        assert job["result"]["stdout"] == f"job {n}\n"


def test_examples_file_with_a_failing_job_exits_1_and_json_prints_ids(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    specs = [line for line in (ROOT / "examples" / "jobs.jsonl").read_text().splitlines() if line.strip()]
    r = run_cli(["submit", "--file", str(ROOT / "examples" / "jobs.jsonl"), "--wait", "--json"], env, timeout=120)
    assert r.returncode == 1, r.stderr
    ids = json.loads(r.stdout)  # stdout holds only the JSON list; the summary goes to stderr
    assert isinstance(ids, list) and len(ids) == len(specs)
    m = SUMMARY.search(r.stderr)
    assert m and m.groups() == (str(len(specs) - 1), "1", "0"), r.stderr  # `exit 75` fails after its retries
    states = {http("GET", f"{url}/v1/jobs/{i}")[1]["state"] for i in ids}
    assert states == {"succeeded", "failed"}


def test_one_failing_job_exits_1(cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    _, env = cluster
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"command": ["true"]}\n{"shell": "exit 3", "max_attempts": 1}\n{"command": ["true"]}\n')
    r = run_cli(["submit", "-f", str(path), "--wait"], env, timeout=60)
    assert r.returncode == 1, r.stderr
    m = SUMMARY.search(r.stdout)
    assert m and m.groups() == ("2", "1", "0"), r.stdout


def test_stdin_without_wait_prints_ids(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    r = run_cli(["submit", "--file", "-", "--batch-size", "2"], env,
                input='{"command": ["true"]}\n{"shell": "true"}\n{"task": "true", "args": []}\n')
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert len(ids) == 3
    for i in ids:
        assert http("GET", f"{url}/v1/jobs/{i}")[0] == 200


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 3: not valid JSON"),
    ('{"comand": ["true"]}', "line 3: unknown field 'comand'"),
    ('{"command": ["true"], "priority": 5000}', "line 3: priority"),
    ('["true"]', "line 3: a job must be a JSON object"),
])
def test_a_bad_line_exits_2_and_submits_nothing(cluster: tuple[str, dict[str, str]], tmp_path: Path,
                                                bad: str, message: str) -> None:
    url, env = cluster
    before = job_count(url)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"command": ["true"]}\n# a comment\n' + bad + '\n{"command": ["true"]}\n')
    r = run_cli(["submit", "--file", str(path), "--wait"], env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and str(path) in r.stderr, r.stderr
    assert r.stdout == ""
    assert job_count(url) == before


def test_no_specs_or_no_file_exits_2(cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    _, env = cluster
    empty = tmp_path / "empty.jsonl"
    empty.write_text("# nothing here\n\n")
    r = run_cli(["submit", "--file", str(empty)], env)
    assert r.returncode == 2 and "no job specs" in r.stderr, r.stderr
    r = run_cli(["submit", "--file", str(tmp_path / "missing.jsonl")], env)
    assert r.returncode == 2 and "cannot read" in r.stderr, r.stderr
