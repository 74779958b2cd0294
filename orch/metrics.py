"""Prometheus collectors of the scheduler and of the worker, each in a registry of its own.

Counters and histograms move as things happen (the scheduler's ``Api.committed()``
feeds every job state change to ``SchedulerMetrics.observe()``; the worker counts
the attempts it ends). Gauges of "how many are in each state right now" are
read at scrape time from a snapshot the scheduler refreshes just before it
renders (``set_snapshot``): a few GROUP BY reads per scrape, nothing per job.

Names follow Prometheus conventions: ``orch_`` prefix, ``_total`` on counters,
``_seconds`` for times; labels are bounded sets (queue, state, outcome, route,
live worker), never job ids.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Awaitable, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder

from orch import __version__
from orch.core.errors import ConfigError
from orch.core.records import Snapshot
from orch.core.states import JobState, Outcome, WorkerState

# Execution and queue-wait times, 5 ms to 1 h. Job times spread over orders of magnitude (roughly log-normal),
# so the buckets are spaced on a log scale; histogram_quantile() interpolates linearly inside a bucket, so a
# quantile it reads can be off by up to the ratio of the bucket's bounds. Where most jobs run, 0.1 s to a few
# minutes, that ratio is at most 5/3 (1, 1.5, 2.5, 4, 6, 10, ...): jobs of about a second read a p99 under
# 1.5 s, where the old 1 -> 2.5 step read 2.49 s. Below 0.1 s (the cost of starting a process) and above
# 4 minutes the steps are wider, to keep the series per queue few (25 buckets, in two histograms).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 15.0,
                    25.0, 40.0, 60.0, 100.0, 150.0, 250.0, 600.0, 1800.0, 3600.0)
# API requests: 1 ms to 60 s (lease and wait requests long-poll for up to scheduler.long_poll_timeout).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

UNFINISHED = tuple(st for st in JobState if not st.terminal)
TERMINAL = frozenset(st.value for st in JobState if st.terminal)
# Attempt outcomes whose duration the worker measured (lost and handed-back attempts did not end by themselves).
TIMED_OUTCOMES = frozenset(o.value for o in (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.TIMED_OUT, Outcome.CANCELLED))
_QUEUED, _RUNNING, _RETRYING = JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRYING.value
_SCHEDULED, _BLOCKED = JobState.SCHEDULED.value, JobState.BLOCKED.value
ATTEMPT_OUTCOMES = tuple(o.value for o in Outcome if o is not Outcome.RUNNING)
STALE_KINDS = ("heartbeat", "output", "completion")


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.submitted = Counter(
            "orch_jobs_submitted", "Jobs accepted by the scheduler.", ["queue"], registry=self.registry
        )
        self.replayed = Counter(
            "orch_jobs_replayed", "Ended jobs queued again by a replay (orch retry), by queue.", ["queue"],
            registry=self.registry,
        )
        self.purged = Counter(
            "orch_jobs_purged", "Ended jobs purged with their attempts, output and events (retention, orch purge).",
            registry=self.registry,
        )
        self.stale = Counter(
            "orch_stale_reports",
            "Worker reports refused because they named an attempt that is no longer current.",
            ["kind"], registry=self.registry,
        )
        self.lost_workers = Counter(
            "orch_workers_lost", "Workers marked lost after missing heartbeats.", registry=self.registry
        )
        self.schedule_ticks = Counter(
            "orch_schedule_ticks",
            "Ticks of cron schedules, by what became of them: fired (a job submitted), skipped (the overlap policy: "
            "the previous job still going), missed (older than the catch-up window after downtime, never fired).",
            ["outcome"], registry=self.registry,
        )
        for outcome in ("fired", "skipped", "missed"):
            self.schedule_ticks.labels(outcome)
        r = self.registry
        self.completed = Counter(
            "orch_jobs_completed", "Jobs that reached an end state, by queue and outcome (succeeded, failed, cancelled).",
            ["queue", "outcome"], registry=r,
        )
        self.retries = Counter(
            "orch_job_retries", "Attempts that ended in a retry (the job went to backoff), by queue.", ["queue"], registry=r,
        )
        self.attempts = Counter(
            "orch_attempts_ended",
            "Attempts that ended, by queue and outcome (succeeded, failed, timed_out, lost, cancelled, handed_back).",
            ["queue", "outcome"], registry=r,
        )
        self.leader = Gauge("orch_scheduler_leader", "1 while this scheduler runs the reaper (one of all the "
                            "schedulers of a shared database does), else 0.", registry=r)
        self.started = Counter("orch_attempts_started", "Attempts handed to workers, by queue.", ["queue"], registry=r)
        self.duration = Histogram(
            "orch_job_duration_seconds", "Execution time of attempts that ended on their worker, by queue.",
            ["queue"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "orch_job_queue_wait_seconds", "Time from a job's submit to its first start (claim by a worker), by queue.",
            ["queue"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.http = Histogram(
            "orch_http_request_duration_seconds",
            "Scheduler API request latency, by method, route template and status (long polls included).",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=r,
        )
        Info("orch_build", "Version of orch.", registry=r).info({"version": __version__})
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._state = _StateCollector()
        r.register(self._state)
        self._queues: set[str] = set()
        for kind in STALE_KINDS:
            self._child(self.stale, (kind,))
        self.known_queues(["default"])

    def known_queues(self, queues: Iterable[str]) -> None:
        """Make every series of these queues exist, at 0 until something happens.

        Prometheus's rate() and increase() need two samples of a series: one that first appears
        already counting 200 has no earlier sample, and those 200 are lost to every dashboard. So
        the series of the queues the store knows are made at start (build_app), before the first
        scrape, and the default queue's always. A queue first seen in a committed batch (observe)
        gets all its series then, at once: Prometheus still cannot count that batch's own changes
        to it, if they land before the next scrape (there is no earlier moment to make them at),
        but it counts everything after it, every outcome's first included.
        """
        for queue in queues:
            if queue in self._queues:
                continue
            self._queues.add(queue)
            for metric in (self.submitted, self.replayed, self.retries, self.started, self.duration, self.queue_wait):
                self._child(metric, (queue,))
            for state in sorted(TERMINAL):
                self._child(self.completed, (queue, state))
            for outcome in ATTEMPT_OUTCOMES:
                self._child(self.attempts, (queue, outcome))
            self._state.queues.add(queue)

    # ---- fed by the scheduler

    def observe(self, changes: Iterable[Any]) -> None:
        """Count committed job state changes (``store.base.Change``); cheap, no I/O.

        Called once per committed batch: counts are summed per label set first,
        so a batch of a thousand completions costs a few increments, not a
        thousand (each ``labels()`` lookup and locked increment is ~2 us).
        """
        counts: dict[tuple[Any, tuple[str, ...]], int] = {}
        durations: list[tuple[str, float]] = []
        waits: list[tuple[str, float]] = []
        known = self._queues
        for c in changes:
            state, queue = c.state, c.queue
            if queue not in known:
                self.known_queues((queue,))
            if c.unheld or c.unblocked:  # a held job let go, a blocked one released: no submit, start or end
                continue
            if c.replay:
                key: tuple[Any, tuple[str, ...]] = (self.replayed, (queue,))
                counts[key] = counts.get(key, 0) + 1
                continue
            if c.attempt == 0 and (state == _SCHEDULED or state == _QUEUED or state == _BLOCKED):
                # A submit (queued or scheduled before any attempt); not a scheduled job that came due (its
                # change says when it was due): that one was counted when it was submitted.
                if state == _SCHEDULED or c.due is None:
                    key = (self.submitted, (queue,))
                    counts[key] = counts.get(key, 0) + 1
                continue
            outcome = c.outcome
            if outcome is not None:
                key = (self.attempts, (queue, outcome))
                counts[key] = counts.get(key, 0) + 1
                if c.duration is not None and outcome in TIMED_OUTCOMES:
                    durations.append((queue, c.duration))
            if state == _RUNNING and c.worker is not None and outcome is None:
                key = (self.started, (queue,))
                counts[key] = counts.get(key, 0) + 1
                if c.queue_wait is not None:
                    waits.append((queue, c.queue_wait))
            elif state == _RETRYING:
                key = (self.retries, (queue,))
                counts[key] = counts.get(key, 0) + 1
            elif state in TERMINAL:
                key = (self.completed, (queue, state))
                counts[key] = counts.get(key, 0) + 1
        for (metric, labels), n in counts.items():
            self._child(metric, labels).inc(n)
        for hist, values in ((self.duration, durations), (self.queue_wait, waits)):
            for queue, v in values:
                self._child(hist, (queue,)).observe(v)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, remembered (label sets are bounded: queues and outcomes)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.http, (method if method in HTTP_METHODS else "other", route, str(status))).observe(seconds)

    def set_snapshot(self, snapshot: Snapshot, store: Any = None) -> None:
        """The latest ``store.metrics_snapshot()``; ``store`` lends its batch and op counters."""
        self._state.snapshot = snapshot
        self._state.store = store
        self.known_queues(q for q, _ in snapshot.queues)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def render_for(self, accept: str) -> tuple[bytes, str]:
        """Text format, or OpenMetrics when the scraper asks for it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _StateCollector:
    """Gauges read at scrape time from the scheduler's last snapshot."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.store: Any = None
        self.queues: set[str] = set()  # queues seen: they stay at 0 when they empty, rather than vanish

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.snapshot))

    def _families(self, snap: Snapshot | None = None) -> list[Metric]:
        jobs = GaugeMetricFamily("orch_jobs", "Jobs in each state right now.", labels=["state"])
        queues = GaugeMetricFamily(
            "orch_queue_jobs", "Unfinished jobs per queue and state (queued is the queue depth).", labels=["queue", "state"]
        )
        workers = GaugeMetricFamily("orch_workers", "Workers in each state right now.", labels=["state"])
        age = GaugeMetricFamily(
            "orch_worker_heartbeat_age_seconds", "Seconds since each live worker's last heartbeat.", labels=["worker", "name"]
        )
        slots = GaugeMetricFamily(
            "orch_cluster_slots", "Job slots of live (alive) workers, busy or free.", labels=["state"]
        )
        batches = CounterMetricFamily("orch_store_batches", "Write transactions committed by the store (group commits).")
        ops = CounterMetricFamily("orch_store_ops", "Write operations committed by the store.")
        out: list[Metric] = [jobs, queues, workers, age, slots, batches, ops]
        if snap is None:
            return out
        for js in JobState:
            jobs.add_metric([js.value], snap.jobs.get(js, 0))
        for q in sorted(self.queues):
            for js in UNFINISHED:
                queues.add_metric([q, js.value], snap.queues.get((q, js), 0))
        for ws in WorkerState:
            workers.add_metric([ws.value], snap.workers.get(ws, 0))
        busy = free = 0
        for w in snap.live_workers:
            age.add_metric([w.id, w.name], round(w.heartbeat_age, 3))
            if w.state is WorkerState.ALIVE:
                busy += min(w.busy, w.concurrency)
                free += max(0, w.concurrency - w.busy)
        slots.add_metric(["busy"], busy)
        slots.add_metric(["free"], free)
        batches.add_metric([], getattr(self.store, "batches", 0))
        ops.add_metric([], getattr(self.store, "ops", 0))
        return out


class WorkerMetrics:
    """A worker's own metrics: its slots, the attempts it ran by outcome, their execution time."""

    def __init__(self, slots: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        """``slots()`` returns (busy, total) at scrape time."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.slots = slots
        self.jobs = Counter(
            "orch_worker_jobs", "Attempts this worker ran to an end, by queue and outcome.",
            ["queue", "outcome"], registry=self.registry,
        )
        self.duration = Histogram(
            "orch_worker_job_duration_seconds", "Execution time of the attempts this worker ran, by queue.",
            ["queue"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        Info("orch_build", "Version of orch.", registry=self.registry).info({"version": __version__})
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.registry.register(_SlotCollector(self))

    def ended(self, queue: str, outcome: str, seconds: float) -> None:
        key = (queue, outcome)
        children = self._children.get(key)
        if children is None:  # label sets are bounded (queues x outcomes): remember them
            children = self._children[key] = (
                self.jobs.labels(queue, outcome), self.duration.labels(queue) if outcome in TIMED_OUTCOMES else None)
        children[0].inc()
        if children[1] is not None:
            children[1].observe(seconds)

    def render_for(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _SlotCollector:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter([GaugeMetricFamily("orch_worker_slots", "This worker's job slots, busy or free.", labels=["state"])])

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily("orch_worker_slots", "This worker's job slots, busy or free.", labels=["state"])
        busy, total = self.metrics.slots()
        fam.add_metric(["busy"], busy)
        fam.add_metric(["free"], max(0, total - busy))
        return iter([fam])


NEXT_PORTS = 100  # ports above a taken default port that a listener tries, one after the other


async def serve_metrics(host: str, port: int, render: Callable[[str], Awaitable[tuple[bytes, str]]],
                        field: str, *, next_free: bool = False) -> Any:
    """A small HTTP listener with GET /metrics on the running loop; returns its AppRunner (cleanup() it).

    A port that cannot be had is a ConfigError naming ``field``, not a traceback. With ``next_free``
    (the port is a default nobody asked for), a port in use is no error: the next free one above it
    is taken, so a second worker on a machine (next to `orch up`, say) starts as typed. Every other path
    gets a JSON error saying what this port is and where the API is: someone gave it as the scheduler's address.
    """
    from aiohttp import web

    if field == "metrics.worker_port":
        message = ("this port is an orch worker's metrics listener (GET /metrics only); workers serve no API: "
                   "give the address of the scheduler's API")
    else:
        message = ("this port is the orch scheduler's metrics listener (GET /metrics only); its API listens on "
                   "the scheduler's own port (scheduler.port, 8080 unless set)")
    # The code is orch.client.NOT_THE_API: the client then says that this is not an orch API.
    elsewhere_body = {"error": {"code": "not_the_api", "message": message}}

    async def page(request: web.Request) -> web.Response:
        body, content_type = await render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def elsewhere(request: web.Request) -> web.Response:
        return web.json_response(elsewhere_body, status=404)

    app = web.Application()
    app.router.add_get("/metrics", page)
    app.router.add_route("*", "/{path:.*}", elsewhere)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    tried = port
    while True:
        site = web.TCPSite(runner, host, tried, reuse_address=True)
        try:
            await site.start()
            return runner
        except OSError as e:
            await site.stop()
            if next_free and e.errno == errno.EADDRINUSE and tried < min(65535, port + NEXT_PORTS):
                tried += 1
                continue
            await runner.cleanup()
            ports = f"{port}..{tried}" if tried != port else str(port)
            raise ConfigError(
                f"cannot listen on {host}:{ports} for metrics: {os.strerror(e.errno) if e.errno else e}; choose another"
                f" port with --metrics-port or {field} (0 turns the metrics listener off)", field=field,
            ) from None


def metrics_url(runner: Any) -> str:
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/metrics"
