"""Shared fixtures: a temp data dir and environment for real orch processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402
from helpers import orch_test_env  # noqa: E402

# Tests of these folders run once per storage backend (SQLite, PostgreSQL): they reach storage through the API or
# real processes. A test about one backend's own machinery is marked backend_specific and runs once, as it is.
# ORCH_TEST_BACKENDS narrows the list.
PER_BACKEND = ("integration", "e2e", "chaos")
TEST_BACKENDS = tuple(b for b in os.environ.get("ORCH_TEST_BACKENDS", "sqlite,postgres").split(",") if b)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backend_specific: about one backend's own machinery; runs once, not per backend")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "storage_backend" not in metafunc.fixturenames:
        return
    parts = Path(str(metafunc.definition.path)).parts
    if any(folder in parts for folder in PER_BACKEND) and not metafunc.definition.get_closest_marker("backend_specific"):
        metafunc.parametrize("storage_backend", list(TEST_BACKENDS), indirect=True)


@pytest.fixture(autouse=True)
def storage_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The backend this run of the test stores on. PostgreSQL: a fresh database on the session's server, named to
    every orch the test starts by ORCH_STORAGE_BACKEND and ORCH_STORAGE_DSN (settings read them)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgres":
        dsn = request.getfixturevalue("postgres_server").database()
        monkeypatch.setenv("ORCH_STORAGE_BACKEND", "postgres")
        monkeypatch.setenv("ORCH_STORAGE_DSN", dsn)
        helpers.STORAGE_ENV = {"ORCH_STORAGE_BACKEND": "postgres", "ORCH_STORAGE_DSN": dsn}
    try:
        yield backend
    finally:
        helpers.STORAGE_ENV = {}


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A real PostgreSQL server for the session (tests/pgserver.py); skipped where there is none, failed in CI."""
    from pgserver import PgServer, need_postgres

    need_postgres()
    server = PgServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[object]:
    """A Docker engine for the session (DOCKER_HOST's, or a dockerd of the tests' own), with the test image."""
    from dockerd import Dockerd, need_docker

    need_docker()
    engine = Dockerd().start()
    try:
        yield engine
    finally:
        engine.stop()
