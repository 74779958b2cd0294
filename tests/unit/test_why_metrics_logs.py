"""Unit tests of observability: `orch why` explanations, metric names and values, JSON log fields, the examples."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orch.core.records import Event, Job, JobFacts, JobRecord, Snapshot, WorkerLoad
from orch.core.states import JobState, WorkerState
from orch.logs import JsonFormatter
from orch.metrics import DURATION_BUCKETS, SchedulerMetrics, WorkerMetrics
from orch.scheduler.why import explain
from orch.store.base import Change

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0


# --------------------------------------------------------------------------- orch why


def job(state: str, **kw: Any) -> Job:
    fields: dict[str, Any] = {"id": 7, "state": JobState(state), "queue": "q", "priority": 0, "name": None,
                              "command": "true", "attempt": 1, "max_attempts": 3, "created_at": NOW - 60,
                              "started_at": None, "finished_at": NOW, "run_at": None, "worker_id": None,
                              "cancel_requested": False, "exit_code": None, "error": None}
    if "worker" in kw:
        kw["worker_id"] = kw.pop("worker")
    fields.update(kw)
    return Job(**fields)


def worker(wid: str = "w-1", busy: int = 0, concurrency: int = 2, state: str = "alive", age: float = 0.5) -> WorkerLoad:
    return WorkerLoad(wid, f"n-{wid}", WorkerState(state), concurrency, busy, age)


def why(j: Job, *, last_event: dict[str, Any] | None = None, **facts: Any) -> dict[str, Any]:
    event = Event(1, j.id, j.attempt, None, j.state, NOW, last_event["reason"]) if last_event else None
    out = explain(JobFacts(now=NOW, record=JobRecord(j, {"command": ["true"]}, []),
                           lease_expires_at=facts.pop("lease_expires_at", None), last_event=event, **facts),
                  heartbeat_interval=2.0)
    assert out["message"].count("\n") <= 1, "one or two lines"
    assert out["job_id"] == 7 and out["state"] == j.state
    return out


def test_why_no_live_worker_serves_the_queue() -> None:
    out = why(job("queued", attempt=0), position=1, queued=1, workers=[])
    assert out["reason"] == "no_worker"
    assert "no live worker serves queue q" in out["message"]
    out = why(job("queued", attempt=0), position=1, queued=1, workers=[worker(state="draining")])
    assert out["reason"] == "no_worker" and "draining" in out["message"]


def test_why_waiting_for_a_free_slot_with_position() -> None:
    out = why(job("queued", attempt=0), position=3, queued=5, workers=[worker(busy=2), worker("w-2", busy=1, concurrency=1)])
    assert out["reason"] == "waiting_for_slot"
    assert "waiting for a free slot on queue q (position 3 of 5)" in out["message"]
    assert "all 3 slots are busy" in out["message"]
    assert (out["position"], out["slots"], out["busy_slots"]) == (3, 3, 3)
    # Some free slots, but more jobs ahead than slots.
    out = why(job("queued", attempt=0), position=4, queued=4, workers=[worker(busy=1)])
    assert out["reason"] == "waiting_for_slot" and "1 of 2 slots free" in out["message"]
    assert "3 jobs are ahead" in out["message"]
    # Next in line with a free slot.
    out = why(job("queued", attempt=0), position=1, queued=1, workers=[worker(busy=0)])
    assert out["reason"] == "waiting_for_slot" and "should start" in out["message"]


def test_why_in_backoff_until_a_time() -> None:
    out = why(job("retrying", run_at=NOW + 42), last_event={"reason": "exited 3; retry in 42.0s"})
    assert out["reason"] == "backoff"
    assert "in backoff until 2027-01-15T08:00:42.000Z (42.0s from now)" in out["message"]
    assert "after attempt 1 of 3 (exited 3; retry in 42.0s)" in out["message"]
    assert out["retry_in"] == 42
    out = why(job("retrying", run_at=NOW - 1))
    assert out["reason"] == "backoff" and "being queued again" in out["message"]


def test_why_a_scheduled_job_says_when_it_is_due_and_then_that_it_is_being_queued() -> None:
    out = why(job("scheduled", attempt=0, run_at=NOW + 598), workers=[worker()])
    assert out["reason"] == "scheduled"
    assert out["message"] == ("job 7 is scheduled for 2027-01-15T08:09:58.000Z (9m58s from now); then it is "
                              "queued on q.")
    assert (out["scheduled_for"], out["due_in"]) == ("2027-01-15T08:09:58.000Z", 598)
    out = why(job("scheduled", attempt=0, run_at=NOW + 2 * 86400 + 3 * 3600), workers=[])
    assert "(2d03h from now)" in out["message"] and "no live worker serves q now" in out["message"]
    assert "(1h05m from now)" in why(job("scheduled", attempt=0, run_at=NOW + 3900))["message"]
    assert "(4.5s from now)" in why(job("scheduled", attempt=0, run_at=NOW + 4.5))["message"]
    out = why(job("scheduled", attempt=0, run_at=NOW - 0.01), workers=[worker()])
    assert out["reason"] == "scheduled" and out["due_in"] == 0
    assert out["message"] == "job 7 was due at 2027-01-15T07:59:59.990Z; it is being queued on q."


def test_why_lease_held_by_a_quiet_worker() -> None:
    j = job("running", worker="w-1")
    out = why(j, worker=worker(age=7.25), lease_expires_at=NOW + 2.75)
    assert out["reason"] == "lease_held"
    assert "held by a lease on worker w-1 (n-w-1), which last heartbeated 7.2s ago" in out["message"]
    assert "expires in 2.8s" in out["message"] and "retried" in out["message"]
    out = why(job("running", worker="w-1", attempt=3), worker=worker(age=12, state="lost"), lease_expires_at=NOW - 1)
    assert out["reason"] == "lease_held" and "marked lost" in out["message"] and "failed" in out["message"]
    out = why(j, worker=None, lease_expires_at=NOW + 1)
    assert out["reason"] == "lease_held" and "no longer registered" in out["message"]


def test_why_running_and_cancel_requested() -> None:
    j = job("running", worker="w-1")
    out = why(j, worker=worker(age=0.4), lease_expires_at=NOW + 9.6)
    assert out["reason"] == "running"
    assert "running: attempt 1 on worker w-1 (n-w-1), which last heartbeated 0.4s ago" in out["message"]
    out = why(job("running", worker="w-1", cancel_requested=True), worker=worker(), lease_expires_at=NOW + 5)
    assert out["reason"] == "cancel_requested" and "being cancelled" in out["message"]


def test_why_finished_jobs_explain_themselves() -> None:
    out = why(job("succeeded", exit_code=0))
    assert out["reason"] == "succeeded" and "done" in out["message"]
    out = why(job("failed", attempt=3, exit_code=3, error="exited 3"))
    assert out["reason"] == "failed" and "after attempt 3 of 3: exited 3" in out["message"]
    out = why(job("cancelled"), last_event={"reason": "cancelled by user"})
    assert out["reason"] == "cancelled" and "cancelled at 2027-01-15T08:00:00.000Z (cancelled by user)" in out["message"]
    assert "unless replayed (orch retry 7)" in out["message"]


def test_why_a_job_a_rate_limit_put_off_names_the_limit_and_when_it_may_start() -> None:
    out = why(job("scheduled", attempt=0, run_at=NOW + 90),
              last_event={"reason": "submitted; held by rate limit api-calls until 2027-01-15T08:01:30.000Z"},
              workers=[worker()])
    assert out["reason"] == "rate_limited" and out["rate_limit"] == "api-calls"
    assert out["message"].startswith("job 7 is held by rate limit api-calls: it may start at 2027-01-15T08:01:30.000Z "
                                     "(1m30s from now)")
    paused = why(job("scheduled", attempt=0, run_at=NOW + 90), last_event={"reason": "submitted"},
                 workers=[worker()], queue_paused=True)
    assert paused["reason"] == "scheduled" and paused["queue_paused"] is True
    assert "Queue q is paused" in paused["message"]
    held = why(job("queued", attempt=0), position=2, queued=5, workers=[worker()], queue_paused=True)
    assert held["reason"] == "queue_paused" and "orch queue resume q" in held["message"]
    assert "(position 2 of 5)" in held["message"]


def test_why_a_replayed_job_says_who_queued_it_again_and_then_why_it_waits() -> None:
    out = why(job("queued", attempt=2), last_event={"reason": "replayed by alice@laptop from 127.0.0.1"},
              position=1, queued=1, workers=[])
    assert out["reason"] == "no_worker" and out["replayed_by"] == "alice@laptop from 127.0.0.1"
    assert out["message"].startswith("job 7 was replayed by alice@laptop from 127.0.0.1 at 2027-01-15T08:00:00.000Z; "
                                     "job 7 is queued, but no live worker serves queue q")
    plain = why(job("queued", attempt=2), last_event={"reason": "lease expired"}, position=1, queued=1, workers=[])
    assert "replayed_by" not in plain and plain["message"].startswith("job 7 is queued")


# --------------------------------------------------------------------------- metrics


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    fam = fams[family]
    for s in fam.samples:
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, sample, labels))


def populated() -> tuple[SchedulerMetrics, WorkerMetrics]:
    m = SchedulerMetrics()
    m.stale.labels("heartbeat").inc()
    m.lost_workers.inc()
    m.observe([
        Change(1, "queued", "default", 0),  # submits: queued before any attempt
        Change(2, "queued", "default", 0),
        Change(3, "queued", "default", 0),
        Change(1, "running", "default", 1, worker="w-1", queue_wait=0.25),
        Change(1, "retrying", "default", 1, worker="w-1", outcome="failed", duration=0.5),
        Change(1, "queued", "default", 1),
        Change(1, "running", "default", 2, worker="w-1"),
        Change(1, "succeeded", "default", 2, worker="w-1", outcome="succeeded", duration=1.5),
        Change(2, "running", "default", 1, worker="w-1", queue_wait=0.01),
        Change(2, "failed", "default", 1, worker="w-1", outcome="lost", duration=30.0),
        Change(3, "cancelled", "default", 0),
        Change(4, "running", "default", 1),  # a cancel request on a running job: no new attempt
    ])
    m.observe_request("GET", "/v1/jobs/{job_id}", 200, 0.002)
    m.observe_request("BREW", "unmatched", 405, 0.001)
    m.set_snapshot(Snapshot(
        jobs={JobState.SUCCEEDED: 1, JobState.FAILED: 1, JobState.CANCELLED: 1, JobState.QUEUED: 2},
        queues={("default", JobState.QUEUED): 2},
        workers={WorkerState.ALIVE: 1, WorkerState.LOST: 2},
        live_workers=[WorkerLoad("w-1", "one", WorkerState.ALIVE, 4, 1, 1.25)],
    ))
    w = WorkerMetrics(lambda: (1, 4))
    w.ended("default", "succeeded", 0.2)
    w.ended("default", "failed", 0.3)
    w.ended("default", "handed_back", 9.0)
    return m, w


def test_scheduler_metrics_count_state_changes() -> None:
    m, _ = populated()
    f = families(m.render()[0].decode())
    assert value(f, "orch_jobs_submitted", "orch_jobs_submitted_total", queue="default") == 3
    assert value(f, "orch_jobs_completed", "orch_jobs_completed_total", outcome="succeeded") == 1
    assert value(f, "orch_jobs_completed", "orch_jobs_completed_total", outcome="failed") == 1
    assert value(f, "orch_jobs_completed", "orch_jobs_completed_total", outcome="cancelled") == 1
    assert value(f, "orch_job_retries", "orch_job_retries_total", queue="default") == 1
    assert value(f, "orch_attempts_started", "orch_attempts_started_total", queue="default") == 3
    assert value(f, "orch_attempts_ended", "orch_attempts_ended_total", outcome="lost") == 1
    # Lost attempts did not end on their worker: their "duration" is not an execution time.
    assert value(f, "orch_job_duration_seconds", "orch_job_duration_seconds_count", queue="default") == 2
    assert value(f, "orch_job_duration_seconds", "orch_job_duration_seconds_sum", queue="default") == 2.0
    assert value(f, "orch_job_queue_wait_seconds", "orch_job_queue_wait_seconds_count", queue="default") == 2
    assert value(f, "orch_jobs", state="queued") == 2 and value(f, "orch_jobs", state="running") == 0
    assert value(f, "orch_queue_jobs", queue="default", state="queued") == 2
    assert value(f, "orch_workers", state="lost") == 2 and value(f, "orch_workers", state="draining") == 0
    assert value(f, "orch_worker_heartbeat_age_seconds", worker="w-1", name="one") == 1.25
    assert value(f, "orch_cluster_slots", state="busy") == 1 and value(f, "orch_cluster_slots", state="free") == 3
    req = "orch_http_request_duration_seconds"
    assert value(f, req, req + "_count", method="GET", route="/v1/jobs/{job_id}", status="200") == 1
    assert value(f, req, req + "_count", method="other", route="unmatched", status="405") == 1
    # A queue that empties stays, at 0, rather than vanish.
    m.set_snapshot(Snapshot(jobs={}, queues={}, workers={}, live_workers=[]))
    f = families(m.render()[0].decode())
    assert value(f, "orch_queue_jobs", queue="default", state="queued") == 0


def test_a_replay_counts_as_a_replay_not_a_submit() -> None:
    m = SchedulerMetrics()
    m.observe([Change(1, "queued", "email", 0), Change(1, "cancelled", "email", 0)])
    m.observe([Change(1, "queued", "email", 0, replay=True), Change(2, "queued", "email", 3, replay=True)])
    f = families(m.render()[0].decode())
    assert value(f, "orch_jobs_submitted", "orch_jobs_submitted_total", queue="email") == 1
    assert value(f, "orch_jobs_replayed", "orch_jobs_replayed_total", queue="email") == 2
    assert value(f, "orch_jobs_replayed", "orch_jobs_replayed_total", queue="default") == 0


def test_a_scheduled_submit_counts_as_a_submit_once_and_shows_in_the_state_gauges() -> None:
    m = SchedulerMetrics()
    m.observe([Change(1, "scheduled", "nightly", 0, due=NOW + 60), Change(2, "queued", "nightly", 0)])
    m.observe([Change(1, "queued", "nightly", 0, due=NOW + 60)])  # it came due: no second submit
    m.set_snapshot(Snapshot(jobs={JobState.SCHEDULED: 3}, queues={("nightly", JobState.SCHEDULED): 3}, workers={},
                            live_workers=[]))
    f = families(m.render()[0].decode())
    assert value(f, "orch_jobs_submitted", "orch_jobs_submitted_total", queue="nightly") == 2
    assert value(f, "orch_jobs", state="scheduled") == 3
    assert value(f, "orch_queue_jobs", queue="nightly", state="scheduled") == 3
    assert value(f, "orch_queue_jobs", queue="nightly", state="queued") == 0


def test_worker_metrics_count_attempts_and_slots() -> None:
    _, w = populated()
    f = families(w.render_for("")[0].decode())
    assert value(f, "orch_worker_jobs", "orch_worker_jobs_total", outcome="succeeded") == 1
    assert value(f, "orch_worker_jobs", "orch_worker_jobs_total", outcome="handed_back") == 1
    assert value(f, "orch_worker_job_duration_seconds", "orch_worker_job_duration_seconds_count") == 2
    assert value(f, "orch_worker_slots", state="busy") == 1 and value(f, "orch_worker_slots", state="free") == 3


def test_metric_names_follow_prometheus_conventions() -> None:
    m, w = populated()
    for text in (m.render()[0].decode(), w.render_for("")[0].decode()):
        helps = dict(re.findall(r"^# HELP (\S+) (.+)$", text, re.M))
        for fam in text_string_to_metric_families(text):
            assert fam.name.startswith("orch_"), fam.name
            assert fam.documentation and fam.documentation != fam.name, f"{fam.name} has no HELP text"
            assert re.fullmatch(r"[a-z][a-z0-9_]*", fam.name), fam.name
            for s in fam.samples:
                assert not {"job", "job_id", "id", "path"} & set(s.labels), (s.name, s.labels)
                if fam.type == "counter" and not s.name.endswith("_created"):
                    assert s.name.endswith("_total"), s.name
            if fam.type == "histogram":
                assert fam.name.endswith("_seconds"), fam.name
        assert all(h.strip() for h in helps.values())


def test_duration_buckets_run_from_5ms_to_an_hour() -> None:
    assert DURATION_BUCKETS[0] == 0.005 and DURATION_BUCKETS[-1] == 3600
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    m, _ = populated()
    buckets = [s.labels["le"] for f in text_string_to_metric_families(m.render()[0].decode())
               if f.name == "orch_job_duration_seconds" for s in f.samples if s.name.endswith("_bucket")]
    assert buckets[0] == "0.005" and "3600.0" in buckets and buckets[-1] == "+Inf"


def test_openmetrics_on_request() -> None:
    m, _ = populated()
    body, content_type = m.render_for("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    body, content_type = m.render_for("")
    assert content_type.startswith("text/plain")


# --------------------------------------------------------------------------- logs


def test_json_log_lines_carry_structured_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("orch.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("job 3 attempt 1 -> succeeded", extra={"fields": {"job_id": 3, "attempt": 1, "worker": "w-1",
                                                                        "queue": "q", "duration": 0.5,
                                                                        "message": "not overwritten"}})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "job 3 attempt 1 -> succeeded"
    assert (line["job_id"], line["attempt"], line["worker"], line["queue"], line["duration"]) == (3, 1, "w-1", "q", 0.5)
    assert line["level"] == "info"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_cheap_state_change_line_is_the_line_a_record_makes(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """info_lines() skips the LogRecord only when orch's own handler is the sole listener, and writes the same text."""
    import time as time_module

    from orch import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._handler)
    stream = io.StringIO()
    fields = {"job_id": 3, "attempt": 1, "state": "succeeded", "queue": "q", "worker": "w-1", "duration": 0.5}
    # Both lines carry the same timestamp (LogRecord reads time_ns on newer Pythons).
    monkeypatch.setattr(time_module, "time", lambda: 1_800_000_000.25)
    monkeypatch.setattr(time_module, "time_ns", lambda: 1_800_000_000_250_000_000)
    try:
        monkeypatch.setattr(sys, "stderr", stream)
        logs.setup_logging("info", fmt)
        logger = logging.getLogger("orch.test.fast")
        logs.info_lines(logger, [("job 3 attempt 1 -> succeeded (queue q)", fields),  # formatted straight in
                                 ("job 3 attempt 1 -> succeeded (queue q)", fields)])
        logger.info("job 3 attempt 1 -> succeeded (queue q)", extra={"fields": fields})  # through a LogRecord
        logs._handler.flush()
        fast, fast_too, slow = stream.getvalue().splitlines()
        assert fast == fast_too == slow
        # Another listener (a capture, an embedding program's handler): the ordinary record, which it sees.
        seen: list[logging.LogRecord] = []
        extra = logging.Handler()
        extra.emit = seen.append  # type: ignore[method-assign]
        root.addHandler(extra)
        logs.info_lines(logger, [("job 4 attempt 1 -> queued", {"job_id": 4})])
        assert [r.getMessage() for r in seen] == ["job 4 attempt 1 -> queued"] and seen[0].fields == {"job_id": 4}
        # Below the level: nothing at all.
        root.setLevel(logging.WARNING)
        logs.info_lines(logger, [("job 5 attempt 1 -> queued", {"job_id": 5})])
        assert len(seen) == 1
    finally:
        root.handlers[:], root.level, logs._handler = saved


# --------------------------------------------------------------------------- examples


def exposed_names() -> set[str]:
    m, w = populated()
    names: set[str] = set()
    for text in (m.render()[0].decode(), w.render_for("")[0].decode()):
        for fam in text_string_to_metric_families(text):
            names.add(fam.name)
            names.update(s.name for s in fam.samples)
    return names


def test_grafana_dashboard_uses_only_metrics_orch_exposes() -> None:
    board = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = {n for e in exprs for n in re.findall(r"\borch_[a-z0-9_]+", e)}
    assert used - exposed_names() == set(), "the dashboard queries metrics orch does not expose"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("throughput", "queue depth", "latency", "fail", "worker"):
        assert topic in titles, f"no panel about {topic}"


def test_prometheus_example_scrapes_scheduler_and_workers() -> None:
    # One job finds them all through the scheduler's service discovery (a real Prometheus runs it in
    # tests/e2e/test_metrics_discovery.py).
    conf = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text(encoding="utf-8"))
    (sd,) = [sd for job in conf["scrape_configs"] for sd in job.get("http_sd_configs", [])]
    assert sd["url"] == "http://127.0.0.1:8080/v1/metrics/targets"
    assert sd["authorization"]["type"] == "Bearer" and sd["authorization"]["credentials_file"]


@pytest.mark.parametrize("path", ["examples/prometheus.yml"])
def test_prometheus_example_passes_promtool(path: str) -> None:
    import os
    import shutil
    import subprocess

    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing; .ci/run installs it (Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus); CI installs it")
    r = subprocess.run([exe, "check", "config", "--syntax-only", str(ROOT / path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
