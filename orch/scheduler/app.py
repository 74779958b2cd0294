"""The scheduler's HTTP API: routes for clients and workers, the JSON error shape, the reaper."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import socket
import time
import uuid
from collections import deque
from contextlib import suppress
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from orch.auth import new_worker_credential
from orch.config import Settings
from orch.core import cron
from orch.core.concurrency import MAX_LIMIT as MAX_CONCURRENCY
from orch.core.errors import (
    Conflict,
    NotFound,
    OrchError,
    PayloadTooLarge,
    StaleAttempt,
    StorageError,
    Unauthorized,
    ValidationError,
)
from orch.core.kinds import EXEC, RUNNER_RE
from orch.core.rates import MAX_BURST, check_limit_name, parse_rate
from orch.core.records import JobRecord, Lease, LimitInfo, ScheduleInfo, Verdict
from orch.core.spec import (
    CONTROL_RE,
    NAME_RE,
    JobSpec,
    check_idempotency_key,
    check_printable,
    parse_spec,
    stored_spec,
    validate_name,
    view_defaults,
)
from orch.core.states import REPLAYABLE, TERMINAL, JobState, Outcome
from orch.logs import info_lines
from orch.metrics import SchedulerMetrics
from orch.output import marker as output_marker
from orch.scheduler import wire
from orch.scheduler.bodies import each, encode, encode_list, let_go, loads_object
from orch.scheduler.cron import CronRunner
from orch.scheduler.dispatch import Hub, wait_any
from orch.scheduler.openapi import MAX_METRICS_ADDRESS, METRICS_ADDRESS_RE
from orch.scheduler.retention import keep_purging
from orch.scheduler.retention import purge as purge_jobs
from orch.scheduler.routes import JOB_ID_PATHS, ROUTES
from orch.scheduler.routes import document as openapi_document
from orch.scheduler.security import BODY, CHALLENGE, GUARD, Guard, ProtocolLog, guard_request, unencodable_field
from orch.scheduler.ui import session as ui_session
from orch.scheduler.ui import views as ui_views
from orch.scheduler.why import explain
from orch.scheduler.wire import leases_json
from orch.store.base import AttemptResult, Change, OutputChunk, Store

log = logging.getLogger("orch.scheduler")

STORE = web.AppKey("store", Store)  # type: ignore[type-abstract]
HUB = web.AppKey("hub", Hub)
SETTINGS = web.AppKey("settings", Settings)
MAX_BATCH = 10_000
MAX_AGE = 100 * 366 * 86400.0  # seconds: an older_than past any job's age
REPLAY_PAGE = 1000  # jobs replayed in one transaction by a replay of a state's jobs
ACCOUNT_SLICE = 256  # committed changes counted and logged per turn of the loop, at most
BIG_OUTPUT = 128 * 1024  # characters of output in an answer beyond which it is encoded a slice at a time


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one, not one per json.dumps call
dumps = _ENCODER.encode


def _small(job: dict[str, Any]) -> bool:
    """A job's answer (or the output route's) with little enough output to be encoded at once."""
    res = job.get("result") or job
    return len(res.get("stdout") or "") + len(res.get("stderr") or "") <= BIG_OUTPUT


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)


ANSWER_PIECE = 256 * 1024  # bytes of a big answer handed to the transport at a time


async def big_answer(request: web.Request, body: bytes, status: int = 200) -> web.StreamResponse:
    """A large JSON answer written a piece at a time, waiting for the transport to drain between pieces,
    so handing megabytes to a slow reader neither holds the loop nor piles up in memory."""
    if len(body) <= ANSWER_PIECE:
        return web.Response(body=body, status=status, content_type="application/json")
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    await resp.prepare(request)
    view = memoryview(body)
    for at in range(0, len(body), ANSWER_PIECE):
        await resp.write(view[at:at + ANSWER_PIECE])
    await resp.write_eof()
    return resp


def raw_json(text: str, status: int = 200) -> web.Response:
    """An answer whose JSON text is already made."""
    return web.Response(body=text.encode(), status=status, content_type="application/json")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 400: "invalid"}


@web.middleware
async def api_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """The one middleware: the guard (security.guard_request), the JSON error shape, and the request's
    latency by method, route template (never the raw path) and status. One layer, not three: each
    layer costs every request a few microseconds."""
    start = time.perf_counter()
    status = 500
    try:
        try:
            resp = await guard_request(request, handler)
        except OrchError as e:
            if e.http_status >= 500:
                log.error("internal error on %s %s: %s", request.method, request.path, e.message)
            resp = ok(e.to_json(), status=e.http_status)
            if isinstance(e, Unauthorized):
                resp.headers.update(CHALLENGE)
        except web.HTTPException as e:
            if e.status < 400:
                status = e.status
                raise
            resp = _http_error(request, e)
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # the client went away
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            resp = ok({"error": {"code": "internal", "message": "internal error; see the scheduler log"}}, 500)
        status = resp.status
        return resp
    finally:
        resource = request.match_info.route.resource
        request.app[API].metrics.observe_request(
            request.method, resource.canonical if resource is not None else "unmatched", status,
            time.perf_counter() - start)


def _http_error(request: web.Request, e: web.HTTPException) -> web.Response:
    """aiohttp's own 4xx (no route, wrong method, body too large) in orch's JSON error shape."""
    message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
    if e.status == 413:
        message = f"request body is larger than {request.app[SETTINGS]['scheduler.max_body_bytes']} bytes"
    body: dict[str, Any] = {"error": {"code": _HTTP_CODES.get(e.status, "http_error"), "message": message}}
    if e.status == 413:
        body["error"]["field"] = "body"
    elif e.status == 404:
        for pattern in JOB_ID_PATHS:  # a job route's path with something else where its id goes
            m = pattern.fullmatch(request.path)
            if m:  # a job route but for its id: say so, as job_id_of does for ids that are digits
                body["error"].update(message=f"no job {m['id'][:40]!r}", field="id")
                break
    resp = ok(body, status=e.status)
    if "Allow" in e.headers:
        resp.headers["Allow"] = e.headers["Allow"]
    return resp


# --------------------------------------------------------------------------- input helpers


async def read_json(request: web.Request, list_key: str | None = None) -> dict[str, Any]:
    """The body as a JSON object; ``list_key``: a big body's list under that key is parsed an item at a
    time, yielding to the loop (orch/scheduler/bodies.py)."""
    raw = request.get(BODY)  # read and decoded by guard_request
    if raw is None:
        raw = await request.read()
    if not raw:
        raise ValidationError("request body is empty; a JSON object is required", field="body")
    try:
        data = await loads_object(raw, list_key) if list_key else json.loads(raw)
    except RecursionError:
        raise ValidationError("request body is nested too deeply", field="body") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValidationError(f"request body is not valid JSON: {e}", field="body") from None
    if not isinstance(data, dict):
        raise ValidationError("request body must be a JSON object", field="body")
    if _SURROGATE.search(raw):  # only a \uD800-\uDFFF escape can make a string SQLite cannot store
        bad = unencodable_field(data)
        if bad is not None:
            raise ValidationError("strings must be valid Unicode (this one holds a lone surrogate)", field=bad)
    return data


async def optional_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, as read_json reads it, or {} when there is none."""
    raw = request.get(BODY)
    if raw is None:
        raw = await request.read()
    return await read_json(request) if raw else {}


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def only(data: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
    for k in data:
        if k not in allowed:
            raise ValidationError(f"unknown field {k!r}", field=prefix + k)


def int_field(data: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None, prefix: str = "") -> int:
    """An integer in [lo, hi]; 2.0 is one, as JSON Schema counts it (null is not "absent")."""
    v = data.get(name, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValidationError(f"{name} must be an integer from {lo} to {hi}", field=prefix + name)
    return v


def num_field(data: dict[str, Any], name: str, lo: float, hi: float, default: float | None = None, prefix: str = "") -> float:
    v = data.get(name, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValidationError(f"{name} must be a number from {lo:g} to {hi:g}", field=prefix + name)
    return float(v)


def opt_str(data: dict[str, Any], name: str, maxlen: int, prefix: str = "", *, nullable: bool = False) -> str | None:
    """An optional string; None when absent, and when null only if ``nullable`` (the document says which)."""
    if name not in data or (nullable and data[name] is None):
        return None
    v = data[name]
    if not isinstance(v, str) or len(v) > maxlen:
        raise ValidationError(f"{name} must be a string of at most {maxlen} characters", field=prefix + name)
    return v


# Numbers in a query as JSON writes them: float() would also take " 5", "5_0", "inf" and "nan".
_QUERY_INT = re.compile(r"-?[0-9]{1,30}")
_QUERY_NUM = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?")


def query_num(request: web.Request, name: str, lo: float, hi: float, default: float) -> float:
    """A number in [lo, hi], or ``default`` when the parameter is absent (an empty value is not absent)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    v = float(raw) if _QUERY_NUM.fullmatch(raw) else None
    if v is None or not lo <= v <= hi:
        raise ValidationError(f"{name} must be a number from {lo:g} to {hi:g}", field=name)
    return v


def query_int(request: web.Request, name: str, lo: int, hi: int, default: int) -> int:
    """An integer in [lo, hi], compared as an integer (2**62 + 1 is not 2**62), or ``default`` when absent."""
    raw = request.query.get(name)
    if raw is None:
        return default
    v = int(raw) if _QUERY_INT.fullmatch(raw) else None
    if v is None or not lo <= v <= hi:
        raise ValidationError(f"{name} must be an integer from {lo:d} to {hi:d}", field=name)
    return v


def queues_of(data: dict[str, Any], prefix: str = "") -> list[str]:
    queues = data.get("queues", ["default"])
    if not isinstance(queues, list) or not queues or len(queues) > 32:
        raise ValidationError("queues must be a list of 1 to 32 queue names", field=prefix + "queues")
    for i, qn in enumerate(queues):
        validate_name(qn, f"{prefix}queues[{i}]")
    return queues


MAX_RUNNERS = 64


def runners_of(data: dict[str, Any]) -> list[str]:
    """The runners a registering worker has (a worker of before runners says none: it has exec)."""
    runners = data.get("runners", [EXEC])
    if not isinstance(runners, list) or not runners or len(runners) > MAX_RUNNERS:
        raise ValidationError(f"runners must be a list of 1 to {MAX_RUNNERS} runner names", field="runners")
    for i, r in enumerate(runners):
        if not isinstance(r, str) or not RUNNER_RE.fullmatch(r):
            raise ValidationError("a runner's name is lower-case letters, digits, _ and - (at most 32)",
                                  field=f"runners[{i}]")
    return list(dict.fromkeys(runners))


def metrics_address(data: dict[str, Any], name: str) -> str | None:
    """A worker's metrics address (host:port or an http(s) URL) as the URL to scrape; None if not given."""
    if name not in data:
        return None
    v = data[name]  # null is not "absent": the document does not take it
    if not isinstance(v, str) or len(v) > MAX_METRICS_ADDRESS or not METRICS_ADDRESS_RE.fullmatch(v):
        raise ValidationError(f"{name} must be host:port or an http(s) URL of at most {MAX_METRICS_ADDRESS} "
                              "characters (e.g. 10.0.0.7:9091)", field=name)
    url = v if "://" in v else f"http://{v}"
    parts = urlsplit(url)  # the pattern has checked every part, the IPv6 literal included
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    return f"{parts.scheme}://{host}:{port}{parts.path or '/metrics'}"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def job_id_of(request: web.Request) -> int:
    raw = request.match_info["job_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise NotFound(f"no job {raw[:40]!r}", field="id")
    return int(raw)


MAX_BY = 128  # characters of the name a client gives as who asked for a replay


def who_asked(request: web.Request, data: dict[str, Any]) -> str:
    """Who asked for a replay, as its event records it: the name the client gave (``by``: orch retry gives
    user@host), and the address the request came from."""
    peer = request.remote or "an unknown address"
    if "by" not in data:
        return peer
    return f"{check_printable(data['by'], 'by', MAX_BY, 'by')} from {peer}"


def _job_id_item(v: Any, i: int) -> int:
    if isinstance(v, float) and v.is_integer():  # 2.0 is an integer, as JSON Schema counts it
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 2**62:
        raise ValidationError(f"ids[{i}] must be a job id (an integer from 1 to {2**62})", field=f"ids[{i}]")
    return v


def attempt_refs(items: Any, field: str) -> list[tuple[int, int]]:
    if not isinstance(items, list) or len(items) > MAX_BATCH:
        raise ValidationError(f"{field} must be a list of at most {MAX_BATCH} items", field=field)
    out = []
    for i, item in enumerate(items):
        p = f"{field}[{i}]."
        if not isinstance(item, dict):
            raise ValidationError("each item must be an object", field=f"{field}[{i}]")
        only(item, {"job_id", "attempt"}, p)
        out.append((int_field(item, "job_id", 1, 2**62, prefix=p), int_field(item, "attempt", 1, 10**6, prefix=p)))
    return out


def chunk_of(item: Any, p: str) -> OutputChunk:
    if not isinstance(item, dict):
        raise ValidationError("each chunk must be an object", field=p.rstrip("."))
    only(item, {"job_id", "attempt", "stream", "data", "skipped"}, p)
    stream = item.get("stream")
    if stream not in ("stdout", "stderr"):
        raise ValidationError("stream must be 'stdout' or 'stderr'", field=p + "stream")
    data = item.get("data")
    if not isinstance(data, str):
        raise ValidationError("data must be a string", field=p + "data")
    return OutputChunk(int_field(item, "job_id", 1, 2**62, prefix=p), int_field(item, "attempt", 1, 10**6, prefix=p),
                       stream, data, int_field(item, "skipped", 0, 2**62, 0, prefix=p))


_OUTCOMES = {o.value for o in Outcome} - {Outcome.RUNNING.value, Outcome.LOST.value, Outcome.HANDED_BACK.value}


def result_of(item: Any, p: str, max_value: int) -> AttemptResult:
    if not isinstance(item, dict):
        raise ValidationError("each result must be an object", field=p.rstrip("."))
    only(item, {"job_id", "attempt", "outcome", "exit_code", "error", "duration", "output", "waited", "value"}, p)
    value = item.get("value")
    text = dumps(value) if value is not None else None
    if text is not None and len(text.encode()) > max_value:
        raise PayloadTooLarge(f"the result value is {len(text.encode()):,} bytes of JSON, more than "
                              f"scheduler.max_result_bytes ({max_value:,})", field=p + "value")
    outcome = item.get("outcome")
    if not isinstance(outcome, str) or outcome not in _OUTCOMES:  # a list or object: not hashable
        raise ValidationError(f"outcome must be one of {', '.join(sorted(_OUTCOMES))}", field=p + "outcome")
    exit_code = item.get("exit_code")
    if exit_code is not None:
        exit_code = int_field(item, "exit_code", -255, 255, prefix=p)
    duration = item.get("duration")
    if duration is not None:
        duration = num_field(item, "duration", 0, 10**9, prefix=p)
    output = item.get("output", [])
    if not isinstance(output, list) or len(output) > MAX_BATCH:
        raise ValidationError("output must be a list of chunks", field=p + "output")
    return AttemptResult(
        job_id=int_field(item, "job_id", 1, 2**62, prefix=p),
        attempt=int_field(item, "attempt", 1, 10**6, prefix=p),
        outcome=Outcome(outcome), exit_code=exit_code, error=opt_str(item, "error", 4096, p, nullable=True),
        duration=duration, output=[chunk_of(c, f"{p}output[{i}].") for i, c in enumerate(output)],
        waited=num_field(item, "waited", 0, 86400, 0.0, prefix=p), value=text,
    )


# --------------------------------------------------------------------------- the API


class Api:
    """Route handlers; they validate, call the store, and wake whoever waits."""

    openapi: dict[str, Any] = {}  # the document, set by build_app
    guard: Guard | None = None  # set by build_app: tokens and worker credentials (orch/scheduler/security.py)
    # (host, port) of the scheduler's own metrics listener (metrics.scheduler_port), once it listens.
    metrics_listener: tuple[str, int] | None = None

    def __init__(self, store: Store, hub: Hub, settings: Settings) -> None:
        self.store = store
        self.hub = hub
        self.worker_runners: dict[str, frozenset[str]] = {}  # by worker id: what each registered with
        self.settings = settings
        self.lease_ttl: float = settings["scheduler.lease_ttl"]
        self.long_poll: float = settings["scheduler.long_poll_timeout"]
        self.defaults = settings.retry_policy
        self._view_defaults = view_defaults(self.defaults)  # what spec_view fills in, made once
        self.max_spec: int = settings["scheduler.max_spec_bytes"]
        self.output_limit: int = settings["scheduler.output_limit_bytes"]
        self.max_result: int = settings["scheduler.max_result_bytes"]
        self.metrics = SchedulerMetrics()
        self.leading = False  # this scheduler runs the reaper (and retention) now: the reaper says
        self.cron: Any = None  # the cron runner (orch/scheduler/cron.py), made beside the app
        self._backlog: deque[Change] = deque()  # committed changes not counted and logged yet (see committed)
        self._accounting = False

    def committed(self, changes: list[Change]) -> None:
        """Every job state change, once its batch has committed (the store's on_commit): wake, count, log.

        Waiters are woken at once. Counting and the log lines (~7 us a change) go a slice per turn of
        the loop when there are many (a batch submit of 10,000 took 70 ms of the loop at once), in order.
        """
        self.hub.committed(changes)
        if not self._backlog and len(changes) <= ACCOUNT_SLICE:
            self._account(changes)
            return
        self._backlog.extend(changes)
        if not self._accounting:
            self._accounting = True
            asyncio.get_running_loop().call_soon(self._account_backlog)

    def _account(self, changes: list[Change]) -> None:
        self.metrics.observe(changes)
        if log.isEnabledFor(logging.INFO):
            info_lines(log, [_change_line(c) for c in changes])

    def _account_backlog(self) -> None:
        backlog = self._backlog
        part = [backlog.popleft() for _ in range(min(ACCOUNT_SLICE, len(backlog)))]
        try:
            self._account(part)
        finally:
            if backlog:
                asyncio.get_running_loop().call_soon(self._account_backlog)
            else:
                self._accounting = False

    # ---- clients

    async def health(self, request: web.Request) -> web.Response:
        return ok({"status": "ok"})

    async def openapi_json(self, request: web.Request) -> web.Response:
        return ok(self.openapi)

    async def metrics_page(self, request: web.Request) -> web.Response:
        body, content_type = await self.render_metrics(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def render_metrics(self, accept: str = "") -> tuple[bytes, str]:
        """Refresh the state gauges' snapshot (a few GROUP BY reads), then render; also serves metrics.scheduler_port."""
        try:
            self.metrics.set_snapshot(await self.store.metrics_snapshot(), self.store)
        except Exception:  # the counters are still worth serving; the gauges keep their last values
            log.exception("could not read the metrics snapshot")
        return self.metrics.render_for(accept)

    async def workflow(self, request: web.Request) -> web.StreamResponse:
        workflow, nodes = await self.store.workflow(job_id_of(request))
        body = wire.workflow_json(workflow, nodes)
        if len(nodes) <= 100:
            return ok(body)
        return await big_answer(request, await encode(body))

    async def why(self, request: web.Request) -> web.Response:
        facts = await self.store.why_facts(job_id_of(request))
        return ok(explain(facts, self.settings["scheduler.heartbeat_interval"]))

    def view(self, rec: JobRecord) -> dict[str, Any]:
        """A job as the API shows it: its spec in the form it was submitted in, with the defaults filled in."""
        return wire.job_json(rec, self._view_defaults, self.output_limit)

    async def answer(self, request: web.Request, job: dict[str, Any], status: int = 200) -> web.StreamResponse:
        """A job's answer; one with a lot of output is encoded a slice at a time (orch/scheduler/bodies.py)."""
        if _small(job):
            return ok(job, status)
        return await big_answer(request, await encode(job), status)

    def stored(self, spec: JobSpec, prefix: str) -> tuple[dict[str, Any], str]:
        """The spec's stored form and its JSON text; 413 naming its largest field if it is over
        scheduler.max_spec_bytes (large data belongs in files the job reads, not in its spec)."""
        data = stored_spec(spec, self.defaults)
        text = dumps(data)
        if len(text) > self.max_spec:
            largest = max(data, key=lambda k: len(dumps(data[k])))
            raise PayloadTooLarge(
                f"the job spec is {len(text):,} bytes of JSON, more than scheduler.max_spec_bytes "
                f"({self.max_spec:,}); its largest field is {largest!r}: put large data in a file the job reads",
                field=prefix + largest)
        return data, text

    async def submit(self, request: web.Request) -> web.StreamResponse:
        raw = request.get(BODY)  # read and decoded by guard_request
        if raw is None:
            raw = await request.read()
        if len(raw) > 4 * self.max_spec:  # far over the limit: refused before it is parsed at all
            raise PayloadTooLarge(f"the job spec is {len(raw):,} bytes, more than scheduler.max_spec_bytes "
                                  f"({self.max_spec:,}): put large data in a file the job reads", field="body")
        spec = parse_spec(await read_json(request))
        wait = query_num(request, "wait", 0, 3600, 0)
        header = request.headers.get("Idempotency-Key")
        if header is not None:
            key = check_idempotency_key(header, "Idempotency-Key")
            if spec.idempotency_key not in (None, key):
                # A 409, not a 400: each part is valid alone (the document cannot say a header and a body field
                # must agree); the request is at odds with itself.
                raise Conflict("the Idempotency-Key header and the spec's idempotency_key differ: give one, "
                               "or the same in both", field="Idempotency-Key")
            spec = dataclasses.replace(spec, idempotency_key=key)
        stored = self.stored(spec, "")
        try:
            # Durable first, waiting or not: the job may run while the submit waits, and a power cut must not take
            # back a job that ran. (Without this fsync a waiting submit was 2-11 % faster, its job unsaved for
            # as long as it ran; with one started after a delay, 0-3 %.)
            jobs = await self.store.submit([spec], self.defaults, [stored])
        except (ValidationError, NotFound, Conflict) as e:  # a dependency's place in a batch: here, one job
            if e.field and e.field.startswith("jobs[0]."):
                e.field = e.field[len("jobs[0]."):]
            raise
        status = 200 if jobs[0].replayed else 201
        if wait > 0:
            job = self.view(await self._ended(request, jobs[0].id, time.monotonic() + wait))
            if jobs[0].replayed:
                job["idempotent_replay"] = True
            return await self.synced_answer(request, job, status)
        if jobs[0].replayed:  # the job of this key, as it is now
            return ok({**self.view(await self.store.get_job(jobs[0].id, with_output=False)),
                       "idempotent_replay": True}, 200)
        return ok(self.view(JobRecord(jobs[0], stored[0], [])), 201)

    async def submit_batch(self, request: web.Request) -> web.StreamResponse:
        """Up to MAX_BATCH specs in one transaction. Parsing, checking and answering go a slice at a time:
        a batch of thousands must not hold up the other requests (orch/scheduler/bodies.py)."""
        if "Idempotency-Key" in request.headers:
            raise ValidationError("a batch takes no Idempotency-Key header: give each job its own idempotency_key",
                                  field="Idempotency-Key")
        data = await read_json(request, "jobs")
        only(data, {"jobs"})
        items = data.get("jobs")
        if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
            raise ValidationError(f"jobs must be a list of 1 to {MAX_BATCH} job specs", field="jobs")
        specs = await each(items, lambda i, item: parse_spec(item, f"jobs[{i}]."))
        stored = await each(specs, lambda i, spec: self.stored(spec, f"jobs[{i}]."))
        jobs = await self.store.submit(specs, self.defaults, stored)
        # Summaries, as listings: the caller has the specs it sent, and 10,000 of them near
        # scheduler.max_spec_bytes would make an answer as large as the request again.
        times: dict[float, str | None] = {}  # one created_at for the whole batch, written once
        summaries = await each(jobs, lambda i, job: wire.job_summary(job, times))
        body = await encode_list("jobs", summaries)
        status = 200 if all(job.replayed for job in jobs) else 201  # 200: nothing new (every job was a replay)
        await let_go(items, specs, stored, jobs, summaries)
        return await big_answer(request, body, status)

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        return await self.answer(request, self.view(await self.store.get_job(job_id_of(request))))

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        only(dict(q), {"state", "queue", "limit", "cursor"})
        state_name = q.get("state")
        state = JobState._value2member_map_.get(state_name) if state_name is not None else None
        if state_name is not None and state is None:
            raise ValidationError(f"state must be one of {', '.join(s.value for s in JobState)}", field="state")
        queue = q.get("queue")
        if queue is not None:
            validate_name(queue, "queue")
        limit = query_int(request, "limit", 1, 1000, 50)
        cursor_raw = q.get("cursor")
        if cursor_raw is not None and (not (cursor_raw.isascii() and cursor_raw.isdigit()) or len(cursor_raw) > 18):
            raise ValidationError("cursor must be a value from a previous page's next_cursor", field="cursor")
        found, nxt = await self.store.list_jobs(
            state=state, queue=queue, limit=limit, cursor=int(cursor_raw) if cursor_raw else None  # type: ignore[arg-type]
        )
        jobs = await each(found, lambda i, job: wire.job_summary(job))  # a page of 1,000: a slice at a time
        if len(jobs) <= 100:
            return ok({"jobs": jobs, "next_cursor": str(nxt) if nxt is not None else None})
        body = await encode_list("jobs", jobs)  # a page of 1,000: a slice at a time
        return await big_answer(request, body[:-1] + f',"next_cursor":{dumps(str(nxt) if nxt else None)}}}'.encode())

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        job, _ = await self.store.cancel(job_id_of(request))
        return ok(self.view(job))

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """Replay one failed or cancelled job: a fresh set of attempts (404, or 409 naming its state)."""
        job_id = job_id_of(request)
        data = await optional_json(request)
        only(data, {"by"})
        refused, _ = await self.store.replay([job_id], who_asked(request, data))
        if job_id in refused:
            raise refused[job_id]
        return ok(self.view(await self.store.get_job(job_id, with_output=False)))

    async def retry_many(self, request: web.Request) -> web.Response:
        """Replay the jobs named by ``ids``, or every job in ``state`` (failed or cancelled) of ``queue`` (or of
        every queue): each page of REPLAY_PAGE jobs in one transaction. Answers which were replayed, and why each
        of the rest was not."""
        data = await read_json(request)
        only(data, {"ids", "state", "queue", "by"})
        by = who_asked(request, data)
        replayed: list[int] = []
        refused: dict[int, OrchError] = {}
        if "ids" in data:
            if "state" in data or "queue" in data:
                raise ValidationError("name the jobs by ids, or by state (and queue), not both", field="ids")
            ids = data["ids"]
            if not isinstance(ids, list) or not ids or len(ids) > MAX_BATCH:
                raise ValidationError(f"ids must be a list of 1 to {MAX_BATCH} job ids", field="ids")
            ids = [_job_id_item(v, i) for i, v in enumerate(ids)]
            refused, changes = await self.store.replay(ids, by)
            replayed = [c.job_id for c in changes if c.replay]  # (not the dependents it un-skipped)
        else:
            state = data.get("state")
            if not isinstance(state, str) or state not in REPLAYABLE:
                raise ValidationError("state must be failed, cancelled or skipped (or give ids)", field="state")
            queue = data.get("queue")
            if queue is not None:
                validate_name(queue, "queue")
            cursor: int | None = None
            while True:
                found, cursor = await self.store.list_jobs(state=JobState(state), queue=queue, limit=REPLAY_PAGE,
                                                           cursor=cursor)
                if found:
                    more, changes = await self.store.replay([j.id for j in found], by)
                    refused.update(more)
                    replayed.extend(c.job_id for c in changes if c.replay)
                if cursor is None:
                    break
        return ok({"replayed": sorted(replayed),
                   "refused": [{"id": jid, "error": e.to_json()["error"]} for jid, e in sorted(refused.items())]})

    # ---- queues

    async def list_queues(self, request: web.Request) -> web.Response:
        only(dict(request.query), set())
        now = self.store.clock()
        return ok({"queues": [wire.queue_json(q, now) for q in await self.store.queue_stats()]})

    async def pause_queue(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, True)

    async def resume_queue(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: web.Request, paused: bool) -> web.Response:
        """Pause or resume the queue the path names; a resume wakes the long-polls waiting on it here (another
        replica's hear of it through the hint the store sends, or at their next poll)."""
        queue = validate_name(request.match_info["queue"], "queue")
        changed = await self.store.pause_queue(queue, paused)
        (info,) = await self.store.queue_stats([queue])
        if changed:
            log.info("queue %s %s", queue, "paused" if paused else "resumed")
            if not paused and info.queued:
                self.hub.wake_queue(queue, info.queued)
        return ok({**wire.queue_json(info, self.store.clock()), "changed": changed})

    async def set_queue(self, request: web.Request) -> web.Response:
        """A queue's settings: its concurrency limit (null lifts it); a limit raised or lifted wakes the long-polls
        waiting on the queue here (another replica's hear of it through the store's hint)."""
        queue = validate_name(request.match_info["queue"], "queue")
        data = await read_json(request)
        only(data, {"concurrency"})
        if "concurrency" not in data:
            raise ValidationError("concurrency is required: how many of the queue's jobs may run at once, or null",
                                  field="concurrency")
        limit = None if data["concurrency"] is None else int_field(data, "concurrency", 1, MAX_CONCURRENCY, 1)
        changed = await self.store.set_queue_concurrency(queue, limit)
        (info,) = await self.store.queue_stats([queue])
        if changed:
            log.info("queue %s concurrency %s", queue, limit if limit is not None else "unlimited")
        return ok({**wire.queue_json(info, self.store.clock()), "changed": changed})

    async def purge(self, request: web.Request) -> web.Response:
        """Purge the ended jobs (of ``state``, or every ended state) that ended more than ``older_than`` seconds
        ago, with their attempts, output and events; a batch at a time (orch/scheduler/retention.py)."""
        data = await read_json(request)
        only(data, {"older_than", "state"})
        if "older_than" not in data:
            raise ValidationError("older_than is required: seconds since a job ended (0: every ended job)",
                                  field="older_than")
        older = num_field(data, "older_than", 0, MAX_AGE, 0)
        states = tuple(TERMINAL)
        if "state" in data:
            state = data["state"]
            if not isinstance(state, str) or state not in TERMINAL:
                raise ValidationError(f"state must be an ended state: {', '.join(sorted(TERMINAL))}", field="state")
            states = (JobState(state),)
        n = await purge_jobs(self.store, self.store.clock() - older, states)
        if n:
            self.metrics.purged.inc(n)
            log.info("purged %d ended job%s that ended more than %gs ago", n, "" if n == 1 else "s", older)
        return ok({"purged": n})

    # ---- rate limits

    async def list_limits(self, request: web.Request) -> web.Response:
        only(dict(request.query), set())
        now = self.store.clock()
        return ok({"limits": [wire.limit_json(x, now) for x in await self.store.limits()]})

    async def put_limit(self, request: web.Request) -> web.Response:
        """Make or change a rate limit: ``{"rate": "100/m", "burst": 1}`` (201 when made)."""
        name = check_limit_name(request.match_info["name"])
        data = await read_json(request)
        only(data, {"rate", "burst"})
        if "rate" not in data:
            raise ValidationError("rate is required, such as '100/m' or '10/s'", field="rate")
        rate = parse_rate(data["rate"], int_field(data, "burst", 1, MAX_BURST, 1))
        made = await self.store.set_limit(name, rate)
        log.info("rate limit %s %s: %s, burst %d", name, "made" if made else "changed", rate.text(), rate.burst)
        (info,) = [x for x in await self.store.limits() if x.name == name] or [LimitInfo(name, rate, None)]
        return ok(wire.limit_json(info, self.store.clock()), status=201 if made else 200)

    async def delete_limit(self, request: web.Request) -> web.Response:
        name = check_limit_name(request.match_info["name"])
        if not await self.store.delete_limit(name):
            raise NotFound(f"no rate limit {name!r}", field="name")
        log.info("rate limit %s deleted", name)
        return ok({"name": name, "deleted": True})

    # ---- cron schedules

    def _schedule_view(self, info: ScheduleInfo, nxt: int = 0) -> dict[str, Any]:
        s = info.schedule
        upcoming = cron.next_ticks(s.cron, s.tz, max(info.last_tick, self.store.clock()), nxt) if nxt else None
        return wire.schedule_json(info, upcoming)

    def _next_at(self, s: cron.Schedule, after: float) -> float | None:
        if s.paused:
            return None
        got = cron.next_ticks(s.cron, s.tz, after, 1)
        return got[0] if got else None

    async def list_schedules(self, request: web.Request) -> web.Response:
        only(dict(request.query), {"next"})
        n = query_int(request, "next", 0, 100, 1)
        return ok({"schedules": [self._schedule_view(x, n) for x in await self.store.schedules()]})

    async def get_schedule(self, request: web.Request) -> web.Response:
        only(dict(request.query), {"next"})
        name = cron.check_name(request.match_info["name"])
        n = query_int(request, "next", 0, 100, 5)
        (info,) = await self.store.schedules(name)
        return ok(self._schedule_view(info, n))

    async def create_schedule(self, request: web.Request) -> web.Response:
        data = await read_json(request)
        if "name" not in data:
            raise ValidationError("a schedule needs a name", field="name")
        name = data.pop("name")
        s = cron.check_schedule(name, data)
        now = self.store.clock()
        await self.store.save_schedule(s, create=True, last_tick=now, next_at=self._next_at(s, now))
        log.info("schedule %s made: %r (%s), overlap %s", s.name, s.cron, s.tz, s.overlap)
        self.cron.poke()
        (info,) = await self.store.schedules(s.name)
        return ok(self._schedule_view(info, 1), 201)

    async def patch_schedule(self, request: web.Request) -> web.Response:
        name = cron.check_name(request.match_info["name"])
        data = await read_json(request)
        return await self._change_schedule(name, data)

    async def _change_schedule(self, name: str, data: dict[str, Any]) -> web.Response:
        (old,) = await self.store.schedules(name)
        s = cron.check_schedule(name, data, partial=old.schedule)
        now = self.store.clock()
        # A new expression, zone or a resume counts its ticks from now: none of the old one's, none of a pause's.
        fresh = (s.cron, s.tz) != (old.schedule.cron, old.schedule.tz) or (old.schedule.paused and not s.paused)
        last = now if fresh else None
        await self.store.save_schedule(s, create=False, last_tick=last,
                                       next_at=self._next_at(s, now if fresh else max(old.last_tick, now - s.catchup)))
        log.info("schedule %s changed: %r (%s), overlap %s%s", s.name, s.cron, s.tz, s.overlap,
                 ", paused" if s.paused else "")
        self.cron.poke()
        (info,) = await self.store.schedules(name)
        return ok(self._schedule_view(info, 1))

    async def pause_schedule(self, request: web.Request) -> web.Response:
        return await self._change_schedule(cron.check_name(request.match_info["name"]), {"paused": True})

    async def resume_schedule(self, request: web.Request) -> web.Response:
        return await self._change_schedule(cron.check_name(request.match_info["name"]), {"paused": False})

    async def delete_schedule(self, request: web.Request) -> web.Response:
        name = cron.check_name(request.match_info["name"])
        if not await self.store.delete_schedule(name):
            raise NotFound(f"no schedule {name!r}", field="name")
        log.info("schedule %s deleted", name)
        self.cron.poke()
        return ok({"name": name, "deleted": True})

    async def trigger_schedule(self, request: web.Request) -> web.Response:
        """Run a schedule's job now, once, beside its ticks (paused or not; no overlap policy: it was asked)."""
        name = cron.check_name(request.match_info["name"])
        (info,) = await self.store.schedules(name)
        now = self.store.clock()
        job = await self.cron.submit(name, dict(info.schedule.job), now, now, manual=True)
        log.info("schedule %s triggered by hand: job %d", name, job.id)
        return ok(wire.job_summary(job), 201)

    async def wait(self, request: web.Request) -> web.StreamResponse:
        job_id = job_id_of(request)
        timeout = query_num(request, "timeout", 0, 3600, self.long_poll)
        job = self.view(await self._ended(request, job_id, time.monotonic() + timeout))
        return await self.synced_answer(request, job)

    async def synced_answer(self, request: web.Request, job: dict[str, Any], status: int = 200) -> web.StreamResponse:
        """A waiter's answer, given once what it tells is on disk: woken at the commit of a job's end, maybe
        before that commit's fsync, a waiter is told only once it is durable (storage.synchronous FULL), and so
        is the submit of a submit that waited. A small answer is encoded while the fsync runs."""
        if _small(job):
            resp = ok(job, status)
            await self.store.synced()
            return resp
        await self.store.synced()
        return await self.answer(request, job, status)

    async def _ended(self, request: web.Request, job_id: int, deadline: float) -> JobRecord:
        """The job once it has ended, or as it is at ``deadline`` (or when the caller hung up)."""
        while True:
            ev = self.hub.job_event(job_id)
            state, _ = await self.store.job_state(job_id)
            left = deadline - time.monotonic()
            if state.terminal or left <= 0:
                break
            if not await wait_any([ev], min(left, self.long_poll)):
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the waiter hung up: do not hold its long-poll slot for the rest of its timeout
        return await self.store.get_job(job_id)

    async def wait_many(self, request: web.Request) -> web.Response:
        """Hold until one of the jobs named has ended (or ``timeout`` passes); answer with every one of them
        that has ended by then. One long-poll for a CLI waiting on many jobs (orch submit --wait)."""
        data = await read_json(request)
        only(data, {"ids", "timeout"})
        ids = data.get("ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_BATCH:
            raise ValidationError(f"ids must be a list of 1 to {MAX_BATCH} job ids", field="ids")
        for i in range(len(ids)):
            ids[i] = _job_id_item(ids[i], i)
        # Held at most scheduler.long_poll_timeout, as every long-poll (the CLI asks again).
        timeout = min(num_field(data, "timeout", 0, 3600, self.long_poll), self.long_poll)
        deadline = time.monotonic() + timeout
        while True:
            # Register before reading: an end committed after the read still wakes us.
            waiter = self.hub.jobs_waiter(ids)
            try:
                ended, missing = await self.store.ended_among(ids)
                if missing:
                    raise NotFound(f"no job {missing[0]}", field=f"ids[{ids.index(missing[0])}]")
                left = min(deadline - time.monotonic(), self.long_poll)
                if ended or left <= 0:
                    break
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), left)
                if not waiter.done():
                    transport = request.transport
                    if transport is None or transport.is_closing() or time.monotonic() >= deadline:
                        ended = []
                        break
            finally:
                self.hub.release_jobs(waiter, ids)
        if ended:
            await self.store.synced()  # as for wait: an end is told once it is on disk
        return ok({"ended": [wire.job_summary(j) for j in ended], "waiting": len(set(ids)) - len(ended)})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The job's state changes after event ``after``; ``follow=1`` streams them as NDJSON until the job ends."""
        job_id = job_id_of(request)
        after = query_int(request, "after", 0, 2**62, 0)
        follow = request.query.get("follow", "0") not in ("0", "", "false", "no")
        await self.store.job_state(job_id)  # 404 before anything else
        if not follow:
            return ok({"events": [wire.event_json(e) for e in await self.store.events(job_id, after)]})
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            while True:
                ev = self.hub.job_event(job_id)
                state, _ = await self.store.job_state(job_id)  # before the events: a change cannot slip between
                events = await self.store.events(job_id, after)
                if events:
                    if any(e.to_state.terminal for e in events):
                        await self.store.synced()  # as for wait: an end is told once it is on disk
                    after = events[-1].id
                    await resp.write(("\n".join(dumps(wire.event_json(e)) for e in events) + "\n").encode())
                if state.terminal:
                    await self.store.synced()
                    await resp.write((dumps({"end": True, "job_id": job_id, "state": state.value}) + "\n").encode())
                    break
                if not events and not await wait_any([ev], self.long_poll):
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        return resp  # the follower hung up (write_eof would raise on the closed transport)
            await resp.write_eof()
        except ConnectionResetError:  # the follower hung up mid-write: the end of the stream, not an error
            pass
        return resp

    async def output(self, request: web.Request) -> web.StreamResponse:
        job_id = job_id_of(request)
        follow = request.query.get("follow", "0") not in ("0", "", "false", "no")
        if not follow:
            job = self.view(await self.store.get_job(job_id))
            res = job["result"] or {}
            return await self.answer(request, {"job_id": job_id, "attempt": job["attempt"], "state": job["state"],
                                      "stdout": res.get("stdout", ""), "stderr": res.get("stderr", ""),
                                      "stdout_truncated": res.get("stdout_truncated", False),
                                      "stderr_truncated": res.get("stderr_truncated", False)})
        await self.store.job_state(job_id)  # 404 before the stream starts
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        after = 0
        # Where each attempt's stream has been shown up to, and its last character: a chunk that starts
        # further on (the worker dropped output, or the store trimmed it before we read it) gets a
        # marker first, so what is shown is never silently short (orch/output.py).
        shown: dict[tuple[int, str], int] = {}
        last: dict[tuple[int, str], str] = {}

        def hole(attempt: int, stream: str, nbytes: int) -> str:
            text = output_marker(stream, nbytes, last.get((attempt, stream), ""))
            last[(attempt, stream)] = "\n"
            return dumps({"attempt": attempt, "stream": stream, "data": text, "skipped": nbytes})

        while True:
            ev = self.hub.job_event(job_id)
            state, _ = await self.store.job_state(job_id)  # read before the chunks: see module doc
            chunks = await self.store.output_after(job_id, after)
            if chunks:
                lines = []
                for c in chunks:
                    after = c.id
                    key = (c.attempt, c.stream)
                    at = shown.get(key, 0)
                    if c.pos > at:
                        lines.append(hole(c.attempt, c.stream, c.pos - at))
                    lines.append(dumps({"attempt": c.attempt, "stream": c.stream, "data": c.data}))
                    shown[key] = max(at, c.pos + c.size)
                    last[key] = c.data[-1:]
                await resp.write(("\n".join(lines) + "\n").encode())
            if state.terminal:
                await self.store.synced()  # as for wait: an end is told once it is on disk
                rec = await self.store.get_job(job_id, with_output=False)
                # What each attempt wrote beyond the last chunk shown (dropped at its very end).
                tails = [hole(a.attempt, stream, total - shown.get((a.attempt, stream), 0))
                         for a in rec.attempts for stream, total in (("stdout", a.stdout_bytes), ("stderr", a.stderr_bytes))
                         if total > shown.get((a.attempt, stream), 0)]
                j = rec.job
                end = {"end": True, "state": j.state.value, "attempt": j.attempt, "exit_code": j.exit_code,
                       "error": j.error}
                await resp.write(("\n".join([*tails, dumps(end)]) + "\n").encode())
                break
            if not chunks and not await wait_any([ev], self.long_poll):
                transport = request.transport
                if transport is None or transport.is_closing():
                    return resp  # the follower hung up: stop polling (and free its long-poll slot)
        await resp.write_eof()
        return resp

    # ---- workers

    async def register(self, request: web.Request) -> web.Response:
        data = await read_json(request)
        only(data, {"name", "hostname", "queues", "concurrency", "metrics", "runners"})
        name = opt_str(data, "name", 200) or "worker"
        hostname = opt_str(data, "hostname", 255) or "unknown"
        for field, text in (("name", name), ("hostname", hostname)):
            if CONTROL_RE.search(text):  # anyone with the join token could plant escape sequences in `orch workers`
                raise ValidationError(f"{field} must hold no control or format characters (such as ESC, a newline "
                                      "or U+202E)", field=field)
        queues = queues_of(data)
        concurrency = int_field(data, "concurrency", 1, 10_000, 1)
        metrics = metrics_address(data, "metrics")
        runners = runners_of(data)
        credential, digest = new_worker_credential()  # the worker's own token; only its digest is kept
        worker_id = await self.store.register_worker(name=name, hostname=hostname, queues=queues,
                                                     concurrency=concurrency, credential_hash=digest,
                                                     metrics=metrics, runners=runners)
        self.worker_runners[worker_id] = frozenset(runners)
        self.hub.touched()  # the dashboard's workers
        if self.guard is not None:
            self.guard.worker_registered(worker_id, digest, queues)
        log.info("worker %s registered (%s on %s, queues %s, concurrency %d, runners %s%s)", worker_id, name,
                 hostname, ",".join(queues), concurrency, ",".join(runners), f", metrics {metrics}" if metrics else "")
        return ok({
            "worker_id": worker_id,
            "heartbeat_interval": self.settings["scheduler.heartbeat_interval"],
            "lease_ttl": self.lease_ttl,
            "long_poll_timeout": self.long_poll,
            # What one request may carry, and how much output per stream is kept: the worker keeps no more
            # unsent output than that and makes every report fit the limit.
            "max_body_bytes": self.settings["scheduler.max_body_bytes"],
            "output_limit_bytes": self.settings["scheduler.output_limit_bytes"],
            "max_result_bytes": self.max_result,  # of the value a job writes to $ORCH_RESULT_PATH
            "credential": credential,
        }, 201)

    async def list_workers(self, request: web.Request) -> web.Response:
        show_all = request.query.get("all", "0") not in ("0", "", "false", "no")
        retention = None if show_all else self.settings["scheduler.worker_retention"]
        workers = await self.store.list_workers(retention)
        now = self.store.clock()
        return ok({"workers": [wire.worker_json(w, now) for w in workers]})

    async def ui_link(self, request: web.Request) -> web.Response:
        """A one-time sign-in link for the dashboard (orch ui): signed like a session, good for LINK_TTL."""
        await optional_json(request)
        if self.guard is None or not self.settings["ui.enabled"]:
            raise NotFound("the dashboard is off here (ui.enabled: false)", field="ui.enabled")
        code = self.guard.sessions.link(ui_session.ADMIN)
        if code is None:
            raise Conflict("the scheduler has no client token yet: no link can be signed")
        return ok({"path": "/ui/link?" + urlencode({"code": code}), "expires_in": ui_session.LINK_TTL}, 201)

    async def set_worker(self, request: web.Request) -> web.Response:
        """Drain a worker (the dashboard's button): no claim hands it work from the commit on, its lease long-poll
        here ends, and its next heartbeat tells it to drain as on SIGTERM."""
        wid = request.match_info["worker_id"]
        if not NAME_RE.fullmatch(wid):
            raise NotFound("no such worker", field="worker_id")
        data = await read_json(request)
        only(data, {"draining"})
        if data.get("draining") is not True:
            raise ValidationError("draining must be true (a drained worker stops; start it again to undo)",
                                  field="draining")
        changed = await self.store.drain_worker(wid)
        if changed:
            log.info("worker %s asked to drain", wid)
            self.hub.stopping.add(wid)
            self.hub.wake_worker(wid)
            self.hub.touched()
        now = self.store.clock()
        (worker,) = [w for w in await self.store.list_workers() if w.id == wid]
        return ok(wire.worker_json(worker, now))

    async def metrics_targets(self, request: web.Request) -> web.Response:
        """Prometheus HTTP service discovery: the scheduler's metrics listener and each live worker's.

        Labels tell them apart: ``role``, and a worker's id and name as ``worker`` and ``name``
        (the labels of the scheduler's own per-worker gauges).
        """
        groups: list[dict[str, Any]] = []
        if self.metrics_listener is not None:
            host, port = self.metrics_listener
            if host in _ANY_ADDRESS:  # it listens everywhere: on the host Prometheus reached the API by
                host = request.url.host or "127.0.0.1"
            groups.append({"targets": [host_port(host, port)], "labels": {"role": "scheduler"}})
        for w in await self.store.metrics_targets():
            url = urlsplit(w.url)
            labels = {"role": "worker", "worker": w.worker_id, "name": w.name}
            if url.scheme != "http":
                labels["__scheme__"] = url.scheme
            if url.path != "/metrics":
                labels["__metrics_path__"] = url.path
            groups.append({"targets": [url.netloc], "labels": labels})
        return ok(groups)

    def _worker_id(self, request: web.Request) -> str:
        wid = request.match_info["worker_id"]
        if not NAME_RE.fullmatch(wid):
            raise NotFound("no such worker", field="worker_id")
        return wid

    async def heartbeat(self, request: web.Request) -> web.Response:
        wid = self._worker_id(request)
        data = await read_json(request)
        only(data, {"running", "draining"})
        running = attempt_refs(data.get("running", []), "running")
        draining = data.get("draining", False)
        if not isinstance(draining, bool):
            raise ValidationError("draining must be true or false", field="draining")
        reply = await self.store.heartbeat(wid, running, self.lease_ttl, draining)
        if reply.stale:
            self.metrics.stale.labels("heartbeat").inc(len(reply.stale))
        if draining:
            self.hub.wake_worker(wid)
        body: dict[str, Any] = {"cancel": wire.refs_json(reply.cancel), "stale": wire.refs_json(reply.stale)}
        if reply.drain:
            body["drain"] = True
        return ok(body)

    async def _claim(self, request: web.Request, wid: str, queues: list[str], limit: int) -> list[Lease]:
        """Claim for a worker whose request is still open."""
        transport = request.transport
        if transport is None or transport.is_closing():
            return []  # the worker hung up: claim nothing for it
        jobs, _ = await self.store.claim(wid, queues, limit, self.lease_ttl)
        return await self._deliverable(request, wid, jobs)

    async def _deliverable(self, request: web.Request, wid: str, jobs: list[Lease]) -> list[Lease]:
        """What a worker that hung up while we claimed cannot receive goes straight back."""
        transport = request.transport
        if jobs and (transport is None or transport.is_closing()):
            await self.store.hand_back(wid, [(j.job_id, j.attempt) for j in jobs], stop=False)
            return []
        return jobs

    async def _runners_of(self, worker_id: str) -> frozenset[str]:
        """The runners a worker registered with (kept here; read from the store for one another replica
        registered)."""
        got = self.worker_runners.get(worker_id)
        if got is None:
            for w in await self.store.list_workers():
                self.worker_runners[w.id] = frozenset(w.runners)
            got = self.worker_runners.setdefault(worker_id, frozenset({EXEC}))
        return got

    async def lease(self, request: web.Request) -> web.Response:
        wid = self._worker_id(request)
        data = await read_json(request)
        only(data, {"max", "queues", "wait"})
        limit = int_field(data, "max", 1, 1000, 1)
        wait = num_field(data, "wait", 0, self.long_poll, 0)
        queues = queues_of(data)
        if self.guard is not None:
            self.guard.check_queues(wid, queues)
        deadline = time.monotonic() + wait
        self.hub.stopping.discard(wid)
        woken_for: str | None = None  # a queue whose wake we owe a claim (or must pass on)
        try:
            while True:
                # Register before claiming: a job queued after the claim looked still wakes us.
                waiter = self.hub.work_waiter(queues, wid, await self._runners_of(wid))
                try:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        return ok({"jobs": []})  # the worker hung up: claim nothing for it
                    jobs = await self._claim(request, wid, queues, limit)
                    woken_for = None
                    left = deadline - time.monotonic()
                    if jobs or left <= 0 or wid in self.hub.stopping or transport.is_closing():
                        return raw_json('{"jobs":' + leases_json(jobs) + "}")
                    with suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(waiter), left)
                    if waiter.done():
                        woken_for = waiter.result()
                    if wid in self.hub.stopping or not waiter.done():
                        return ok({"jobs": []})
                finally:
                    self.hub.release(waiter, queues, wid)
        finally:
            self.hub.stopping.discard(wid)
            if woken_for is not None:
                # Woken for a job we are not going to claim: the next waiter gets the wake.
                self.hub.wake_queue(woken_for, 1)

    async def append_output(self, request: web.Request) -> web.Response:
        wid = self._worker_id(request)
        data = await read_json(request)
        only(data, {"chunks"})
        items = data.get("chunks")
        if not isinstance(items, list) or len(items) > MAX_BATCH:
            raise ValidationError(f"chunks must be a list of at most {MAX_BATCH} chunks", field="chunks")
        chunks = [chunk_of(c, f"chunks[{i}].") for i, c in enumerate(items)]
        accepted = await self.store.append_output(wid, chunks)
        if not all(accepted):
            self.metrics.stale.labels("output").inc(accepted.count(False))
        for c, a in zip(chunks, accepted, strict=True):
            if a:
                self.hub.job_touched(c.job_id)
        return ok({"accepted": accepted})

    async def complete(self, request: web.Request) -> web.Response:
        """Attempts' ends; with ``lease``, also up to ``lease.max`` new jobs at once (no waiting), in one commit."""
        wid = self._worker_id(request)
        data = await read_json(request)
        only(data, {"results", "lease"})
        items = data.get("results")
        if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
            raise ValidationError(f"results must be a list of 1 to {MAX_BATCH} results", field="results")
        results = [result_of(r, f"results[{i}].", self.max_result) for i, r in enumerate(items)]
        ask = data.get("lease")
        if "lease" not in data:
            answers, _ = await self.store.complete(wid, results, self.defaults)
            self._count_stale(answers)
            return ok({"results": [wire.verdict_json(v) for v in answers]})
        if not isinstance(ask, dict):
            raise ValidationError("lease must be an object with max and queues", field="lease")
        only(ask, {"max", "queues"}, "lease.")
        limit = int_field(ask, "max", 1, 1000, 1, prefix="lease.")
        queues = queues_of(ask, "lease.")
        if self.guard is not None:  # before anything is written: a refused request changes nothing
            self.guard.check_queues(wid, queues, "lease.")
        answers, jobs = await self.store.complete_and_claim(wid, results, self.defaults, queues, limit,
                                                            self.lease_ttl)
        jobs = await self._deliverable(request, wid, jobs)
        self._count_stale(answers)
        return raw_json('{"results":' + dumps([wire.verdict_json(v) for v in answers]) + ',"jobs":'
                        + leases_json(jobs) + "}")

    def _count_stale(self, answers: list[Verdict]) -> None:
        refused = sum(1 for a in answers if a.state is None)
        if refused:
            self.metrics.stale.labels("completion").inc(refused)

    async def complete_one(self, request: web.Request) -> web.Response:
        """One attempt's completion; a stale attempt gets 409."""
        wid = self._worker_id(request)
        data = await read_json(request)
        if "job_id" in data:  # result_of allows it, but here the path names the job
            raise ValidationError("unknown field 'job_id' (the path names the job)", field="job_id")
        data["job_id"] = job_id_of(request)
        result = result_of(data, "", self.max_result)
        answers, _ = await self.store.complete(wid, [result], self.defaults)
        self._count_stale(answers)
        if answers[0].state is None:
            raise StaleAttempt(f"attempt {result.attempt} of job {result.job_id} is not current", field="attempt")
        return ok(wire.verdict_json(answers[0]))

    async def hand_back(self, request: web.Request) -> web.Response:
        wid = self._worker_id(request)
        data = await read_json(request)
        only(data, {"attempts", "stop"})
        attempts = attempt_refs(data.get("attempts", []), "attempts")
        stop = data.get("stop", False)
        if not isinstance(stop, bool):
            raise ValidationError("stop must be true or false", field="stop")
        changes = await self.store.hand_back(wid, attempts, stop)
        if stop:
            self.hub.touched()  # the dashboard's workers
            if self.guard is not None:
                self.guard.worker_gone(wid)
            log.info("worker %s stopped (%d attempts handed back)", wid, len(changes))
        return ok({"handed_back": [{"job_id": c.job_id, "attempt": c.attempt} for c in changes]})


API = web.AppKey("api", Api)


def _change_line(c: Change) -> tuple[str, dict[str, Any]]:
    """The info line of a job state change: job, attempt, state, queue, worker, outcome, times (never the spec)."""
    if c.unheld:
        return (f"job {c.job_id} let go: its concurrency key has a free slot (queue {c.queue})",
                {"job_id": c.job_id, "attempt": c.attempt, "state": c.state, "queue": c.queue, "unheld": True})
    text = f"job {c.job_id} attempt {c.attempt} -> {c.state} (queue {c.queue}, worker {c.worker or '-'}"
    fields: dict[str, Any] = {"job_id": c.job_id, "attempt": c.attempt, "state": c.state, "queue": c.queue,
                              "worker": c.worker}
    if c.outcome is not None:
        text += f", {c.outcome}"
        fields["outcome"] = c.outcome
    if c.duration is not None:
        text += f", ran {c.duration:.3f}s"
        fields["duration"] = round(c.duration, 6)
    if c.queue_wait is not None:
        text += f", waited {c.queue_wait:.3f}s"
        fields["queue_wait"] = round(c.queue_wait, 6)
    return text + ")", fields


# --------------------------------------------------------------------------- the reaper


class ReaperFailures:
    """The reaper's failed passes: told at most once a minute per kind of failure, and when passes work again.

    The reaper runs every second or faster: a failure that lasts (a full disk) must not write a line, let
    alone a traceback, on every pass. What is told is kept across recoveries, so a failure that comes and
    goes is told no more often.
    """

    EVERY = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.told: dict[str, tuple[float, int]] = {}  # kind -> (when last told, failed passes not told since)
        self.streak = 0  # failed passes in a row
        self.since = 0.0
        self.streak_told = False

    def failed(self, e: BaseException) -> None:
        """Call from the ``except`` that caught ``e`` (a bug's traceback is logged, the first time)."""
        now = self.clock()
        kind = e.code if isinstance(e, OrchError) else type(e).__name__
        text = e.message if isinstance(e, OrchError) else f"{kind}: {e}"
        if self.streak == 0:
            self.since = now
        self.streak += 1
        told = self.told.get(kind)
        if told is not None and now - told[0] < self.EVERY:
            self.told[kind] = (told[0], told[1] + 1)
            return
        self.told[kind] = (now, 0)
        self.streak_told = True
        if told is None and not isinstance(e, OrchError):  # not meant to happen: show where, once
            log.exception("reaper pass failed (told at most once a minute while it lasts)")
        elif told is None:
            log.error("reaper pass failed: %s (told at most once a minute while it lasts)", text)
        else:
            log.error("reaper pass failed: %s (and %d more times since told %.0fs ago)", text, told[1],
                      now - told[0])

    def passed(self) -> None:
        if self.streak and self.streak_told:
            log.warning("reaper passes work again, after %d failed over %.1fs", self.streak,
                        self.clock() - self.since)
        self.streak = 0
        self.streak_told = False


async def reaper(store: Store, hub: Hub, api: Api, settings: Settings, holder: str) -> None:
    """Mark silent workers lost, expire leases, queue due retries; notice our own stalls.

    With a shared database only the scheduler that holds the reaper's role (``store.lead``, a lease of
    scheduler.lease_ttl) sweeps; the others keep trying to take it, so one takes over within that long
    after the leader dies or stalls. A stall of one of several schedulers extends no lease: the others
    were listening. A scheduler that takes a role left vacant for a while (the whole cluster was down)
    gives every lease the recovery grace, as a lone scheduler does at start.
    """
    ttl = settings["scheduler.lease_ttl"]
    tick = max(0.05, min(1.0, settings["scheduler.heartbeat_interval"] / 2))
    grace = settings["scheduler.recovery_grace"]
    defaults = settings.retry_policy
    stall = tick + max(2.0, ttl / 2)  # a gap between two looks at the clock longer than this was a stall
    last = time.monotonic()
    failures = ReaperFailures()
    owe_grace = False  # leases are to be extended before the next sweep
    leading = False
    looked_again = False
    while True:
        now = time.monotonic()
        if now - last > stall:
            # We were not running (SIGSTOP, a long pause): nobody could heartbeat to us.
            if store.shared:
                log.warning("scheduler stalled for %.1fs; the other schedulers of the database kept serving",
                            now - last)
            else:
                log.warning("scheduler stalled for %.1fs; extending leases by %.1fs", now - last, grace)
                owe_grace = True
        last = now
        sweep = None
        hub.sweeping()
        try:
            role = await store.lead(holder, ttl)
            took = role.held and not leading
            if role.held != leading:
                leading = api.leading = role.held
                api.metrics.leader.set(1 if leading else 0)
                if store.shared:
                    log.info("this scheduler %s the reaper%s", "runs" if leading else "no longer runs",
                             f" (it was vacant for {role.vacant_for:.1f}s)" if role.vacant_for is not None else "")
            # Nobody swept for a while (the role was vacant: the cluster was down, or this scheduler, alone, was
            # stalled past its own lease), so maybe nobody heard heartbeats either.
            if leading and store.shared and ((took and role.vacant_for is None)
                                             or (role.vacant_for is not None and role.vacant_for > ttl / 2)):
                owe_grace = True
            if leading:
                if owe_grace:
                    await store.recover(grace, ttl)
                    owe_grace = False
                if time.monotonic() - now > stall and not looked_again:
                    # Stalled since the look above (while the role was asked for): nobody could heartbeat meanwhile,
                    # and the role may have lapsed. The pass starts again, so the stall is seen as one before any
                    # lease is expired by it (once: a store that is slow every time still gets swept).
                    looked_again = True
                    continue
                looked_again = False
                sweep = await store.sweep(ttl, defaults)
        except Exception as e:
            failures.failed(e)
            # While the store could not write (a full disk), workers' heartbeats failed too: they get the
            # grace before the first sweep that works, as after a stall.
            owe_grace = owe_grace or isinstance(e, StorageError)
        else:
            failures.passed()
        until = store.clock() + tick
        if sweep is not None:
            for wid in sweep.lost_workers:
                hub.wake_worker(wid)  # its lease long-poll, if the connection still looks open, ends
                hub.touched()
                if api.guard is not None:
                    api.guard.worker_gone(wid)  # its credential now earns 409 unknown_worker
                api.metrics.lost_workers.inc()
                log.warning("worker %s lost: no heartbeat for %.1fs", wid, ttl)
            if sweep.next_due is not None:
                until = min(until, sweep.next_due)
        # A timer, not a poll: asleep until the next due retry or scheduled job (or the tick), and woken sooner by
        # one that comes due earlier (Hub.due: a commit here, or another scheduler's hint). What came due while
        # this pass swept counts too: the sweep may have read the earliest due time before its commit.
        wait = max(0.0, hub.armed(until) - store.clock())
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(hub.retry_scheduled.wait(), wait)


async def poll_shared(store: Store, hub: Hub, interval: float) -> None:
    """With a shared database, what other schedulers changed is heard as hints (LISTEN/NOTIFY); this poll backs
    them up, so a hint lost (or never sent: storage.notify off) costs at most ``interval`` of latency."""
    while True:
        await asyncio.sleep(interval)
        try:
            queues = hub.waited_queues()
            for q in await store.queued_in(queues) if queues else ():
                hub.wake_queue(q, 1)
            hub.poke_jobs()
        except Exception as e:  # the database is away: the next round tries again
            log.debug("poll of the shared database failed: %s", e)


async def watch_tokens(store: Store, guard: Guard, interval: float = 1.0) -> None:
    """The tokens in effect in the shared database, read once a second into the guard (a rotation on any
    machine); a request never waits on this query."""
    while True:
        await asyncio.sleep(interval)
        try:
            guard.take(await store.cluster_tokens())
        except Exception as e:  # the database is away: the tokens read last stay in effect
            log.debug("reading the shared tokens failed: %s", e)


def build_app(settings: Settings, store: Store) -> web.Application:
    """The scheduler on ``store`` (orch.compose picks the backend)."""
    # Passed to aiohttp's protocol, whatever runs the app: bodies are decoded by guard_request (security.decode_body)
    # with JSON errors, and requests its parser refuses are logged in one short line at most a minute.
    app = web.Application(middlewares=[api_middleware], client_max_size=settings["scheduler.max_body_bytes"],
                          handler_args={"auto_decompress": False, "logger": ProtocolLog(log)})
    hub = Hub()
    api = Api(store, hub, settings)
    api.cron = CronRunner(api)
    store.on_commit = api.committed  # wake-ups, metrics and state-change logs, once per committed batch
    app[STORE] = store
    app[HUB] = hub
    app[SETTINGS] = settings
    app[API] = api
    guard = api.guard = app[GUARD] = Guard(settings)
    if store.shared:
        guard.lookup = store.worker_credential
        store.on_remote = hub.heard  # another scheduler's commits: wake-ups only (it counts and logs its own)
    api.openapi = openapi_document(metrics_open=settings["auth.metrics_open"],
                                   long_poll=settings["scheduler.long_poll_timeout"],
                                   max_body=settings["scheduler.max_body_bytes"])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        guard.load()
        await store.open()
        if store.shared:  # the tokens every scheduler of the database accepts: ours, unless others came first
            await guard.share(store.put_tokens)
        api.metrics.known_queues(await store.queues())  # their series exist at 0 from the first scrape
        guard.load_workers(await store.worker_credentials())
        if not store.shared:  # shared: the scheduler that takes the reaper's role decides (see reaper)
            await store.recover(settings["scheduler.recovery_grace"], settings["scheduler.lease_ttl"])
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        task = asyncio.create_task(reaper(store, hub, api, settings, holder))
        polls = asyncio.create_task(poll_shared(store, hub, settings["storage.poll_interval"])) if store.shared else None
        tokens = asyncio.create_task(watch_tokens(store, guard)) if guard.shared else None
        keep = settings["retention.finished_jobs"]
        purging = asyncio.create_task(keep_purging(store, api, keep, settings["retention.interval"])) if keep else None
        ticking = asyncio.create_task(api.cron.run())
        yield
        for t in (task, polls, tokens, purging, ticking):
            if t is not None:
                t.cancel()
                with suppress(asyncio.CancelledError):
                    await t
        with suppress(Exception):
            await store.resign(holder)  # another scheduler takes the reaper at once
        await store.close()

    app.cleanup_ctx.append(lifecycle)
    for route in ROUTES:  # the one table (orch/scheduler/routes.py): router, document and gate read it
        handler = getattr(api, route.handler)
        if route.method == "GET":
            app.router.add_get(route.served_path, handler)  # and HEAD
        else:
            app.router.add_route(route.method, route.served_path, handler)
    if settings["ui.enabled"]:
        ui_views.setup(app, api)  # after the API's routes: a request of the API is matched before any page
    return app
