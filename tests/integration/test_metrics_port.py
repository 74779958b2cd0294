"""A worker's metrics port: the default, when taken, gives way to the next free port; a port the user chose
must be had. Real listeners on loopback; the real `orch worker` processes: tests/e2e/test_metrics_discovery.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import orch.cli
import orch.config
from orch.config import KEYS, load_settings
from orch.core.errors import ConfigError
from orch.metrics import WorkerMetrics, serve_metrics


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def taken_ports(stack: ExitStack, n: int) -> int:
    """A port P with P .. P+n-1 held (listening) by this test until ``stack`` closes."""
    for _ in range(100):
        first = stack.enter_context(socket.socket())
        first.bind(("127.0.0.1", 0))
        base = first.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for i in range(1, n):
                s = stack.enter_context(socket.socket())
                s.bind(("127.0.0.1", base + i))
                s.listen()
        except OSError:
            continue
        first.listen()
        return base
    raise AssertionError(f"no run of {n} free ports")


async def render(accept: str) -> tuple[bytes, str]:
    return WorkerMetrics().render_for(accept)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_a_taken_default_port_gives_way_to_the_next_free_one_and_a_chosen_one_does_not() -> None:
    async def main() -> None:
        with ExitStack() as stack:
            base = taken_ports(stack, 2)
            runner = await serve_metrics("127.0.0.1", base, render, "metrics.worker_port", next_free=True)
            try:
                port = runner.addresses[0][1]
                assert port > base + 1
                text = await asyncio.to_thread(scrape, port)
                assert "orch_worker_slots" in text
            finally:
                await runner.cleanup()
            with pytest.raises(ConfigError) as info:
                await serve_metrics("127.0.0.1", base, render, "metrics.worker_port")
            assert f"cannot listen on 127.0.0.1:{base} for metrics" in info.value.message
            assert "--metrics-port" in info.value.message and info.value.field == "metrics.worker_port"

    asyncio.run(main())


def test_the_metrics_port_is_explicit_when_a_flag_the_environment_or_the_file_sets_it(tmp_path: Path) -> None:
    key = "metrics.worker_port"
    assert not load_settings(None, environ={}).explicit(key)
    assert not load_settings(None, environ={"ORCH_METRICS_WORKER_PORT": ""}).explicit(key)
    assert load_settings(None, {key: 9091}, environ={}).explicit(key)  # the default value, but asked for
    assert load_settings(None, environ={"ORCH_METRICS_WORKER_PORT": "9095"}).explicit(key)
    config = tmp_path / "orch.yaml"
    config.write_text("metrics:\n  worker_port: 9096\n")
    from_file = load_settings(config, environ={})
    assert from_file.explicit(key) and from_file[key] == 9096
    assert not from_file.explicit("metrics.host")


class _Agent:
    metrics = WorkerMetrics()


def test_orch_worker_moves_off_a_taken_default_port_and_logs_where(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """`orch worker`'s listener start, with the default port moved onto one this test holds."""

    async def main() -> None:
        with ExitStack() as stack:
            base = taken_ports(stack, 1)
            monkeypatch.setitem(KEYS, "metrics.worker_port", dataclasses.replace(KEYS["metrics.worker_port"],
                                                                                 default=base))
            settings = load_settings(None, environ={})
            with caplog.at_level(logging.INFO, logger="orch"):
                runner: Any = await orch.cli._worker_metrics(settings, _Agent())
            try:
                port = runner.addresses[0][1]
                assert port != base
                assert f"metrics port {base} is taken; worker metrics on http://127.0.0.1:{port}/metrics" in caplog.text
                assert orch.cli._metrics_address(settings, runner) == f"127.0.0.1:{port}"
            finally:
                await runner.cleanup()
            # Asked for by name (here a flag): the port must be had, as before.
            chosen = load_settings(None, {"metrics.worker_port": base}, environ={})
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{base} for metrics"):
                await orch.cli._worker_metrics(chosen, _Agent())

    asyncio.run(main())


class _Listening:
    def __init__(self, host: str, port: int) -> None:
        self.addresses = [(host, port)]


def test_a_worker_listening_everywhere_gives_its_own_name_or_nothing(caplog: pytest.LogCaptureFixture) -> None:
    named = load_settings(None, {"worker.host": "box-7.example.com"}, environ={})
    assert orch.cli._metrics_address(named, _Listening("0.0.0.0", 9091)) == "box-7.example.com:9091"
    assert orch.cli._metrics_address(named, _Listening("::", 9091)) == "box-7.example.com:9091"
    assert orch.cli._metrics_address(named, _Listening("::1", 9092)) == "[::1]:9092"
    odd = load_settings(None, {"worker.host": "my box"}, environ={})
    with caplog.at_level(logging.WARNING, logger="orch"):
        assert orch.cli._metrics_address(odd, _Listening("0.0.0.0", 9091)) == ""
    assert "not telling the scheduler where this worker's metrics are" in caplog.text
