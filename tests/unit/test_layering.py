"""The layers hold (import-linter), the typed parts type-check (mypy), and state names live in the core only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orch.core.states import JobState, Outcome, WorkerState

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(f"{name} is not installed beside {sys.executable}: pip install -e '.[test]'")
    return str(exe)


def test_import_linter_contracts_are_kept() -> None:
    done = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "5 kept" in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_core_store_client_and_worker_are_mypy_clean() -> None:
    """The SDK (orch/sdk.py, what users import) is typed and checked with them. Each backend passes as an implementation of the Store contract (``_check`` at the end of its module)."""
    done = subprocess.run([_tool("mypy"), "orch/core", "orch/store", "orch/worker", "orch/client.py",
                           "orch/compose.py", "orch/sdk.py", "orch/plugins.py", "orch/__init__.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


JOB_AND_WORKER_STATES = {s.value for s in JobState} | {s.value for s in WorkerState}
_QUOTED = re.compile(r"'(" + "|".join(sorted(JOB_AND_WORKER_STATES)) + r")'")
_SQL = re.compile(r"\b(SELECT|UPDATE|INSERT|DELETE|WHERE|CASE WHEN)\b")


def _state_literals(path: Path) -> list[str]:
    """Where ``path`` names a state by a string literal: compared with one (``state == "queued"``, ``in
    ("a", "b")``), listed as a set of them (a tuple or an OpenAPI ``enum``), or quoted in SQL text.

    A JSON field that happens to share a state's name (a heartbeat's ``running`` list) is not a state."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: list[tuple[int, int, str]] = []

    def name(n: ast.AST) -> bool:
        return isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in JOB_AND_WORKER_STATES

    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            up = parents.get(node)
            if name(node) and isinstance(up, ast.Compare):
                hit = True
            elif name(node) and isinstance(up, (ast.Tuple, ast.List)):  # a set literal: a set of field names
                group = parents.get(up)
                hit = (isinstance(group, ast.Compare) or sum(map(name, up.elts)) >= 2
                       or (isinstance(group, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "enum"
                                                               for k, v in zip(group.keys, group.values, strict=True)
                                                               if v is up)))
            elif _QUOTED.search(node.value) and _SQL.search(node.value):
                hit = True
        if hit:
            found.append((node.lineno, node.col_offset, f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}"))
    return [text for _, _, text in sorted(found)]


def test_no_state_name_is_a_string_literal_outside_the_core() -> None:
    """States are named once, in orch/core/states.py: everything else (SQL text included) uses the enums."""
    hits = [h for p in sorted((ROOT / "orch").rglob("*.py")) if "core" not in p.relative_to(ROOT / "orch").parts
            for h in _state_literals(p)]
    assert hits == []


def test_the_literal_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = ROOT / "orch" / "_sample_for_test.py"
    sample.write_text("A = x == 'queued'\nB = \"SELECT 1 WHERE state = 'running'\"\nC = 'worker lost'\n"
                      "D = ('failed', 'cancelled')\nE = {'running': []}\nF = {'enum': ['alive']}\n")
    try:
        assert [h.split(": ", 1)[1] for h in _state_literals(sample)] == [
            "'queued'", '"SELECT 1 WHERE state = \'running\'"', "'failed'", "'cancelled'", "'alive'"]
    finally:
        sample.unlink()


def test_outcomes_that_share_a_job_state_name_mean_the_same() -> None:
    """An attempt that ended ``succeeded``/``failed``/``cancelled`` is stored by the name its job state has."""
    shared = {o.value for o in Outcome} & {s.value for s in JobState}
    assert shared == {"running", "succeeded", "failed", "cancelled"}
