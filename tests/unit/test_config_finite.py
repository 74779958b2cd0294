"""Unit tests: nan and infinities are refused for every number in the settings, wherever it comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

import orch.config
from orch.config import ENV_ALIASES, KEYS, env_name, load_settings
from orch.core.errors import ConfigError

FLOATS = sorted(k for k, spec in KEYS.items() if spec.kind == "float")
INTS = sorted(k for k, spec in KEYS.items() if spec.kind == "int" and k != "concurrency")
NOT_FINITE = ["nan", "inf", "-inf", "NaN", "Infinity", "1e400"]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-such-dir" / "config.yaml")


def env_var(key: str) -> str:
    return next((name for name, k in ENV_ALIASES.items() if k == key), env_name(key))


def nested(key: str, value: str) -> str:
    """``a.b.c: v`` as nested YAML mappings."""
    *parents, last = key.split(".")
    lines = [f"{'  ' * i}{p}:" for i, p in enumerate(parents)]
    return "\n".join([*lines, f"{'  ' * len(parents)}{last}: {value}"]) + "\n"


def test_there_are_numbers_to_check() -> None:
    assert "scheduler.lease_ttl" in FLOATS and "retry.backoff.jitter" in FLOATS and "scheduler.port" in INTS


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("text", NOT_FINITE)
def test_not_finite_from_the_environment_is_refused(key: str, text: str) -> None:
    name = env_var(key)
    with pytest.raises(ConfigError) as info:
        load_settings(None, None, environ={name: text})
    assert key in info.value.message and name in info.value.message
    assert "finite" in info.value.message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("key", FLOATS + INTS)
@pytest.mark.parametrize("yaml_value", [".nan", ".inf", "-.inf", ".NaN", "1.0e+400"])
def test_not_finite_in_the_file_is_refused(tmp_path: Path, key: str, yaml_value: str) -> None:
    cfg = tmp_path / "orch.yaml"
    cfg.write_text(nested(key, yaml_value))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, None, environ={})
    assert key in info.value.message and str(cfg) in info.value.message


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-inf"])
def test_not_finite_from_flags_is_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {key: value}, environ={})
    assert key in info.value.message and "command-line flags" in info.value.message


@pytest.mark.parametrize("yaml_value", ["[.inf]", "[.nan]", "[1, -.inf]"])
def test_not_finite_exit_codes_are_refused(tmp_path: Path, yaml_value: str) -> None:
    cfg = tmp_path / "orch.yaml"
    cfg.write_text(f"retry:\n  on_exit: {yaml_value}\n")
    with pytest.raises(ConfigError, match="retry.on_exit"):
        load_settings(cfg, None, environ={})


def test_finite_values_still_load(tmp_path: Path) -> None:
    s = load_settings(None, {"retry.backoff.cap": "1e3"}, environ={"ORCH_SCHEDULER_LEASE_TTL": "2.5"})
    assert s["scheduler.lease_ttl"] == 2.5 and s["retry.backoff.cap"] == 1000.0
