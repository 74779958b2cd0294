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
def run(backend: str) -> Run:
    """``run(tmp_path, body, **store_kw)``: ``body(store, clock)`` on a fresh store of the backend."""

    def go(tmp_path: Path, body: Body, **store_kw: Any) -> None:
        run_on(backend, tmp_path, body, **store_kw)

    return go
