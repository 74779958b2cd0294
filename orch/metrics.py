"""Prometheus collectors of the scheduler, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.submitted = Counter(
            "orch_jobs_submitted", "Jobs accepted by the scheduler.", ["queue"], registry=self.registry
        )
        self.stale = Counter(
            "orch_stale_reports",
            "Worker reports refused because they named an attempt that is no longer current.",
            ["kind"], registry=self.registry,
        )
        self.lost_workers = Counter(
            "orch_workers_lost", "Workers marked lost after missing heartbeats.", registry=self.registry
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
