"""Unit tests of settings: defaults, YAML file, ORCH_* environment, flags, precedence and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import orch.config
from orch.config import KEYS, load_settings, normalize_server
from orch.core.errors import ConfigError


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's own config file must not leak in: point the default path at nothing."""
    missing = tmp_path / "no-such-dir" / "config.yaml"
    monkeypatch.setattr(orch.config, "default_config_path", lambda: missing)
    return missing


def write(tmp_path: Path, text: str, name: str = "orch.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults() -> None:
    s = load_settings(None, None, environ={})
    assert s.source is None
    assert s["scheduler.host"] == "127.0.0.1"
    assert s["scheduler.port"] == 8080
    assert s["worker.concurrency"] == 4
    assert s.concurrency == 4
    assert s["worker.queues"] == ["default"]
    assert s["retry.max_attempts"] == 3
    assert s["retry.backoff.base"] == 1.0
    assert s["retry.on_exit"] is None
    assert s["logging.level"] == "info"
    assert s["storage.synchronous"] == "FULL"
    assert s["client.server"] == "http://127.0.0.1:8080"
    p = s.retry_policy
    assert (p.max_attempts, p.base, p.factor, p.cap, p.jitter, p.retry_on_exit) == (3, 1.0, 2.0, 300.0, 0.2, None)


def test_every_key_has_a_default_and_help() -> None:
    s = load_settings(None, None, environ={})
    for key, spec in KEYS.items():
        assert spec.help, key
        if key != "concurrency":
            assert s[key] is not None or spec.kind == "codes", key


def test_settings_are_frozen() -> None:
    s = load_settings(None, None, environ={})
    with pytest.raises(AttributeError):
        s.source = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s["worker.concurrency"] = 9  # type: ignore[index]


def test_file_values(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
scheduler:
  port: 9191
  lease_ttl: 4.5
worker:
  concurrency: 8
  queues: [gpu, cpu]
retry:
  max_attempts: 5
  on_exit: [75, 99]
  backoff:
    base: 0.25
    cap: 30
logging:
  level: DEBUG
storage:
  data_dir: /srv/orch
  synchronous: normal
client:
  server: "box:7000"
""")
    s = load_settings(cfg, None, environ={})
    assert s.source == str(cfg)
    assert s["scheduler.port"] == 9191
    assert s["scheduler.lease_ttl"] == 4.5
    assert s["worker.concurrency"] == 8
    assert s["worker.queues"] == ["gpu", "cpu"]
    assert s["retry.max_attempts"] == 5
    assert s["retry.on_exit"] == (75, 99)
    assert s["retry.backoff.base"] == 0.25
    assert s["retry.backoff.cap"] == 30.0
    assert s["retry.backoff.factor"] == 2.0  # not in the file: default
    assert s["logging.level"] == "debug"
    assert s["storage.synchronous"] == "NORMAL"
    assert s.db_path == Path("/srv/orch/orch.db")
    assert s["client.server"] == "http://box:7000"
    assert s.retry_policy.base == 0.25 and s.retry_policy.retry_on_exit == (75, 99)


def test_dotted_keys_in_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "retry.backoff.base: 7\nworker.concurrency: 3\n")
    s = load_settings(cfg, None, environ={})
    assert s["retry.backoff.base"] == 7.0
    assert s["worker.concurrency"] == 3


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), None, environ={})
    assert s["worker.concurrency"] == 4


def test_config_named_by_orch_config_env(tmp_path: Path) -> None:
    cfg = write(tmp_path, "worker:\n  concurrency: 11\n")
    s = load_settings(None, None, environ={"ORCH_CONFIG": str(cfg)})
    assert s["worker.concurrency"] == 11
    assert s.source == str(cfg)


def test_default_config_path_is_read_when_present(tmp_path: Path, no_user_config: Path) -> None:
    no_user_config.parent.mkdir(parents=True)
    no_user_config.write_text("worker:\n  concurrency: 12\n")
    s = load_settings(None, None, environ={})
    assert s["worker.concurrency"] == 12
    assert s.source == str(no_user_config)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_settings(missing, None, environ={})


def test_environment_values(tmp_path: Path) -> None:
    s = load_settings(None, None, environ={
        "ORCH_WORKER_CONCURRENCY": "6",
        "ORCH_SERVER": "sched.local:9000",
        "ORCH_DATA_DIR": str(tmp_path / "data"),
        "ORCH_WORKER_QUEUES": "a,b",
        "ORCH_RETRY_BACKOFF_BASE": "0.5",
        "ORCH_RETRY_ON_EXIT": "3,4",
        "ORCH_LOGGING_LEVEL": "WARNING",
    })
    assert s["worker.concurrency"] == 6
    assert s.concurrency == 6
    assert s["client.server"] == "http://sched.local:9000"
    assert s.data_dir == tmp_path / "data"
    assert s.db_path == tmp_path / "data" / "orch.db"
    assert s["worker.queues"] == ["a", "b"]
    assert s["retry.backoff.base"] == 0.5
    assert s["retry.on_exit"] == (3, 4)
    assert s["logging.level"] == "warning"


def test_empty_environment_value_is_ignored() -> None:
    s = load_settings(None, None, environ={"ORCH_WORKER_CONCURRENCY": ""})
    assert s["worker.concurrency"] == 4


def test_precedence_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    cfg = write(tmp_path, "worker:\n  concurrency: 2\nscheduler:\n  port: 9001\nretry:\n  max_attempts: 4\n")
    env = {"ORCH_WORKER_CONCURRENCY": "3", "ORCH_SCHEDULER_PORT": "9002"}
    s = load_settings(cfg, {"worker.concurrency": 5, "scheduler.port": None}, environ=env)
    assert s["worker.concurrency"] == 5  # flag
    assert s["scheduler.port"] == 9002  # env (the flag was not given)
    assert s["retry.max_attempts"] == 4  # file
    assert s["retry.backoff.cap"] == 300.0  # default
    s = load_settings(cfg, None, environ=env)
    assert s["worker.concurrency"] == 3
    s = load_settings(cfg, None, environ={})
    assert s["worker.concurrency"] == 2


def test_flag_values_given_as_text_are_coerced() -> None:
    s = load_settings(None, {"worker.concurrency": "9", "retry.backoff.base": "1.5"}, environ={})
    assert s["worker.concurrency"] == 9
    assert s["retry.backoff.base"] == 1.5


def test_unknown_flag_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="worker.concurency"):
        load_settings(None, {"worker.concurency": 3}, environ={})


def test_top_level_concurrency_alias(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "concurrency: 6\n"), None, environ={})
    assert s["worker.concurrency"] == 6
    assert s.concurrency == 6
    s = load_settings(None, None, environ={"ORCH_CONCURRENCY": "7"})
    assert s.concurrency == 7


def test_concurrency_alias_keeps_precedence(tmp_path: Path) -> None:
    """The alias in the file must not beat the environment or a flag."""
    cfg = write(tmp_path, "concurrency: 6\n")
    assert load_settings(cfg, {"worker.concurrency": 2}, environ={}).concurrency == 2
    assert load_settings(cfg, None, environ={"ORCH_WORKER_CONCURRENCY": "5"}).concurrency == 5


def test_alias_and_full_key_together_in_one_file_is_an_error(tmp_path: Path) -> None:
    cfg = write(tmp_path, "concurrency: 6\nworker:\n  concurrency: 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, None, environ={})
    assert "concurrency" in info.value.message and str(cfg) in info.value.message


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "worker:\n  concurency: 4\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, None, environ={})
    assert "worker.concurency" in info.value.message
    assert str(cfg) in info.value.message
    assert info.value.exit_code == 2


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "schedular:\n  port: 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, None, environ={})
    assert "schedular.port" in info.value.message and str(cfg) in info.value.message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("worker:\n  concurrency: many\n", "worker.concurrency"),
        ("worker:\n  concurrency: 0\n", "worker.concurrency"),
        ("worker:\n  concurrency: true\n", "worker.concurrency"),
        ("worker:\n  concurrency: 2.5\n", "worker.concurrency"),
        ("logging:\n  level: loud\n", "logging.level"),
        ("scheduler:\n  port: 70000\n", "scheduler.port"),
        ("scheduler:\n  lease_ttl: fast\n", "scheduler.lease_ttl"),
        ("worker:\n  queues: []\n", "worker.queues"),
        ("worker:\n  queues: [\"has space\"]\n", "worker.queues"),
        ("retry:\n  on_exit: [0]\n", "retry.on_exit"),
        ("retry:\n  backoff:\n    factor: 0.5\n", "retry.backoff.factor"),
        ("storage:\n  synchronous: OFF_PLEASE\n", "storage.synchronous"),
        ("worker:\n  concurrency:\n", "worker.concurrency"),
    ],
)
def test_bad_value_in_file_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, None, environ={})
    assert key in info.value.message
    assert str(cfg) in info.value.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n", "worker: [\n"])
def test_file_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError, match=str(cfg)):
        load_settings(cfg, None, environ={})


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("ORCH_WORKER_CONCURRENCY", "lots", "worker.concurrency"),
        ("ORCH_WORKER_CONCURRENCY", "0", "worker.concurrency"),
        ("ORCH_LOGGING_LEVEL", "loud", "logging.level"),
        ("ORCH_SCHEDULER_PORT", "http", "scheduler.port"),
    ],
)
def test_bad_environment_value_names_key_and_variable(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, None, environ={name: value})
    assert key in info.value.message
    assert name in info.value.message


def test_bad_flag_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="worker.concurrency"):
        load_settings(None, {"worker.concurrency": 0}, environ={})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("localhost:8080", "http://localhost:8080"),
        ("10.0.0.5:9000", "http://10.0.0.5:9000"),
        (":8080", "http://127.0.0.1:8080"),
        ("http://sched.example:8080", "http://sched.example:8080"),
        ("http://sched.example:8080/", "http://sched.example:8080"),
        ("https://sched.example", "https://sched.example"),
        ("  box:1  ", "http://box:1"),
    ],
)
def test_normalize_server(given: str, expected: str) -> None:
    assert normalize_server(given) == expected


@pytest.mark.parametrize("given", ["", "   ", "/"])
def test_normalize_server_rejects_empty(given: str) -> None:
    with pytest.raises(ConfigError):
        normalize_server(given)


def test_server_from_flag_is_normalized() -> None:
    s = load_settings(None, {"client.server": ":9999", "worker.join": "h:1/"}, environ={})
    assert s["client.server"] == "http://127.0.0.1:9999"
    assert s["worker.join"] == "http://h:1"
