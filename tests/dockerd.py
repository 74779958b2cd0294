"""The Docker engine of the tests (benchmarks/dockerd.py), and skipping where there is none."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.dockerd import IMAGE, Dockerd, missing  # noqa: E402

__all__ = ["IMAGE", "Dockerd", "need_docker"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_docker() -> None:
    """Skip the test on a machine without a Docker engine to be had, saying why; under CI=true (.ci/run installs
    docker.io and busybox-static), fail instead."""
    why = missing()
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI must have Docker: {why}")
        pytest.skip(why)
