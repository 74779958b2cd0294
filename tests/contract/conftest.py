"""The store contract suite runs every test once per backend (tests/storekit.py: BACKENDS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from storekit import BACKENDS, Body, Run, run_on


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(backend: str, request: pytest.FixtureRequest) -> Run:
    """``run(tmp_path, body, **store_kw)``: ``body(store, clock)`` on a fresh store of the backend (PostgreSQL: a
    database of its own on the session's server, the same one for every run of one test)."""
    dsn: str | None = None
    if backend == "postgres":
        dsn = request.getfixturevalue("postgres_server").database()

    def go(tmp_path: Path, body: Body, **store_kw: Any) -> None:
        if dsn is not None:
            store_kw["dsn"] = dsn
        run_on(backend, tmp_path, body, **store_kw)

    return go
