"""End to end: two `orch worker`s on one machine, as typed (no --metrics-port), both start; the second takes the
next free metrics port; the scheduler lists every metrics listener for Prometheus' HTTP service discovery, and a
real Prometheus, configured from examples/prometheus.yml, finds and scrapes them all.

Prometheus comes from Debian's `prometheus` package; `.ci/run` installs it. Where it is missing, its test fails
under CI (the CI environment variable set) and is skipped on a developer's machine, like the promtool test.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from helpers import (
    ROOT,
    Proc,
    client_token,
    free_port,
    http,
    orch_cmd,
    orch_test_env,
    run_cli,
    start_scheduler,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # a real Prometheus finding the listeners: not about storage


def prometheus_or_skip() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: .ci/run installs it (Debian's prometheus package)")
        pytest.skip("prometheus is not installed (apt-get install prometheus); CI installs it")
    return exe


def registered(url: str) -> dict[str, dict[str, Any]]:
    status, body = http("GET", url + "/v1/workers")
    assert status == 200, body
    return {w["name"]: w for w in body["workers"] if w["state"] == "alive"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A scheduler with a metrics listener on a free port, and two workers started without a metrics port:
    both want the default (9091), so the second (at least) takes another."""
    tmp = tmp_path_factory.mktemp("discovery")
    (tmp / "data").mkdir()
    env = orch_test_env(tmp / "data")
    sched_metrics = free_port()
    sched, url = start_scheduler(tmp, env, extra=["--metrics-port", str(sched_metrics)])
    procs = [sched]
    as_typed = {k: v for k, v in env.items() if k != "ORCH_METRICS_WORKER_PORT"}
    try:
        for name in ("wa", "wb"):  # one after the other: the second surely finds the first one's port taken
            proc = Proc([*orch_cmd(), "worker", "--join", url.split("://", 1)[1], "--name", name,
                         "--concurrency", "1"], tmp / f"{name}.log", as_typed)
            procs.append(proc)

            def joined(proc: Proc = proc, name: str = name) -> bool:
                if not proc.alive():
                    raise AssertionError(f"worker {name} exited {proc.p.returncode}: {proc.log()}")
                return name in registered(url)

            wait_until(joined, 30, f"{name} to register")
        yield {"url": url, "tmp": tmp, "env": env, "scheduler_metrics": sched_metrics, "workers": procs[1:]}
    finally:
        for p in reversed(procs):
            p.stop()


def test_two_workers_as_typed_both_serve_metrics_and_the_scheduler_lists_them(cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    out = run_cli(["workers", "--json", "--server", url], cluster["env"])
    assert out.returncode == 0, out.stderr
    shown = {w["name"]: w["metrics"] for w in json.loads(out.stdout)["workers"]}
    assert set(shown) == {"wa", "wb"} and shown["wa"] != shown["wb"], shown
    for metrics in shown.values():
        assert metrics.startswith("http://127.0.0.1:") and metrics.endswith("/metrics"), metrics
        with urllib.request.urlopen(metrics, timeout=10) as resp:
            assert "orch_worker_slots" in resp.read().decode()
    logs = [p.log() for p in cluster["workers"]]
    assert all(p.alive() for p in cluster["workers"]), logs
    assert any("is taken; worker metrics on" in text for text in logs), logs
    moved = next(text for text in logs if "is taken; worker metrics on" in text)
    assert "metrics port 9091 is taken" in moved, moved

    status, groups = http("GET", url + "/v1/metrics/targets")
    assert status == 200, groups
    workers = registered(url)
    assert groups == [
        {"targets": [f"127.0.0.1:{cluster['scheduler_metrics']}"], "labels": {"role": "scheduler"}},
        *({"targets": [shown[name].split("//", 1)[1].split("/", 1)[0]],
           "labels": {"role": "worker", "worker": workers[name]["id"], "name": name}} for name in ("wa", "wb")),
    ]


def test_prometheus_finds_every_listener_by_http_service_discovery(cluster: dict[str, Any], tmp_path: Path) -> None:
    prometheus = prometheus_or_skip()
    example = ROOT / "examples" / "prometheus.yml"  # promtool checks it as it is: test_why_metrics_logs.py

    # The example, pointed at this scheduler, its token, and a quick pace.
    config = yaml.safe_load(example.read_text())
    config["global"]["scrape_interval"] = "1s"
    (job,) = config["scrape_configs"]
    (sd,) = job["http_sd_configs"]
    token = tmp_path / "orch-client-token"
    token.write_text(client_token(cluster["tmp"] / "data") or "")
    token.chmod(0o600)
    sd.update(url=cluster["url"] + "/v1/metrics/targets", refresh_interval="1s")
    sd["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = Proc([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], tmp_path / "prometheus.log",
                {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)})
    try:
        def targets() -> list[dict[str, Any]] | None:
            if not proc.alive():
                raise AssertionError(f"prometheus exited: {proc.log()}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets?state=active", timeout=5) as resp:
                active = json.loads(resp.read())["data"]["activeTargets"]
            up = [t for t in active if t["health"] == "up"]
            return active if len(active) == 3 and len(up) == 3 else None

        active = wait_until(targets, 40, "prometheus to scrape the scheduler and both workers")
        workers = registered(cluster["url"])
        seen = {(t["labels"]["job"], t["labels"]["role"], t["labels"].get("worker"), t["labels"].get("name"))
                for t in active}
        assert seen == {("orch", "scheduler", None, None), ("orch", "worker", workers["wa"]["id"], "wa"),
                        ("orch", "worker", workers["wb"]["id"], "wb")}, seen
        assert {t["scrapeUrl"] for t in active if t["labels"]["role"] == "worker"} == {
            w["metrics"] for w in workers.values()}
    finally:
        proc.stop()
        assert not proc.alive()
