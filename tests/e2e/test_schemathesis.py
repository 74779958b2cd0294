"""schemathesis, the OpenAPI fuzzer strangers point at orch, run over every operation of a real `orch scheduler`
with every check it has (server errors, status codes, content types, response schemas and headers, schema-valid
requests accepted and schema-violating ones refused, Allow headers, ignored auth, resources that vanish) and
its four phases on SQLite, the stateful one included (on PostgreSQL its fuzzing phase: see PHASES): a change
that makes the server and /v1/openapi.json disagree fails here.

The scheduler has no workers, so the commands fuzzed into jobs never run. Each worker operation gets a worker
of its own (registered with the join token) whose credential and id schemathesis uses there: a hand-back with
``stop: true`` ends only that operation's worker. A fixed seed and a bounded number of cases per operation keep
the run the same each time and about a minute long on two cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import client_token, http, start_scheduler

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 20260516
MAX_EXAMPLES = 20  # per operation, in the fuzzing phase; the coverage phase adds its own boundary cases
# On PostgreSQL the same document and handlers meet the other store: the fuzzing phase with fewer examples, and
# neither the coverage phase (the document's boundary values, which the handlers check before any store sees
# them; tests/integration/test_fuzz_api.py sends such values through both stores) nor the stateful one (the
# API's links, which do not depend on the store). The time goes to schemathesis itself (94 % of a core, the
# scheduler 6 %): the full four phases on PostgreSQL cost 2.5 minutes of CI, for what SQLite's run tests already.
MAX_EXAMPLES_POSTGRES = 6
PHASES = {"sqlite": ("Coverage", "Fuzzing", "Stateful"), "postgres": ("Fuzzing",)}
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def test_schemathesis_finds_nothing(tmp_path: Path, orch_env: dict[str, str]) -> None:
    if importlib.util.find_spec("schemathesis") is None:
        if os.environ.get("CI"):
            pytest.fail("schemathesis is missing: it is in the test extra (pip install -e '.[test]')")
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    env = {**orch_env, "ORCH_SCHEDULER_LONG_POLL_TIMEOUT": "0.1",  # lease waits: the document's maximum
           "ORCH_SCHEDULER_LEASE_TTL": "3600"}  # the workers below never heartbeat: they must not be lost
    proc, url = start_scheduler(tmp_path, env)
    try:
        status, doc = http("GET", url + "/v1/openapi.json")
        assert status == 200, doc
        (tmp_path / "openapi.json").write_text(json.dumps(doc))
        data_dir = Path(env["ORCH_DATA_DIR"])
        lines = ["[auth.openapi.clientToken]", f"bearer = {toml_string(client_token(data_dir) or '')}",
                 "[auth.openapi.joinToken]", f"bearer = {toml_string(client_token(data_dir, 'join') or '')}"]
        worker_ops = sorted((path, method) for path, item in doc["paths"].items() for method in item
                            if path.startswith("/v1/workers/{worker_id}/"))
        assert len(worker_ops) == 6, worker_ops
        for path, method in worker_ops:
            status, reg = http("POST", url + "/v1/workers", {"name": f"st-{path.rsplit('/', 1)[1]}"},
                               token=client_token(data_dir, "join"))
            assert status == 201, reg
            params = f"\"path.worker_id\" = {toml_string(reg['worker_id'])}"
            if "{job_id}" in path:  # a job of its own, running on this worker, for the one-attempt completion
                status, job = http("POST", url + "/v1/jobs", {"command": ["true"]})
                assert status == 201, job
                status, leased = http("POST", f"{url}/v1/workers/{reg['worker_id']}/lease", {"max": 1},
                                      token=reg["credential"])
                assert status == 200 and leased["jobs"][0]["job_id"] == job["id"], leased
                params += f", \"path.job_id\" = {job['id']}"
            # include-name: one exact operation (include-path and include-method would be either of them)
            lines += ["[[operations]]", f"include-name = {toml_string(f'{method.upper()} {path}')}",
                      f"parameters = {{ {params} }}",
                      f"headers = {{ Authorization = {toml_string('Bearer ' + reg['credential'])} }}"]
        # A replay is of an ended job: not pinned to one (a fuzzed purge deletes it, and the stateful phase, which
        # chains a submit to its replay, would read the 404 as a created job lost). Replays of ended jobs are
        # tested in tests/e2e/test_replay.py and the fuzz test.
        config = tmp_path / "schemathesis.toml"
        config.write_text("\n".join(lines) + "\n")
        started = time.monotonic()
        backend = "postgres" if os.environ.get("ORCH_STORAGE_BACKEND") == "postgres" else "sqlite"
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
             str(tmp_path / "openapi.json"), "--url", url, "--checks", "all", "--seed", str(SEED),
             "--max-examples", str(MAX_EXAMPLES_POSTGRES if backend == "postgres" else MAX_EXAMPLES),
             "--phases", ",".join(["examples", *(p.lower() for p in PHASES[backend])]), "--workers", "1", "--request-timeout", "10",
             "--report", "junit", "--report-dir", str(tmp_path / "report")],
            cwd=tmp_path, env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}, capture_output=True, text=True,
            timeout=540)
        took = time.monotonic() - started
        out = run.stdout + run.stderr
        print(f"schemathesis took {took:.1f}s\n{out[-3000:]}")
        assert run.returncode == 0, out[-12000:]
        assert f"Tested: {len([1 for item in doc['paths'].values() for m in item])}" in out, out[-3000:]
        for phase in PHASES[backend]:
            assert f"✅ {phase}" in out, (phase, out[-3000:])
        log = proc.log()
        assert "Traceback" not in log and " ERROR " not in log, log[-5000:]
    finally:
        proc.stop()
