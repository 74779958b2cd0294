"""Keep the docs in step with the code: settings, CLI commands, API routes, the test command."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

import orch.cli
import orch.config
from orch.compose import build_app
from orch.config import ENV_ALIASES, KEYS, env_name, load_settings
from orch.core.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
DEV_YAML = ROOT / "config" / "dev.yaml"
README = ROOT / "README.md"
ALIASES = {"concurrency"}  # keys that are other keys' aliases: documented in a comment only


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-such-config.yaml")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = prefix + str(k)
        if isinstance(v, dict) and key not in KEYS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fenced_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]


def test_dev_yaml_sets_every_key_to_its_default() -> None:
    settings = load_settings(DEV_YAML, environ={})
    defaults = load_settings(None, environ={})
    keys = set(flatten(yaml.safe_load(DEV_YAML.read_text(encoding="utf-8"))))
    assert keys - set(KEYS) == set(), "config/dev.yaml has keys orch does not know"
    assert set(KEYS) - ALIASES - keys == set(), "config/dev.yaml lacks keys"
    for key in KEYS:
        assert settings[key] == defaults[key], f"{key} in config/dev.yaml is not its default"


def test_dev_yaml_mentions_every_key_and_env_name() -> None:
    text = DEV_YAML.read_text(encoding="utf-8")
    for key in KEYS:
        assert re.search(rf"\b{env_name(key)}\b", text), f"config/dev.yaml does not mention {env_name(key)}"
        assert re.search(rf"\b{re.escape(key.split('.')[-1])}\b", text), f"config/dev.yaml does not mention {key}"
    for name in [*ENV_ALIASES, "ORCH_CONFIG"]:
        assert name in text, f"config/dev.yaml does not mention {name}"


def test_readme_test_command_is_what_ci_runs() -> None:
    blocks = fenced_blocks(README.read_text(encoding="utf-8"))
    assert blocks and "orch up" in blocks[0], "the README must start with the install-and-run command"
    test_block = next(b for b in blocks if "pytest" in b)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert test_block == ci_lines[-1].strip()


def test_readme_mentions_every_command() -> None:
    text = README.read_text(encoding="utf-8")
    commands = typer.main.get_command(orch.cli.app).commands  # type: ignore[attr-defined]
    assert commands
    for name, command in commands.items():
        if not command.hidden:
            assert f"orch {name}" in text, f"README.md does not mention `orch {name}`"


def test_readme_lists_every_route(tmp_path: Path) -> None:
    settings = load_settings(None, {"storage.data_dir": str(tmp_path)}, environ={})
    app = build_app(settings)
    paths = {resource.canonical for resource in app.router.resources()}
    assert "/v1/jobs" in paths
    text = README.read_text(encoding="utf-8")
    for path in sorted(p for p in paths if not p.startswith("/ui")):
        assert f"`{path}`" in text, f"README.md's API table lacks {path}"
    # The dashboard's pages are listed in docs/dashboard.md, each of its routes.
    dashboard = (README.parent / "docs" / "dashboard.md").read_text(encoding="utf-8")
    for path in sorted(p for p in paths if p.startswith("/ui")):
        assert f"`{path}`" in dashboard, f"docs/dashboard.md does not list {path}"


def test_examples_are_valid() -> None:
    examples = ROOT / "examples"
    load_settings(examples / "config.yaml", environ={})
    kinds = set()
    for n, line in enumerate((examples / "jobs.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            kinds.add(parse_spec(json.loads(line), f"line {n}: ").kind)
    assert kinds == {"command", "shell", "task"}
