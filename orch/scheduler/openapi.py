"""The API described as an OpenAPI 3.1 document, served at ``GET /v1/openapi.json``.

Written by hand, next to the validation it describes (``orch/core/spec.py``,
``orch/scheduler/app.py``); tests keep them together: every route that
``build_app`` registers must be here (``test_openapi_lists_every_route``) and a
property-based fuzz test sends requests made from these schemas and checks
that every answer is a 2xx/4xx that matches its documented schema
(``tests/integration/test_fuzz_api.py``). The security middleware refuses
query parameters a route does not document here.
"""

from __future__ import annotations

import re
from typing import Any

from orch.core.concurrency import MAX_KEY_LEN as CONCURRENCY_KEY_LEN
from orch.core.concurrency import MAX_LIMIT as MAX_CONCURRENCY
from orch.core.concurrency import OnLimit
from orch.core.cron import CRON_PATTERN, MAX_CATCHUP, Overlap, zone_names
from orch.core.dag import MAX_DEPENDS, WORKFLOW_STATES, On
from orch.core.kinds import (
    BUILT_IN,
    FUNCTION_RE,
    IMAGE_RE,
    KWARG_RE,
    MAX_MEMORY,
    MAX_VOLUMES,
    MEMORY_RE,
    MIN_MEMORY,
    NETWORK_RE,
    PULL,
    RUNNER_RE,
    USER_RE,
    VOLUME_RE,
)
from orch.core.rates import LIMIT_NAME_RE, MAX_BURST, MAX_RATE_KEYS, RATE_PATTERN
from orch.core.spec import (
    CONTROL_CHARS,
    ENV_KEY_RE,
    KINDS,
    MAX_ARG_LEN,
    MAX_ARGS,
    MAX_DELAY,
    MAX_ENV,
    MAX_KEY_LEN,
    MAX_LABELS,
    MAX_TIME_LEN,
    MAX_TIMEOUT,
    NAME_RE,
)
from orch.core.states import REPLAYABLE, TERMINAL, JobState, Outcome, WorkerState

MAX_BATCH = 10_000  # the same as orch.scheduler.app.MAX_BATCH (not imported: app imports this module)
REF = "#/components/schemas/"


def ref(name: str) -> dict[str, Any]:
    return {"$ref": REF + name}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(props: dict[str, Any], required: tuple[str, ...] = (), *, closed: bool = False, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    out.update(extra)
    return out


NAME = {"type": "string", "pattern": NAME_RE.pattern, "minLength": 1, "maxLength": 64}
# No NUL byte (and, for NOT_BLANK, something that is not Python's whitespace (str.isspace), as str.strip() sees
# it: a shell line or task of only whitespace is refused). Lookaheads rather than ^[^\x00]*$: tools fold a
# maxLength into a pattern's quantifier, and ^[^\x00]{0,131072}$ takes a regex engine seconds to compile.
NO_NUL = r"^(?![\s\S]*\x00)"
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = rf"^(?![\s\S]*\x00)(?=[\s\S]*[^{_SPACE}])"
TIME = {"type": "string", "description": "ISO 8601 UTC time with milliseconds, e.g. 2026-01-05T10:00:07.101Z"}
INT = {"type": "integer"}
COUNT = {"type": "integer", "minimum": 0}
LIMIT_NAME = {"type": "string", "pattern": LIMIT_NAME_RE.pattern, "maxLength": 64}
QUEUE_COUNTS = (JobState.QUEUED, JobState.RUNNING, JobState.SCHEDULED, JobState.RETRYING)  # a Queue's counts
JOB_ID = {"type": "integer", "minimum": 1, "maximum": 2**62}
ATTEMPT = {"type": "integer", "minimum": 1, "maximum": 10**6}
ARG = {"type": "string", "maxLength": MAX_ARG_LEN, "pattern": NO_NUL}
# Where a worker serves its metrics (registration's "metrics"): host:port, or an http(s) URL. Here, not in
# app.py, because this document states it too (app.py imports it; this module cannot import app.py).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"  # _ too: some machines' names have one
# An IPv6 literal in brackets, in its usual and compressed forms (the forms with an IPv4 tail are not taken):
# the server checks this very pattern, so the document and the server agree by construction.
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join((
    rf"(?:{_H16}:){{7}}{_H16}", rf"(?:{_H16}:){{1,7}}:", rf"(?:{_H16}:){{1,6}}:{_H16}",
    rf"(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}", rf"(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}",
    rf"(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}", rf"(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}",
    rf"{_H16}:(?::{_H16}){{1,6}}", rf":(?:(?::{_H16}){{1,7}}|:)"))
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[(?:{_IPV6})\])"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
METRICS_ADDRESS_RE = re.compile(rf"{_HOST}:{_PORT}|https?://{_HOST}(?::{_PORT})?(?:/[A-Za-z0-9._~%/-]*)?")
MAX_METRICS_ADDRESS = 255
RESULT_OUTCOMES = sorted(o.value for o in Outcome if o not in (Outcome.RUNNING, Outcome.LOST, Outcome.HANDED_BACK))

BY = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": f"^[^{CONTROL_CHARS}]*$",
      "description": "who asks (orch retry gives user@host); the replay's event names it with the client address"}
IDEMPOTENCY_KEY = {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LEN, "pattern": f"^[^{CONTROL_CHARS}]*$",
                   "description": "a submit with the key of a kept job is that job (answered 200 with "
                                  "idempotent_replay), not a new one; with another spec it is a 409 "
                                  "idempotency_key_reused"}
JOB_FIELDS: dict[str, Any] = {
    "id": INT, "state": {"type": "string", "enum": [s.value for s in JobState]}, "queue": {"type": "string"},
    "priority": INT, "name": nullable({"type": "string"}),
    "command": {"type": "string", "maxLength": 256, "description": "what the job runs, as a person reads it; "
                                                                    "cut to 256 characters"},
    "command_truncated": {"type": "boolean", "description": "command was cut"},
    "attempt": INT, "max_attempts": INT, "created_at": TIME, "started_at": nullable(TIME),
    "finished_at": nullable(TIME), "retry_at": nullable(TIME),
    "scheduled_for": {**nullable(TIME), "description": "when a scheduled job is due: then it is queued"},
    "worker": nullable({"type": "string"}),
    "cancel_requested": {"type": "boolean"}, "exit_code": nullable(INT), "error": nullable({"type": "string"}),
    "idempotent_replay": {"type": "boolean", "description": "in a submit's answer only: true when the job is one "
                                                            "submitted before with the same idempotency key"},
}
JOB_REQUIRED = ("id", "state", "queue", "priority", "name", "command", "command_truncated", "attempt", "max_attempts",
                "created_at", "started_at", "finished_at", "worker", "cancel_requested", "exit_code", "error")

CRON = {"type": "string", "maxLength": 200, "pattern": CRON_PATTERN,
        "description": "five fields (minute hour day month weekday), or six with seconds first: *, numbers, a-b, "
                       "a,b, /step, month and day names"}
TZ = {"type": "string", "enum": zone_names(), "description": "an IANA time zone (default UTC)"}
SCHEDULE_JOB = {"allOf": [ref("JobSpec")], "not": {"anyOf": [{"required": [k]} for k in (
    "idempotency_key", "run_at", "delay", "depends_on", "ref")]},
    "description": "a job spec without idempotency_key, run_at, delay, depends_on or ref (each tick decides them)"}

SCHEMAS: dict[str, Any] = {
    "ErrorBody": obj({
        "code": {"type": "string", "description": "invalid, not_found, method_not_allowed, conflict, "
                                                  "idempotency_key_reused, stale_attempt, "
                                                  "unknown_worker, unauthorized, forbidden, too_large, "
                                                  "unsupported_encoding, timeout, too_many_requests, ..."},
        "message": {"type": "string"},
        "field": {"type": "string", "description": "the offending field, e.g. jobs[3].queue"},
    }, ("code", "message")),
    "Error": obj({
        "error": ref("ErrorBody"),
    }, ("error",)),
    "JobSpec": obj({
        "command": {"type": "array", "prefixItems": [{**ARG, "minLength": 1}], "items": ARG, "minItems": 1,
                    "maxItems": MAX_ARGS, "description": "argv, run without a shell"},
        "shell": {"type": "string", "minLength": 1, "maxLength": MAX_ARG_LEN, "pattern": NOT_BLANK,
                  "description": "run as /bin/sh -c LINE"},
        "task": {"type": "string", "minLength": 1, "maxLength": MAX_ARG_LEN, "pattern": NOT_BLANK,
                 "description": "the original form: task + args"},
        "args": {"type": "array", "items": ARG, "maxItems": MAX_ARGS, "description": "only with task"},
        "python": obj({
            "function": {"type": "string", "maxLength": 512, "pattern": FUNCTION_RE.pattern,
                         "description": "package.module:function, imported by the worker's child interpreter"},
            "args": {"type": "array", "description": "positional arguments (JSON)"},
            "kwargs": {"type": "object", "propertyNames": {"pattern": KWARG_RE.pattern},
                       "description": "keyword arguments (JSON)"},
        }, ("function",), closed=True, description="a Python function, run by the python runner; its return value "
                                                   "is the job's result value"),
        "docker": obj({
            "image": {"type": "string", "pattern": IMAGE_RE.pattern},
            "command": {"type": "array", "items": ARG, "minItems": 1, "maxItems": MAX_ARGS},
            "env": {"type": "object", "maxProperties": MAX_ENV, "propertyNames": {"pattern": ENV_KEY_RE.pattern},
                    "additionalProperties": ARG},
            "volumes": {"type": "array", "maxItems": MAX_VOLUMES, "items": {
                "type": "string", "maxLength": 4096, "pattern": VOLUME_RE.pattern,
                "description": "HOST_PATH:CONTAINER_PATH[:ro|rw]; a worker mounts only those under its "
                               "docker.volumes"}},
            "network": {"type": "string", "pattern": NETWORK_RE.pattern},
            "memory": {"oneOf": [{"type": "integer", "minimum": MIN_MEMORY, "maximum": MAX_MEMORY},
                                 {"type": "string", "pattern": MEMORY_RE.pattern}],
                       "description": "bytes, or a size like 256m or 2g (6m at least)"},
            "cpus": {"type": "number", "minimum": 0.01, "maximum": 1024},
            "user": {"type": "string", "pattern": USER_RE.pattern},
            "pull": {"type": "string", "enum": list(PULL), "description": "default missing"},
        }, ("image",), closed=True, description="a container, run by the docker runner"),
        "runner": {"type": "string", "pattern": RUNNER_RE.pattern, "not": {"enum": list(BUILT_IN)},
                   "description": "a plugin runner's name (orch plugins lists a worker's)"},
        "params": {"type": "object", "description": "the plugin runner's parameters (only with runner)"},
        "queue": NAME,
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "env": {"type": "object", "maxProperties": MAX_ENV, "propertyNames": {"pattern": ENV_KEY_RE.pattern},
                "additionalProperties": ARG},
        "cwd": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": NO_NUL},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
        "labels": {"type": "object", "maxProperties": MAX_LABELS, "propertyNames": {"pattern": NAME_RE.pattern},
                   "additionalProperties": {"type": "string", "maxLength": 256, "pattern": NO_NUL}},
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NO_NUL},
        "backoff": obj({
            "base": {"type": "number", "minimum": 0, "maximum": 86400},
            "factor": {"type": "number", "minimum": 1, "maximum": 86400},
            "cap": {"type": "number", "minimum": 0, "maximum": 86400},
            "jitter": {"type": "number", "minimum": 0, "maximum": 1},
        }, closed=True),
        "retry_on_exit": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 255}, "maxItems": 255},
        "run_at": {"type": "string", "format": "date-time", "maxLength": MAX_TIME_LEN,
                   "description": "run it no sooner than this time: RFC 3339 with a UTC offset or Z, e.g. "
                                  "2026-12-24T08:00:00+01:00 (a time without one is refused); until then the job is "
                                  "scheduled, and one already past queues it at once"},
        "delay": {"type": "number", "minimum": 0, "maximum": MAX_DELAY,
                  "description": "or: run it no sooner than this many seconds after the submit (0: at once)"},
        "idempotency_key": IDEMPOTENCY_KEY,
        "rate_keys": {"type": "array", "maxItems": MAX_RATE_KEYS, "uniqueItems": True,
                      "items": LIMIT_NAME,
                      "description": "rate limits (orch limit set NAME) its start counts against; a start a limit "
                                     "does not allow yet waits, scheduled, for the first time it does"},
        "concurrency": obj({
            "key": {"type": "string", "minLength": 1, "maxLength": CONCURRENCY_KEY_LEN,
                    "pattern": f"^[^{CONTROL_CHARS}]*$"},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY},
            "on_limit": {"type": "string", "enum": [p.value for p in OnLimit],
                         "description": "when the key is full at the submit: queue (wait for a slot, the default), "
                                        "skip_new (end the new job skipped), cancel_running (cancel the oldest "
                                        "jobs of the key to make room)"},
        }, ("key", "limit"), closed=True,
            description="at most limit jobs with this key run at once, across the cluster; the others wait, "
                        "queued and held, without blocking other keys or their queue"),
        "ref": {**NAME, "description": "its name in the batch: the other jobs' depends_on name it so, and its "
                                       "dependents' inputs file keys what it left by it"},
        "depends_on": {"type": "array", "maxItems": MAX_DEPENDS, "items": {"oneOf": [
            JOB_ID, NAME, obj({"job": {"oneOf": [JOB_ID, NAME]},
                               "on": {"type": "string", "enum": [o.value for o in On]}}, ("job",), closed=True)]},
            "description": "jobs it waits on, blocked: ids, refs of jobs of the same batch, or {job, on} with on "
                           "success (the default), failure or completion; one that ends otherwise skips it"},
    }, closed=True, oneOf=[{"required": [k]} for k in KINDS],
        dependentRequired={"args": ["task"], "params": ["runner"]}, dependentSchemas={"run_at": {"not": {"required": ["delay"]}},
                          "rate_keys": {"not": {"anyOf": [{"required": ["run_at"]}, {"required": ["delay"]},
                                                          {"required": ["depends_on"]}]}}},
        allOf=[{"if": {"anyOf": [{"required": ["run_at"]}, {"required": ["delay"]}, {"required": ["depends_on"]}]},
                "then": {"properties": {"concurrency": {"properties": {"on_limit": {"const": "queue"}}}}}}],
        description="exactly one of command, shell, task (args only with task), python, docker, runner (params only "
                    "with runner); run_at or delay, not both, and "
                    "neither (nor depends_on) with rate_keys, nor with a concurrency on_limit other than queue; an "
                    "optional field is left out, never null"),
    "JobSummary": obj(JOB_FIELDS, JOB_REQUIRED,
                      description="a job as listings show it: bounded in size, without its spec"),
    "Job": obj({**JOB_FIELDS, "spec": {
        "type": "object", "description": "the spec in the form it was submitted in (command, shell, or task and "
                                         "args), every field with its value, the defaults filled in"}},
        (*JOB_REQUIRED, "spec")),
    "Attempt": obj({
        "attempt": INT, "worker": nullable({"type": "string"}), "state": {"type": "string"},
        "started_at": TIME, "finished_at": nullable(TIME), "exit_code": nullable(INT),
        "error": nullable({"type": "string"}), "duration": nullable({"type": "number"}),
        "stdout_bytes": INT, "stderr_bytes": INT,
    }, ("attempt", "worker", "state", "started_at", "finished_at", "exit_code", "error", "duration")),
    "Result": obj({
        "attempt": INT, "exit_code": nullable(INT), "error": nullable({"type": "string"}),
        "value": {"description": "the JSON value the attempt wrote to $ORCH_RESULT_PATH (null: none)"},
        "duration": nullable({"type": "number"}), "stdout": {"type": "string"}, "stderr": {"type": "string"},
        "stdout_truncated": {"type": "boolean"}, "stderr_truncated": {"type": "boolean"},
    }, ("attempt", "exit_code", "stdout", "stderr", "stdout_truncated", "stderr_truncated")),
    "JobDetail": {"allOf": [ref("Job"), obj({
        "attempts": {"type": "array", "items": ref("Attempt")},
        "duration": nullable({"type": "number"}),
        "result": nullable(ref("Result")),
        "dependencies": {"type": "array", "items": ref("Dependency")},
        "workflow": nullable({**JOB_ID, "description": "the workflow it is part of: the id of its first job"}),
    }, ("attempts", "result"))]},
    "Dependency": obj({
        "job_id": INT, "on": {"type": "string", "enum": [o.value for o in On]},
        "met": {"type": "boolean"}, "ref": nullable({"type": "string"}),
        "state": nullable({"type": "string", "description": "the state of the job it waits on (null: purged)"}),
    }, ("job_id", "on", "met", "ref", "state")),
    "Workflow": obj({
        "id": INT, "state": {"type": "string", "enum": list(WORKFLOW_STATES)},
        "counts": {"type": "object", "additionalProperties": COUNT, "description": "its jobs by state"},
        "jobs": {"type": "array", "items": {"allOf": [ref("JobSummary"), obj({
            "ref": nullable({"type": "string"}), "dependencies": {"type": "array", "items": ref("Dependency")},
        }, ("ref", "dependencies"))]}},
    }, ("id", "state", "counts", "jobs")),
    "JobPage": obj({"jobs": {"type": "array", "items": ref("JobSummary")}, "next_cursor": nullable({"type": "string"})},
                   ("jobs", "next_cursor")),
    "Jobs": obj({"jobs": {"type": "array", "items": ref("JobSummary"),
                          "description": "the new jobs, in the order given, as listings show them"}}, ("jobs",)),
    "Event": obj({
        "id": INT, "job_id": INT, "attempt": INT, "from": nullable({"type": "string"}), "to": {"type": "string"},
        "at": TIME, "reason": {"type": "string"},
    }, ("id", "job_id", "attempt", "from", "to", "at", "reason")),
    "Events": obj({"events": {"type": "array", "items": ref("Event")}}, ("events",)),
    "Output": obj({
        "job_id": INT, "attempt": INT, "state": {"type": "string"}, "stdout": {"type": "string"},
        "stderr": {"type": "string"}, "stdout_truncated": {"type": "boolean"}, "stderr_truncated": {"type": "boolean"},
    }, ("job_id", "attempt", "state", "stdout", "stderr", "stdout_truncated", "stderr_truncated")),
    "Why": obj({
        "job_id": INT, "state": {"type": "string"}, "queue": {"type": "string"}, "attempt": INT,
        "max_attempts": INT, "reason": {"type": "string"}, "message": {"type": "string"},
    }, ("job_id", "state", "reason", "message")),
    "Worker": obj({
        "id": {"type": "string"}, "name": {"type": "string"}, "hostname": {"type": "string"},
        "queues": {"type": "array", "items": {"type": "string"}}, "concurrency": INT,
        "state": {"type": "string", "enum": [s.value for s in WorkerState]},
        "registered_at": TIME, "last_heartbeat": TIME, "heartbeat_age": {"type": "number"}, "running": INT,
        "metrics": nullable({"type": "string", "description": "URL of the worker's Prometheus metrics"}),
        "runners": {"type": "array", "items": {"type": "string"}},
    }, ("id", "name", "hostname", "queues", "concurrency", "state", "running")),
    "Workers": obj({"workers": {"type": "array", "items": ref("Worker")}}, ("workers",)),
    "Register": obj({
        "name": {"type": "string", "maxLength": 200, "pattern": f"^[^{CONTROL_CHARS}]*$",
                 "description": "no control or format characters (they would reach operators' terminals)"},
        "hostname": {"type": "string", "maxLength": 255, "pattern": f"^[^{CONTROL_CHARS}]*$"},
        "queues": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 32},
        "concurrency": {"type": "integer", "minimum": 1, "maximum": 10_000},
        "runners": {"type": "array", "minItems": 1, "maxItems": 64, "items": {"type": "string",
                    "pattern": RUNNER_RE.pattern}, "description": "the runners this worker has (default: exec)"},
        "metrics": {"type": "string", "maxLength": MAX_METRICS_ADDRESS,
                    "pattern": f"^(?:{METRICS_ADDRESS_RE.pattern})$",
                    "description": "where this worker serves Prometheus metrics: host:port (path /metrics) or an "
                                   "http(s) URL (no path: /metrics); listed by GET /v1/metrics/targets"},
    }, closed=True),
    "Registered": obj({
        "worker_id": {"type": "string"}, "heartbeat_interval": {"type": "number"}, "lease_ttl": {"type": "number"},
        "long_poll_timeout": {"type": "number"},
        "max_body_bytes": {"type": "integer", "description": "the largest request body the scheduler takes"},
        "output_limit_bytes": {"type": "integer", "description": "output kept per attempt and stream (the tail)"},
        "max_result_bytes": {"type": "integer", "description": "the largest JSON value a job's result may be"},
        "credential": {"type": "string", "description": "this worker's own bearer token for /v1/workers/{worker_id}/..."},
    }, ("worker_id", "heartbeat_interval", "lease_ttl", "long_poll_timeout", "max_body_bytes", "output_limit_bytes",
        "credential")),
    "AttemptRef": obj({"job_id": JOB_ID, "attempt": ATTEMPT}, ("job_id", "attempt"), closed=True),
    "Heartbeat": obj({
        "running": {"type": "array", "items": ref("AttemptRef"), "maxItems": MAX_BATCH},
        "draining": {"type": "boolean"},
    }, closed=True),
    "HeartbeatReply": obj({"cancel": {"type": "array", "items": ref("AttemptRef")},
                           "stale": {"type": "array", "items": ref("AttemptRef")},
                           "drain": {"type": "boolean", "description": "true: the worker was asked to drain "
                                                                        "(PATCH /v1/workers/{worker_id})"}},
                          ("cancel", "stale")),
    "UiLink": obj({"path": {"type": "string", "description": "/ui/link?code=...: open it on the scheduler's address"},
                   "expires_in": {"type": "number"}}, ("path", "expires_in")),
    "WorkerPatch": obj({
        "draining": {"type": "boolean", "const": True,
                     "description": "true: the worker takes no new job, finishes what it runs, and stops"},
    }, ("draining",), closed=True),
    "LeaseRequest": obj({
        "max": {"type": "integer", "minimum": 1, "maximum": 1000},
        "queues": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 32},
        "wait": {"type": "number", "minimum": 0, "description": "seconds to hold the request open, at most scheduler.long_poll_timeout"},
    }, closed=True),
    "Lease": obj({"job_id": INT, "attempt": INT, "spec": {"type": "object"}, "queue": {"type": "string"},
                  "queued_at": {"type": "number"},
                  "inputs": {"type": "object", "description": "a job with dependencies: what each left, by its ref "
                                                              "(or id): {state, exit_code, value}"}},
                 ("job_id", "attempt", "spec")),
    "Leases": obj({"jobs": {"type": "array", "items": ref("Lease")}}, ("jobs",)),
    "Chunk": obj({"job_id": JOB_ID, "attempt": ATTEMPT, "stream": {"type": "string", "enum": ["stdout", "stderr"]},
                  "data": {"type": "string"},
                  "skipped": {"type": "integer", "minimum": 0, "maximum": 2**62,
                              "description": "bytes of this stream dropped (not sent) right before data"}},
                 ("job_id", "attempt", "stream", "data"), closed=True),
    "Chunks": obj({"chunks": {"type": "array", "items": ref("Chunk"), "maxItems": MAX_BATCH}}, ("chunks",), closed=True),
    "Accepted": obj({"accepted": {"type": "array", "items": {"type": "boolean"}}}, ("accepted",)),
    "AttemptEnd": obj({
        "job_id": JOB_ID, "attempt": ATTEMPT, "outcome": {"type": "string", "enum": RESULT_OUTCOMES},
        "exit_code": nullable({"type": "integer", "minimum": -255, "maximum": 255}),
        "error": nullable({"type": "string", "maxLength": 4096}),
        "duration": nullable({"type": "number", "minimum": 0, "maximum": 10**9}),
        "output": {"type": "array", "items": ref("Chunk"), "maxItems": MAX_BATCH},
        "waited": {"type": "number", "minimum": 0, "maximum": 86400},
        "value": {"description": "the JSON value the job wrote to $ORCH_RESULT_PATH, at most "
                                 "scheduler.max_result_bytes of JSON"},
    }, ("job_id", "attempt", "outcome"), closed=True),
    "OneEnd": obj({
        "attempt": ATTEMPT, "outcome": {"type": "string", "enum": RESULT_OUTCOMES},
        "exit_code": nullable({"type": "integer", "minimum": -255, "maximum": 255}),
        "error": nullable({"type": "string", "maxLength": 4096}),
        "duration": nullable({"type": "number", "minimum": 0, "maximum": 10**9}),
        "output": {"type": "array", "items": ref("Chunk"), "maxItems": MAX_BATCH},
        "waited": {"type": "number", "minimum": 0, "maximum": 86400},
        "value": {"description": "the JSON value the job wrote to $ORCH_RESULT_PATH, at most "
                                 "scheduler.max_result_bytes of JSON"},
    }, ("attempt", "outcome"), closed=True),
    "Completions": obj({
        "results": {"type": "array", "items": ref("AttemptEnd"), "minItems": 1, "maxItems": MAX_BATCH},
        "lease": obj({
            "max": {"type": "integer", "minimum": 1, "maximum": 1000},
            "queues": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 32},
        }, closed=True, description="also claim up to max jobs now (no waiting), in the same commit"),
    }, ("results",), closed=True),
    "Answer": obj({"job_id": INT, "attempt": INT, "accepted": {"type": "boolean"}, "state": {"type": "string"},
                   "error": {"type": "string"}}, ("job_id", "attempt", "accepted")),
    "Answers": obj({"results": {"type": "array", "items": ref("Answer")},
                    "jobs": {"type": "array", "items": ref("Lease"), "description": "claimed, when lease was asked"}},
                   ("results",)),
    "HandBack": obj({"attempts": {"type": "array", "items": ref("AttemptRef"), "maxItems": MAX_BATCH},
                     "stop": {"type": "boolean"}}, closed=True),
    "HandedBack": obj({"handed_back": {"type": "array", "items": ref("AttemptRef")}}, ("handed_back",)),
    "ScheduleBody": obj({
        "name": NAME,
        "cron": CRON, "tz": TZ,
        "overlap": {"type": "string", "enum": [o.value for o in Overlap],
                    "description": "while the previous job has not ended: skip (the default), allow, cancel_running, "
                                   "queue_one (one job waits for it)"},
        "catchup": {"type": "number", "minimum": 0, "maximum": MAX_CATCHUP,
                    "description": "seconds late a tick may still fire (default 60); older ones are missed"},
        "job": SCHEDULE_JOB,
        "paused": {"type": "boolean"},
    }, ("name", "cron", "job"), closed=True,
        description="the job: a spec as POST /v1/jobs takes, without idempotency_key, run_at, delay, depends_on, ref"),
    "SchedulePatch": obj({k: v for k, v in {
        "cron": CRON, "tz": TZ,
        "overlap": {"type": "string", "enum": [o.value for o in Overlap]},
        "catchup": {"type": "number", "minimum": 0, "maximum": MAX_CATCHUP},
        "job": SCHEDULE_JOB, "paused": {"type": "boolean"}}.items()}, closed=True),
    "Schedule": obj({
        "name": {"type": "string"}, "cron": {"type": "string"}, "tz": {"type": "string"},
        "overlap": {"type": "string"}, "catchup": {"type": "number"}, "job": {"type": "object"},
        "paused": {"type": "boolean"}, "created_at": TIME, "updated_at": TIME, "next_at": nullable(TIME),
        "next": {"type": "array", "items": TIME},
        "last_job": nullable(obj({"id": INT, "state": nullable({"type": "string"})}, ("id", "state"))),
        "fired": COUNT, "skipped": COUNT, "missed": COUNT, "last_missed_at": nullable(TIME),
    }, ("name", "cron", "tz", "overlap", "catchup", "job", "paused", "next_at", "fired", "skipped", "missed")),
    "Schedules": obj({"schedules": {"type": "array", "items": ref("Schedule")}}, ("schedules",)),
    "Batch": obj({"jobs": {"type": "array", "items": ref("JobSpec"), "minItems": 1, "maxItems": MAX_BATCH}},
                 ("jobs",), closed=True),
    "Replay": obj({"by": BY}, closed=True),
    "ReplayMany": obj({
        "ids": {"type": "array", "items": JOB_ID, "minItems": 1, "maxItems": MAX_BATCH},
        "state": {"type": "string", "enum": sorted(REPLAYABLE)},
        "queue": NAME,
        "by": BY,
    }, closed=True, oneOf=[{"required": ["ids"], "not": {"anyOf": [{"required": ["state"]}, {"required": ["queue"]}]}},
                           {"required": ["state"], "not": {"required": ["ids"]}}],
        description="the jobs to replay: ids, or every job in state (of queue, or of every queue)"),
    "Replayed": obj({
        "replayed": {"type": "array", "items": JOB_ID, "description": "the jobs queued again"},
        "refused": {"type": "array", "items": obj({"id": JOB_ID, "error": ref("ErrorBody")}, ("id", "error")),
                    "description": "the jobs named that were not, and why (no such job, or its state)"},
    }, ("replayed", "refused")),
    "Queue": obj({
        "name": NAME, **{state.value: COUNT for state in QUEUE_COUNTS},
        "paused": {"type": "boolean", "description": "a paused queue hands out no job; its running jobs go on"},
        "oldest_queued_at": nullable(TIME),
        "oldest_queued_age": nullable({"type": "number", "minimum": 0,
                                       "description": "seconds the oldest queued job has waited"}),
        "changed": {"type": "boolean", "description": "pause, resume, set: whether the call changed anything"},
        "concurrency": nullable({"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY,
                                 "description": "at most this many of its jobs run at once (null: no limit)"}),
        "held": {**COUNT, "description": "of its queued jobs, those held back by their concurrency key"},
    }, ("name", *(state.value for state in QUEUE_COUNTS), "paused", "oldest_queued_at", "oldest_queued_age",
        "concurrency", "held"),
        description="a queue's unfinished jobs by state (queued: its depth)"),
    "Limit": obj({
        "name": LIMIT_NAME, "rate": {"type": "string", "description": "COUNT/UNIT, e.g. 100/m, 10/s, 5/10s"},
        "count": {"type": "integer", "minimum": 1}, "per": {"type": "number", "exclusiveMinimum": 0},
        "burst": {"type": "integer", "minimum": 1},
        "next_start_at": {**TIME, "description": "the first time a start of it is allowed (now, if one is)"},
    }, ("name", "rate", "count", "per", "burst", "next_start_at")),
    "Limits": obj({"limits": {"type": "array", "items": ref("Limit")}}, ("limits",)),
    "LimitBody": obj({
        "rate": {"type": "string", "minLength": 3, "maxLength": 40, "pattern": RATE_PATTERN,
                 "description": "COUNT/UNIT: 100/m, 10/s, 5/10s (units s, m, h, d)"},
        "burst": {"type": "integer", "minimum": 1, "maximum": MAX_BURST,
                  "description": "starts a bucket left unused may let through at once (default 1)"},
    }, ("rate",), closed=True),
    "Deleted": obj({"name": {"type": "string"}, "deleted": {"type": "boolean"}}, ("name", "deleted")),
    "Purge": obj({
        "older_than": {"type": "number", "minimum": 0, "maximum": 100 * 366 * 86400,
                       "description": "seconds since the job ended (0: every ended job)"},
        "state": {"type": "string", "enum": sorted(TERMINAL), "description": "only jobs that ended so"},
    }, ("older_than",), closed=True),
    "Purged": obj({"purged": COUNT}, ("purged",)),
    "Queues": obj({"queues": {"type": "array", "items": ref("Queue")}}, ("queues",)),
    "QueueSettings": obj({
        "concurrency": nullable({"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY,
                                 "description": "at most this many of the queue's jobs run at once; null lifts it"}),
    }, ("concurrency",), closed=True),
    "Health": obj({"status": {"type": "string", "const": "ok"}}, ("status",)),
    "WaitMany": obj({
        "ids": {"type": "array", "items": JOB_ID, "minItems": 1, "maxItems": MAX_BATCH},
        "timeout": {"type": "number", "minimum": 0, "maximum": 3600,
                    "description": "seconds to hold the request open at most (default scheduler.long_poll_timeout)"},
    }, ("ids",), closed=True),
    "Ended": obj({
        "ended": {"type": "array", "items": ref("JobSummary"), "description": "every job named that has ended"},
        "waiting": {"type": "integer", "minimum": 0, "description": "how many of the jobs named have not"},
    }, ("ended", "waiting")),
    "MetricsTargets": {
        "type": "array",
        "description": "Prometheus HTTP service discovery (http_sd_config): one group per listener",
        "items": obj({
            "targets": {"type": "array", "items": {"type": "string", "description": "host:port"},
                        "minItems": 1, "maxItems": 1},
            "labels": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "role (scheduler or worker); for a worker, worker (its id) and name; "
                                      "__scheme__ and __metrics_path__ when not http and /metrics"},
        }, ("targets", "labels")),
    },
}

SECURITY_SCHEMES = {
    "clientToken": {"type": "http", "scheme": "bearer",
                    "description": "the client token: submit, read, cancel (orch token show --client)"},
    "joinToken": {"type": "http", "scheme": "bearer",
                  "description": "the worker join token: register a worker (orch token show --worker)"},
    "workerCredential": {"type": "http", "scheme": "bearer",
                         "description": "the credential POST /v1/workers returned to this worker; only its own routes"},
}

_ERROR = {"description": "an error naming the field", "content": {"application/json": {"schema": ref("Error")}}}


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema_name)}}}


def _op(summary: str, ok: dict[str, Any], *, status: str = "200", security: str | None = "clientToken",
        body: str | None = None, params: list[dict[str, Any]] | None = None,
        more: dict[str, Any] | None = None, body_required: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {status: ok, **(more or {}), "4XX": _ERROR}}
    op["security"] = [{security: []}] if security else []
    if body:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": ref(body)}}}
    if params:
        op["parameters"] = params
    return op


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    p = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        p["description"] = description
    return p


JOB_PARAM = _path("job_id", JOB_ID)
IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": IDEMPOTENCY_KEY,
                      "description": "the job's idempotency_key, as a header (both given: they must be the same)"}
WORKER_PARAM = _path("worker_id", NAME)
QUEUE_PARAM = _path("queue", NAME)
LIMIT_PARAM = _path("name", LIMIT_NAME)
SCHEDULE_PARAM = _path("name", NAME)
FOLLOW = _query("follow", {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"]},
                "1: stream NDJSON lines until the job ends")
NDJSON = {"description": "the document, or with follow=1 a stream of NDJSON lines",
          "content": {"application/json": {}, "application/x-ndjson": {}}}


METHODS = ("get", "post", "put", "delete", "patch")


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) -> operation."""
    return {(m.upper(), path): op for path, item in doc["paths"].items() for m, op in item.items() if m in METHODS}


def query_names(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, frozenset[str] | None]]:
    """(METHOD, path) -> {query parameter: its allowed values, or None if any} (HEAD as GET)."""
    out = {}
    for (method, path), op in operations(doc).items():
        names = {p["name"]: frozenset(p["schema"]["enum"]) if "enum" in p["schema"] else None
                 for p in op.get("parameters", []) if p["in"] == "query"}
        out[(method, path)] = names
        if method == "GET":
            out[("HEAD", path)] = names
    return out
