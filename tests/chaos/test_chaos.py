"""Chaos at CI size: kill -9 workers, SIGSTOP one past its lease, kill -9 the scheduler; nothing acknowledged is lost."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import helpers
from helpers import ROOT

if str(ROOT) not in sys.path:  # benchmarks/ lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.chaos import run_chaos  # noqa: E402

pytestmark = pytest.mark.e2e

JOBS = 300
WORKERS = 3


@pytest.mark.timeout(180)
def test_chaos_loses_nothing_and_keeps_only_current_results(tmp_path: Path, storage_backend: str) -> None:
    report = run_chaos(tmp_path, JOBS, WORKERS, deadline=60, backend=storage_backend,
                       dsn=helpers.STORAGE_ENV.get("ORCH_STORAGE_DSN", ""))
    detail = f"{report.line()}\n" + "\n".join(report.disruptions + report.violations[:20] + report.unexplained[:20])
    print(detail)
    assert len(report.disruptions) == 4, detail  # all four disruptions landed while jobs were running
    assert report.acked == JOBS, detail
    assert report.lost == 0, detail
    assert not report.unexplained, detail
    assert not report.violations, detail  # every job terminal and succeeded; results from final attempts only
    assert report.lost_attempts > 0, detail  # the disruptions did take attempts down


@pytest.mark.timeout(240)
@pytest.mark.backend_specific
def test_chaos_with_two_replicas_on_postgres_loses_nothing(tmp_path: Path, postgres_server: Any) -> None:
    """The same chaos with two schedulers on one PostgreSQL: the scheduler kill is a kill -9 of the replica that
    runs the reaper; workers are joined to both."""
    report = run_chaos(tmp_path, JOBS, WORKERS, deadline=90, backend="postgres", dsn=postgres_server.database(),
                       replicas=2)
    detail = f"{report.line()}\n" + "\n".join(report.disruptions + report.violations[:20] + report.unexplained[:20])
    print(detail)
    assert len(report.disruptions) == 4, detail
    assert any("leader replica" in d for d in report.disruptions), detail
    assert report.acked == JOBS and report.lost == 0, detail
    assert not report.unexplained and not report.violations, detail
    assert report.lost_attempts > 0, detail
