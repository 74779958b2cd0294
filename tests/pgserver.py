"""The PostgreSQL server of the tests (benchmarks/pgserver.py), and skipping where there is none."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.pgserver import PgBouncer, PgServer, bindir, missing, pgbouncer_exe  # noqa: E402

__all__ = ["PgBouncer", "PgServer", "bindir", "missing", "need_pgbouncer", "need_postgres"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_postgres() -> None:
    """Skip the test on a machine without PostgreSQL, saying why; under CI=true, fail instead."""
    why = missing()
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI must have PostgreSQL: {why}")
        pytest.skip(why)


def need_pgbouncer() -> None:
    """Skip the test on a machine without PgBouncer, saying why; under CI=true (.ci/run installs it), fail."""
    if pgbouncer_exe() is not None:
        return
    why = "PgBouncer is not installed (Debian: apt-get install pgbouncer)"
    if IN_CI:
        pytest.fail(f"CI must have PgBouncer: {why}")
    pytest.skip(why)
