"""The benchmark suite at smoke size: it runs end to end and every benchmark produces its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # the benchmark suite, which starts its own clusters on SQLite

BENCHMARKS = ("shell", "control", "submits", "latency", "scale", "workers", "big", "delayed", "purge", "keys", "dag", "cron",
              "python", "docker", "dashboard")


@pytest.mark.timeout(420)
def test_smoke_size_runs_every_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") or k == "ORCH_BENCH_CACHE"}
    env["TMPDIR"] = str(tmp_path)  # every run's temp dir lands here and goes with it
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--size", "smoke", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    detail = f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    assert r.returncode == 0, detail
    header = next(line for line in r.stdout.splitlines() if line.startswith("figure"))
    assert header.split() == ["figure", "target", "orch", "peer", "ratio", "met"], detail

    data = json.loads(out.read_text())
    assert data["size"] == "smoke" and data["benchmarks"] == list(BENCHMARKS) and not data["failed"], detail
    rows = data["rows"]
    assert len(rows) >= len(BENCHMARKS), detail
    from dockerd import IN_CI

    from benchmarks.dockerd import missing

    no_docker = missing()
    assert not (no_docker and IN_CI), f"CI must have Docker: {no_docker}"
    for row in rows:
        if no_docker and row["figure"].startswith("docker:"):  # a developer machine without an engine
            assert no_docker in row["error"], detail
            continue
        assert row["error"] is None, detail
        assert isinstance(row["orch"], (int, float)) and row["orch"] > 0, f"{row['figure']}: {row['orch']}\n{detail}"
        assert row["figure"] in r.stdout, detail
        if row["peer_label"].startswith("Huey"):  # the peer may be unavailable (offline), but never half there
            assert row["peer"] is None or row["peer"] > 0, detail
    figures = " ".join(row["figure"] for row in rows)
    for word in ("shell throughput", "raw spawn limit", "control plane", "single submits", "latency",
                 "claim latency", "bytes per queued job", "scheduler CPU", "lease latency", "due -> queued",
                 "concurrency keys", "python: ", "docker: ", "dashboard: overview page", "live event"):
        assert word in figures, f"no {word!r} figure\n{detail}"
