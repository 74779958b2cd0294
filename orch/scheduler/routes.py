"""The one route table: every route's method, path, handler, who may call it, whether it long-polls, and how the
OpenAPI document describes it. The router (app.py), the document (``document`` here) and the gate
(security.py) all read it, so a route is added in one place and is described and guarded as it is served.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from orch import __version__
from orch.core.states import JobState
from orch.scheduler.openapi import (
    FOLLOW,
    IDEMPOTENCY_HEADER,
    JOB_PARAM,
    LIMIT_PARAM,
    NAME,
    NDJSON,
    QUEUE_PARAM,
    SCHEDULE_PARAM,
    SCHEMAS,
    SECURITY_SCHEMES,
    WORKER_PARAM,
    _json,
    _op,
    _query,
)

# Who may call a route: nobody needs a token (open), the metrics page (open when auth.metrics_open), the
# client token, the worker join token (registration), or the credential of the worker the path names.
OPEN, METRICS, CLIENT, JOIN, WORKER = "open", "metrics", "client", "join", "worker"
_SECURITY = {OPEN: None, CLIENT: "clientToken", JOIN: "joinToken", WORKER: "workerCredential"}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as the document writes it: /v1/jobs/{job_id}
    handler: str  # the name of the Api method that serves it
    access: str
    summary: str
    ok: dict[str, Any]  # the success response's description and content
    status: str = "200"
    body: str | None = None  # the request body's schema
    params: list[dict[str, Any]] = field(default_factory=list)
    long_poll: str | None = None  # None: never; "": always; else the query flag that makes it one
    more: dict[str, Any] = field(default_factory=dict)  # other success responses, by status
    body_required: bool = True

    @property
    def served_path(self) -> str:
        """The path as the router matches it: ids match digits only, so that a fixed path beside them
        (/v1/jobs/batch) is not taken for an id (else GET /v1/jobs/batch would answer "no job 'batch'")."""
        return self.path.replace("{job_id}", "{job_id:[0-9]+}")

    def operation(self, metrics_open: bool) -> dict[str, Any]:
        security = _SECURITY[OPEN if self.access == METRICS and metrics_open else
                             CLIENT if self.access == METRICS else self.access]
        return _op(self.summary, self.ok, status=self.status, security=security, body=self.body,
                   params=self.params or None, more=self.more or None,
                   body_required=self.body_required)


def _wait_params() -> list[dict[str, Any]]:
    return [JOB_PARAM, _query("timeout", {"type": "number", "minimum": 0, "maximum": 3600})]


# A submit that waits for its job's end in the same request: one round trip instead of two (the SDK's
# task.run). Its answer waits for the end's commit to be on disk.
SUBMIT_WAIT = _query("wait", {"type": "number", "minimum": 0, "maximum": 3600},
                     "seconds to hold the answer until the job has ended (0: answer once it is submitted)")

_REPLAYED = {"200": _json("Job", "the job submitted before with this idempotency key (idempotent_replay: true)")}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "health", OPEN, "liveness", _json("Health", "alive")),
    Route("GET", "/metrics", "metrics_page", METRICS, "Prometheus metrics",
          {"description": "text exposition format", "content": {"text/plain": {}}}),
    Route("GET", "/v1/openapi.json", "openapi_json", CLIENT, "this document",
          {"description": "OpenAPI 3.1", "content": {"application/json": {}}}),
    Route("POST", "/v1/jobs", "submit", CLIENT,
          "submit one job; with wait, also hold until it ends (or wait seconds pass) and answer with it then",
          _json("JobDetail", "the new job (with wait: as it is when it ended, or when wait passed)"),
          status="201", body="JobSpec", params=[IDEMPOTENCY_HEADER, SUBMIT_WAIT],
          more={"200": _json("JobDetail", "the job submitted before with this idempotency key "
                                          "(idempotent_replay: true)")},
          long_poll="wait"),
    Route("GET", "/v1/jobs", "list_jobs", CLIENT, "list jobs, newest first", _json("JobPage", "a page of jobs"),
          params=[_query("state", {"type": "string", "enum": [s.value for s in JobState]}),
                  _query("queue", NAME),
                  _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                  _query("cursor", {"type": "string", "pattern": "^[0-9]{1,18}$"}, "next_cursor of the previous page")]),
    Route("POST", "/v1/jobs/batch", "submit_batch", CLIENT, "submit many jobs in one transaction",
          _json("Jobs", "the new jobs"), status="201", body="Batch",
          more={"200": _json("Jobs", "every job was submitted before with its idempotency key: those jobs")}),
    Route("POST", "/v1/jobs/wait", "wait_many", CLIENT,
          "hold until one of the jobs named has ended (or timeout), then list those that have",
          _json("Ended", "the jobs that have ended"), body="WaitMany", long_poll=""),
    Route("GET", "/v1/jobs/{job_id}", "get_job", CLIENT, "a job, its attempts, its last output",
          _json("JobDetail", "the job"), params=[JOB_PARAM]),
    Route("POST", "/v1/jobs/{job_id}/cancel", "cancel", CLIENT, "cancel a job", _json("Job", "the job"),
          params=[JOB_PARAM]),
    Route("POST", "/v1/jobs/{job_id}/retry", "retry", CLIENT,
          "replay a failed or cancelled job: a fresh set of attempts; 409 names any other state",
          _json("Job", "the job, queued again"), body="Replay", body_required=False, params=[JOB_PARAM]),
    Route("POST", "/v1/jobs/retry", "retry_many", CLIENT,
          "replay the failed or cancelled jobs named by ids, or every one in a state (of a queue)",
          _json("Replayed", "which were replayed, and why the rest were not"), body="ReplayMany"),
    Route("POST", "/v1/jobs/purge", "purge", CLIENT,
          "delete the ended jobs that ended more than older_than seconds ago, with their attempts, output and events",
          _json("Purged", "how many were purged"), body="Purge"),
    Route("GET", "/v1/jobs/{job_id}/wait", "wait", CLIENT, "hold until the job ends or timeout passes",
          _json("JobDetail", "the job"), params=_wait_params(), long_poll=""),
    Route("GET", "/v1/jobs/{job_id}/output", "output", CLIENT, "stored output, or a stream of it", NDJSON,
          params=[JOB_PARAM, FOLLOW], long_poll="follow"),
    Route("GET", "/v1/jobs/{job_id}/events", "events", CLIENT, "the job's state changes, or a stream of them",
          NDJSON, params=[JOB_PARAM, FOLLOW, _query("after", {"type": "integer", "minimum": 0, "maximum": 2**62})],
          long_poll="follow"),
    Route("GET", "/v1/jobs/{job_id}/why", "why", CLIENT, "why the job is (not) running",
          _json("Why", "the explanation"), params=[JOB_PARAM]),
    Route("GET", "/v1/workflows/{job_id}", "workflow", CLIENT,
          "the workflow a job is part of: every job of it with its state and dependencies",
          _json("Workflow", "the workflow"), params=[JOB_PARAM]),
    Route("GET", "/v1/queues", "list_queues", CLIENT,
          "every queue with unfinished jobs or a setting: jobs by state, paused, the oldest queued job's wait",
          _json("Queues", "the queues")),
    Route("POST", "/v1/queues/{queue}/pause", "pause_queue", CLIENT,
          "pause a queue: it hands out no job until resumed; its running jobs go on",
          _json("Queue", "the queue"), params=[QUEUE_PARAM]),
    Route("POST", "/v1/queues/{queue}/resume", "resume_queue", CLIENT, "resume a paused queue",
          _json("Queue", "the queue"), params=[QUEUE_PARAM]),
    Route("PATCH", "/v1/queues/{queue}", "set_queue", CLIENT,
          "set a queue's concurrency limit: at most so many of its jobs run at once, across the cluster",
          _json("Queue", "the queue"), body="QueueSettings", params=[QUEUE_PARAM]),
    Route("GET", "/v1/limits", "list_limits", CLIENT, "every rate limit, with when its next start is allowed",
          _json("Limits", "the rate limits")),
    Route("PUT", "/v1/limits/{name}", "put_limit", CLIENT,
          "make or change a rate limit (a token bucket counting the starts of the jobs naming it in rate_keys)",
          _json("Limit", "the limit, changed"), body="LimitBody", params=[LIMIT_PARAM],
          more={"201": _json("Limit", "the limit, made")}),
    Route("DELETE", "/v1/limits/{name}", "delete_limit", CLIENT,
          "delete a rate limit: jobs it put off keep their times; submits naming it are refused (404)",
          _json("Deleted", "deleted"), params=[LIMIT_PARAM]),
    Route("GET", "/v1/schedules", "list_schedules", CLIENT, "every cron schedule, with its next tick",
          _json("Schedules", "the schedules"),
          params=[_query("next", {"type": "integer", "minimum": 0, "maximum": 100}, "how many next ticks to list")]),
    Route("POST", "/v1/schedules", "create_schedule", CLIENT, "make a cron schedule (409 if one has the name)",
          _json("Schedule", "the schedule"), status="201", body="ScheduleBody"),
    Route("GET", "/v1/schedules/{name}", "get_schedule", CLIENT, "a schedule with its next ticks (next: how many)",
          _json("Schedule", "the schedule"),
          params=[SCHEDULE_PARAM, _query("next", {"type": "integer", "minimum": 0, "maximum": 100})]),
    Route("PATCH", "/v1/schedules/{name}", "patch_schedule", CLIENT,
          "change a schedule: the fields given (a new cron or tz counts its ticks from now)",
          _json("Schedule", "the schedule"), body="SchedulePatch", params=[SCHEDULE_PARAM]),
    Route("DELETE", "/v1/schedules/{name}", "delete_schedule", CLIENT, "delete a schedule (its jobs stay)",
          _json("Deleted", "deleted"), params=[SCHEDULE_PARAM]),
    Route("POST", "/v1/schedules/{name}/pause", "pause_schedule", CLIENT,
          "pause a schedule: its ticks are skipped until it is resumed (not fired then)",
          _json("Schedule", "the schedule"), params=[SCHEDULE_PARAM]),
    Route("POST", "/v1/schedules/{name}/resume", "resume_schedule", CLIENT,
          "resume a paused schedule: its ticks count from now", _json("Schedule", "the schedule"),
          params=[SCHEDULE_PARAM]),
    Route("POST", "/v1/schedules/{name}/trigger", "trigger_schedule", CLIENT,
          "run a schedule's job now, once, beside its ticks", _json("JobSummary", "the job"), status="201",
          params=[SCHEDULE_PARAM]),
    Route("POST", "/v1/ui/link", "ui_link", CLIENT,
          "a one-time link that signs a browser in to the dashboard, good for a minute (orch ui)",
          _json("UiLink", "the link's path"), status="201", body_required=False),
    Route("POST", "/v1/workers", "register", JOIN, "register a worker; returns its own credential",
          _json("Registered", "registered"), status="201", body="Register"),
    Route("GET", "/v1/workers", "list_workers", CLIENT, "list workers", _json("Workers", "the workers"),
          params=[_query("all", FOLLOW["schema"], "1: also stopped and lost workers whose last heartbeat is older "
                                                  "than scheduler.worker_retention")]),
    Route("PATCH", "/v1/workers/{worker_id}", "set_worker", CLIENT,
          "drain a worker: it is handed no job from now on, and its next heartbeat tells it to finish what it runs "
          "and stop", _json("Worker", "the worker"), body="WorkerPatch", params=[WORKER_PARAM]),
    Route("GET", "/v1/metrics/targets", "metrics_targets", CLIENT,
          "Prometheus HTTP service discovery: the scheduler's metrics listener and every live worker's",
          _json("MetricsTargets", "target groups, in http_sd_config format")),
    Route("POST", "/v1/workers/{worker_id}/heartbeat", "heartbeat", WORKER, "renew the leases of running attempts",
          _json("HeartbeatReply", "attempts to cancel, stale ones"), body="Heartbeat", params=[WORKER_PARAM]),
    Route("POST", "/v1/workers/{worker_id}/lease", "lease", WORKER, "claim jobs, long-polling up to wait seconds",
          _json("Leases", "claimed jobs (maybe none)"), body="LeaseRequest", params=[WORKER_PARAM], long_poll=""),
    Route("POST", "/v1/workers/{worker_id}/output", "append_output", WORKER,
          "append output chunks of running attempts", _json("Accepted", "which chunks were stored"), body="Chunks",
          params=[WORKER_PARAM]),
    Route("POST", "/v1/workers/{worker_id}/complete", "complete", WORKER,
          "report how attempts ended (and claim more jobs)", _json("Answers", "accepted or stale, per attempt"),
          body="Completions", params=[WORKER_PARAM]),
    Route("POST", "/v1/workers/{worker_id}/jobs/{job_id}/complete", "complete_one", WORKER,
          "report one attempt; 409 if it is not current", _json("Answer", "accepted"), body="OneEnd",
          params=[WORKER_PARAM, JOB_PARAM]),
    Route("POST", "/v1/workers/{worker_id}/hand-back", "hand_back", WORKER, "give attempts back to be queued again",
          _json("HandedBack", "what was handed back"), body="HandBack", params=[WORKER_PARAM]),
    # The seed's form, kept working: POST /job {"task": "echo", "args": ["hello"]}.
    Route("POST", "/job", "submit", CLIENT, "submit, original form", _json("Job", "the new job"), status="201",
          body="JobSpec", params=[IDEMPOTENCY_HEADER], more=_REPLAYED),
    Route("GET", "/job/{job_id}", "get_job", CLIENT, "a job, original form", _json("JobDetail", "the job"),
          params=[JOB_PARAM]),
)

BY_KEY: dict[tuple[str, str], Route] = {(r.method, r.path): r for r in ROUTES}
BY_KEY.update({("HEAD", r.path): r for r in ROUTES if r.method == "GET"})  # the router serves HEAD beside GET


def access_of(method: str, path: str, metrics_open: bool) -> str:
    """Who may call ``method path`` (the route's document path); a path with no route needs the client token."""
    route = BY_KEY.get((method, path))
    access = route.access if route is not None else CLIENT
    if access == METRICS:
        return OPEN if metrics_open else CLIENT
    return access


LONG_POLLS: dict[tuple[str, str], str] = {
    (r.method, r.path): r.long_poll for r in ROUTES if r.long_poll is not None}
JOB_ID_PATHS = [re.compile(re.sub(r"\\\{(\w+)\\\}", lambda m: "(?P<id>[^/]+)" if m[1] == "job_id" else "[^/]+",
                                  re.escape(r.path))) for r in ROUTES if "{job_id}" in r.path]


def document(*, metrics_open: bool = False, long_poll: float | None = None, max_body: int | None = None) -> dict[str, Any]:
    """The OpenAPI document of ROUTES; the arguments fill in what depends on the scheduler's settings."""
    schemas = dict(SCHEMAS)
    if long_poll is not None:
        lease = {**schemas["LeaseRequest"], "properties": dict(schemas["LeaseRequest"]["properties"])}
        lease["properties"]["wait"] = {"type": "number", "minimum": 0, "maximum": long_poll}
        schemas["LeaseRequest"] = lease
    paths: dict[str, Any] = {}
    for r in ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = r.operation(metrics_open)
    info = {"title": "orch scheduler API", "version": __version__,
            "description": "Every /v1 route needs a bearer token of the right role; errors are "
                           "{\"error\": {\"code\", \"message\", \"field\"}} with a 4xx status."
                           + (f" Request bodies are at most {max_body} bytes." if max_body else "")}
    return {"openapi": "3.1.0", "info": info, "paths": paths,
            "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES}}
