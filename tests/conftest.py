"""Shared fixtures: a temp data dir and environment for real orch processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import orch_test_env  # noqa: E402


@pytest.fixture
def orch_env(tmp_path: Path) -> dict[str, str]:
    """Environment for orch processes: state under tmp_path, no user config."""
    data = tmp_path / "data"
    data.mkdir()
    return orch_test_env(data)
