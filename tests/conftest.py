"""Shared fixtures: a temp data dir and environment for real orch processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import orch_test_env  # noqa: E402


@pytest.fixture
def orch_env(tmp_path: Path) -> dict[str, str]:
    """Environment for orch processes: state under tmp_path, no user config."""
    data = tmp_path / "data"
    data.mkdir()
    return orch_test_env(data)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(tmp_path: Path) -> Iterator[None]:
    """Whatever a test started that still runs at its end (a job left by a worker killed with -9, by
    design, or one a failed test never let finish) is ended with its process group: anything whose
    command line names the test's temp dir."""
    yield
    if not os.path.isdir("/proc"):
        return
    mark = str(tmp_path).encode()
    ours = os.getpgid(0)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if mark not in f.read():
                    continue
            group = os.getpgid(int(name))
            if group != ours:
                os.killpg(group, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
