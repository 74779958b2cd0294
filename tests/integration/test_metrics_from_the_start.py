"""Prometheus sees the first batch: every counter and histogram series of a known queue exists at 0 from the
first scrape, so ``increase()`` over two scrapes around a batch counts the whole batch.

Prometheus's ``increase()`` needs two samples of a series: a series that first appears with a value of 200
has no earlier sample, and its 200 is lost. ``increase`` below does what Prometheus does with two scrapes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

import orch.config
from helpers import storage_overrides
from orch.compose import build_app
from orch.config import load_settings

CLIENT = "metrics-client-token"
JOIN = "metrics-join-token"
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def serve(tmp_path: Path, body: Callable[[TestClient], Awaitable[None]]) -> None:
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT, "auth.join_token": JOIN},
                             environ={})

    async def main() -> None:
        async with TestClient(TestServer(build_app(settings), host="127.0.0.1"),
                              headers={"Authorization": f"Bearer {CLIENT}"}) as client:
            await asyncio.wait_for(body(client), 30)

    asyncio.run(main())


async def post(client: TestClient, path: str, body: Any, token: str = CLIENT) -> Any:
    async with client.post(path, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status < 300, (path, resp.status, await resp.text())
        return await resp.json()


async def scrape(client: TestClient) -> Series:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def increase(before: Series, after: Series, name: str, **labels: str) -> float:
    """Prometheus's increase() from two scrapes, summed over the series matching ``labels``: a series
    missing from the first scrape adds nothing, whatever its value in the second."""
    total = 0.0
    for (n, lbls), v in after.items():
        if n == name and all(dict(lbls).get(k) == want for k, want in labels.items()) and (n, lbls) in before:
            total += v - before[(n, lbls)]
    return total


def test_the_first_batch_on_a_fresh_scheduler_is_counted_by_increase(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        first = await scrape(client)
        jobs = (await post(client, "/v1/jobs/batch", {"jobs": [{"command": ["true"]}] * 200}))["jobs"]
        reg = await post(client, "/v1/workers", {"queues": ["default"], "concurrency": 50}, JOIN)
        wid, cred = reg["worker_id"], reg["credential"]
        leased = (await post(client, f"/v1/workers/{wid}/lease", {"max": 30}, cred))["jobs"]
        results = [{"job_id": j["job_id"], "attempt": j["attempt"], "outcome": "succeeded", "exit_code": 0,
                    "duration": 1.0} for j in leased[:20]]
        results += [{"job_id": j["job_id"], "attempt": j["attempt"], "outcome": "timed_out", "duration": 2.0}
                    for j in leased[20:]]
        await post(client, f"/v1/workers/{wid}/complete", {"results": results}, cred)
        second = await scrape(client)
        assert len(jobs) == 200 and len(leased) == 30
        assert increase(first, second, "orch_jobs_submitted_total") == 200
        assert increase(first, second, "orch_attempts_started_total", queue="default") == 30
        assert increase(first, second, "orch_jobs_completed_total", queue="default", outcome="succeeded") == 20
        assert increase(first, second, "orch_attempts_ended_total", queue="default", outcome="timed_out") == 10
        assert increase(first, second, "orch_job_retries_total", queue="default") == 10
        assert increase(first, second, "orch_job_duration_seconds_count", queue="default") == 30
        assert increase(first, second, "orch_job_queue_wait_seconds_count", queue="default") == 30
        # Every outcome of the queue is there from the start, at 0 until it happens.
        for outcome in ("succeeded", "failed", "cancelled"):
            assert first[("orch_jobs_completed_total", (("outcome", outcome), ("queue", "default")))] == 0
        for outcome in ("succeeded", "failed", "timed_out", "lost", "cancelled", "handed_back"):
            assert first[("orch_attempts_ended_total", (("outcome", outcome), ("queue", "default")))] == 0
        for kind in ("heartbeat", "output", "completion"):
            assert first[("orch_stale_reports_total", (("kind", kind),))] == 0

    serve(tmp_path, body)


def test_queues_in_the_store_have_their_series_at_0_after_a_restart(tmp_path: Path) -> None:
    async def before_restart(client: TestClient) -> None:
        await post(client, "/v1/jobs", {"command": ["true"], "queue": "gpu"})
        await post(client, "/v1/workers", {"queues": ["io"]}, JOIN)  # a queue no job has used yet

    async def after_restart(client: TestClient) -> None:
        first = await scrape(client)
        for queue in ("default", "gpu", "io"):
            assert first[("orch_jobs_submitted_total", (("queue", queue),))] == 0, queue
            assert first[("orch_jobs_completed_total", (("outcome", "failed"), ("queue", queue)))] == 0, queue
            assert first[("orch_job_duration_seconds_count", (("queue", queue),))] == 0, queue
            assert first[("orch_queue_jobs", (("queue", queue), ("state", "queued")))] >= 0, queue
        await post(client, "/v1/jobs/batch", {"jobs": [{"command": ["true"], "queue": "gpu"}] * 150
                                              + [{"command": ["true"], "queue": "io"}] * 50})
        second = await scrape(client)
        assert increase(first, second, "orch_jobs_submitted_total", queue="gpu") == 150
        assert increase(first, second, "orch_jobs_submitted_total", queue="io") == 50

    serve(tmp_path, before_restart)
    serve(tmp_path, after_restart)


def test_a_queue_first_seen_in_a_batch_gets_all_its_series_at_once(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        await post(client, "/v1/jobs", {"command": ["true"], "queue": "brand-new"})
        seen = await scrape(client)
        assert seen[("orch_jobs_submitted_total", (("queue", "brand-new"),))] == 1
        # The rest of its series exist too, at 0, so that the first of each is counted by increase().
        assert seen[("orch_jobs_completed_total", (("outcome", "succeeded"), ("queue", "brand-new")))] == 0
        assert seen[("orch_attempts_started_total", (("queue", "brand-new"),))] == 0
        assert seen[("orch_job_queue_wait_seconds_count", (("queue", "brand-new"),))] == 0

    serve(tmp_path, body)
