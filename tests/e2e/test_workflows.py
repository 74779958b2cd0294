"""End to end: workflows (issue 13, points 1-5) with real `orch` processes, once per storage backend. A three-step
workflow file passes JSON values from job to job; a failed middle step skips the last, and `orch retry` of it
runs it again, un-skips the last and completes the workflow; `orch why` names what a blocked job waits on."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import pytest

from helpers import ended, events, http, job, one_worker_cluster, run_cli, wait_until

pytestmark = pytest.mark.e2e

PY = sys.executable


@pytest.fixture
def cluster(tmp_path: Path, orch_env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    with one_worker_cluster(tmp_path, orch_env) as running:
        yield running


def _pipeline(tmp_path: Path, transform: str) -> Path:
    extract = tmp_path / "extract.py"
    extract.write_text("import json, os\n"
                       "json.dump({'rows': [3, 4, 5], 'source': 'extract'}, open(os.environ['ORCH_RESULT_PATH'], 'w'))\n")
    (tmp_path / "transform.py").write_text(transform)
    load = tmp_path / "load.py"
    load.write_text("import json, os\n"
                    "got = json.load(open(os.environ['ORCH_INPUTS_PATH']))\n"
                    "print('loaded', got['transform']['value']['total'], 'from', got['transform']['state'])\n")
    wf = tmp_path / "pipeline.yaml"
    wf.write_text(f"""
defaults:
  max_attempts: 1
jobs:
  extract:
    command: [{PY}, {extract}]
  transform:
    needs: extract
    command: [{PY}, {tmp_path / "transform.py"}]
  load:
    needs: [transform]
    command: [{PY}, {load}]
  notify:
    needs: [load]
    if: failure()
    run: echo load failed
""")
    return wf


TRANSFORM = ("import json, os, sys\n"
             "inputs = json.load(open(os.environ['ORCH_INPUTS_PATH']))\n"
             "marker = {marker!r}\n"
             "if marker and not os.path.exists(marker):\n"
             "    sys.exit('the transform is broken until ' + marker + ' exists')\n"
             "rows = inputs['extract']['value']['rows']\n"
             "json.dump({{'total': sum(rows), 'n': len(rows)}}, open(os.environ['ORCH_RESULT_PATH'], 'w'))\n")


def test_a_three_step_workflow_file_passes_values_from_job_to_job(
        cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    wf = _pipeline(tmp_path, TRANSFORM.format(marker=""))
    done = run_cli(["submit", "--file", str(wf), "--wait"], env, timeout=120)
    # notify (if: failure()) is skipped as load succeeded: the workflow succeeded all the same.
    assert done.returncode == 0, (done.stdout, done.stderr)
    ids = [int(x) for x in done.stdout.split()[:4]]
    assert "succeeded 3, failed 0, cancelled 0, skipped 1" in done.stdout + done.stderr
    extract, transform, load, notify = (job(url, i) for i in ids)
    assert extract["result"]["value"] == {"rows": [3, 4, 5], "source": "extract"}
    assert transform["result"]["value"] == {"total": 12, "n": 3}
    assert load["result"]["stdout"] == "loaded 12 from succeeded\n"
    assert notify["state"] == "skipped"
    assert [d["job_id"] for d in load["dependencies"]] == [ids[1]] and load["workflow"] == ids[0]
    # Each dependent started after its dependency ended (the store's own clock stamps both).
    for before, after in ((extract, transform), (transform, load)):
        assert after["started_at"] >= before["finished_at"], (before, after)
    shown = run_cli(["workflow", "show", str(ids[2])], env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"workflow {ids[0]}: succeeded (1 skipped, 3 succeeded)", shown.stdout
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows[str(ids[1])] == ["transform", "succeeded", "extract"], shown.stdout
    assert rows[str(ids[3])][:2] == ["notify", "skipped"], shown.stdout
    graph = json.loads(run_cli(["workflow", "show", str(ids[0]), "--json"], env).stdout)
    assert graph["state"] == "succeeded" and [j["ref"] for j in graph["jobs"]] == ["extract", "transform", "load",
                                                                                    "notify"]


def test_a_failed_middle_step_skips_the_last_and_orch_retry_of_it_completes_the_workflow(
        cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    marker = tmp_path / "fixed"
    wf = _pipeline(tmp_path, TRANSFORM.format(marker=str(marker)))
    first = run_cli(["submit", "--file", str(wf), "--wait"], env, timeout=120)
    assert first.returncode == 1, (first.stdout, first.stderr)  # the workflow failed
    extract, transform, load, notify = [int(x) for x in first.stdout.split()[:4]]
    assert job(url, transform)["state"] == "failed"
    assert job(url, load)["state"] == "skipped"
    assert [e["reason"] for e in events(url, load)][-1] == f"dependency {transform} ended failed, not succeeded"
    # notify waits on load's failure: load never ran, so that can never be met either.
    assert job(url, notify)["state"] == "skipped"
    why = run_cli(["why", str(load)], env)
    assert why.stdout.startswith("skipped: ") and f"dependency {transform} ended failed" in why.stdout, why.stdout
    refused = run_cli(["retry", str(load)], env)  # the skipped job itself: replay its failed dependency
    assert refused.returncode == 5 and f"depends on job {transform}, which ended failed" in refused.stderr

    marker.touch()
    again = run_cli(["retry", str(transform)], env)
    assert again.returncode == 0, again.stderr
    assert ended(url, load, 60)["state"] == "succeeded"
    assert job(url, load)["result"]["stdout"] == "loaded 12 from succeeded\n"
    wait_until(lambda: job(url, notify)["state"] == "skipped", 10, "notify skipped again")
    assert job(url, extract)["attempt"] == 1  # only the failed part ran again
    moves = [(e["from"], e["to"]) for e in events(url, load)]
    assert moves == [(None, "blocked"), ("blocked", "skipped"), ("skipped", "blocked"), ("blocked", "queued"),
                     ("queued", "running"), ("running", "succeeded")], moves
    shown = run_cli(["workflow", "show", str(load)], env)
    assert shown.stdout.splitlines()[0].startswith(f"workflow {extract}: succeeded"), shown.stdout


def test_why_names_the_dependency_a_blocked_job_waits_on_and_bad_workflows_are_refused(
        cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    gate = tmp_path / "gate"
    status, got = http("POST", url + "/v1/jobs/batch", {"jobs": [
        {"ref": "slow", "shell": f"while [ ! -f {gate} ]; do sleep 0.05; done"},
        {"ref": "after", "command": ["true"], "depends_on": ["slow"]}]})
    assert status == 201, got
    slow, after = (j["id"] for j in got["jobs"])
    assert got["jobs"][1]["state"] == "blocked"
    wait_until(lambda: job(url, slow)["state"] == "running", 20, "the first job running")
    why = run_cli(["why", str(after)], env)
    assert why.stdout.startswith(f"blocked: job {after} is blocked: it waits on job {slow} (slow), which is running"), \
        why.stdout
    status, data = http("GET", f"{url}/v1/jobs/{after}/why")
    assert data["waiting_on"] == [{"job_id": slow, "ref": "slow", "on": "success", "state": "running"}], data
    gate.touch()
    assert ended(url, after, 30)["state"] == "succeeded"

    # A cycle (409: each job is valid, the batch is at odds with itself) and a dependency on no job (404), naming
    # the place; a bad depends_on itself is a 400.
    status, err = http("POST", url + "/v1/jobs/batch", {"jobs": [
        {"ref": "a", "command": ["true"], "depends_on": ["b"]}, {"ref": "b", "command": ["true"], "depends_on": ["a"]}]})
    assert status == 409 and err["error"]["field"] == "jobs[0].depends_on[0]" and "cycle" in err["error"]["message"]
    status, err = http("POST", url + "/v1/jobs", {"command": ["true"], "depends_on": [987654321]})
    assert status == 404 and err["error"]["field"] == "depends_on[0]", err
    status, err = http("POST", url + "/v1/jobs", {"command": ["true"], "depends_on": [{"job": 1, "on": "soon"}]})
    assert status == 400 and err["error"]["field"] == "depends_on[0].on", err
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  a:\n    run: 'true'\n    needs: [b]\n")
    refused = run_cli(["submit", "--file", str(bad)], env)
    assert refused.returncode == 2 and "no job of this batch has ref 'b'" in refused.stderr, refused.stderr
    assert "jobs.a.needs[0]" in refused.stderr, refused.stderr
    status, err = http("GET", f"{url}/v1/workflows/{slow + 100000}")
    assert status == 404, err
