"""End to end: what the CLI prints for people. Server text shown escaped, answers that are not orch named as
such, bad addresses refused in one line, `orch workers --all`, and `orch up`'s try: line run as printed."""

from __future__ import annotations

import pytest

from helpers import (
    run_cli,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("args", [
    ["jobs", "--server", "htp://127.0.0.1:8080"],
    ["run", "--server", "http://127.0.0.1:80a80", "echo", "hi"],
    ["workers", "--server", "http://:8080"],
    ["status", "1", "--server", "http://a b:8080"],
    ["run", "--env", "NOVALUE", "echo", "hi"],
    ["run", "--env", "=x", "echo", "hi"],
])
def test_bad_input_is_one_line_and_exit_2(orch_env: dict[str, str], args: list[str]) -> None:
    r = run_cli(args, orch_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("orch: ") and "Traceback" not in r.stderr, r.stderr
