"""Async HTTP client of the scheduler's API, shared by the CLI, the worker and Python users."""

from __future__ import annotations

import asyncio
import json
import random
import ssl as ssl_module
from typing import Any, AsyncIterator, Sequence
from urllib.parse import quote

import aiohttp

from orch.core.errors import ApiError, ServerUnavailable
from orch.text import visible

WORKERS_PATH = "/v1/workers/"
NOT_THE_API = "not_the_api"  # the error code of orch's metrics listeners on any path but /metrics
TOO_MANY_TRIES = 60  # 429 answers (too many long-polls open) waited out before giving up


class Client:
    """One connection pool to one scheduler. Use as ``async with Client(url) as c:``.

    ``server`` may name several schedulers, comma-separated (replicas sharing a PostgreSQL database): a
    request that cannot reach the current one (or gets 503) fails as before, and the next request goes to
    the next one, so a caller that retries (the worker does) fails over.

    ``token``: the bearer token sent with every request (the client token, or a
    worker's join token). A worker's own credential, returned by ``register()``,
    is then sent instead on that worker's ``/v1/workers/{id}/...`` routes.
    ``ca``: a PEM file of the CA to trust for an https:// scheduler (default:
    the system's CAs); ``ssl``: a ready ``ssl.SSLContext`` instead.
    Certificates are always verified.
    """

    def __init__(self, server: str, *, token: str | None = None, ca: str | None = None,
                 ssl: ssl_module.SSLContext | None = None, connect_timeout: float = 10.0) -> None:
        self.servers = [s.strip().rstrip("/") for s in server.split(",") if s.strip()] or [server.rstrip("/")]
        self.server = random.choice(self.servers)  # several: each client starts at one, so they spread
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self.token = token or None
        self._credentials: dict[str, str] = {}  # worker id -> its own credential
        if ssl is None and ca:
            from orch.tls import client_context

            ssl = client_context(ca)
        self._ssl: ssl_module.SSLContext | bool = ssl if ssl is not None else True

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=False, ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                json_serialize=lambda o: json.dumps(o, separators=(",", ":")),
                headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
            )
        return self._session

    def _headers(self, path: str) -> dict[str, str] | None:
        """A worker's own credential on its own routes; otherwise the session's token."""
        if self._credentials and path.startswith(WORKERS_PATH):
            cred = self._credentials.get(path[len(WORKERS_PATH):].split("/", 1)[0])
            if cred:
                return {"Authorization": f"Bearer {cred}"}
        return None

    def _next_server(self) -> None:
        """The next request goes to the next scheduler of the list (one of them is enough)."""
        if len(self.servers) > 1:
            self.server = self.servers[(self.servers.index(self.server) + 1) % len(self.servers)]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                      read_timeout: float | None = 60.0, raw: bytes | None = None, patient: bool = False) -> Any:
        """One API call; ``raw``: a body already encoded as JSON (sent as it is). A 429 (too many long-polls
        open) is waited out: ``patient`` (a wait for a job's end) for as long as it takes, else a while."""
        url = self.server + path
        headers = self._headers(path)
        data = None
        if raw is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
            data, body = raw, None
        tries = 0
        while True:
            try:
                async with self.session.request(
                    method, url, json=body, data=data, params=params, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=read_timeout),
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except aiohttp.ClientConnectionError as e:
                where = self.server
                self._next_server()
                raise ServerUnavailable(f"cannot reach the orch scheduler at {where}: {_why(e, where)}") from None
            except TimeoutError:
                where = self.server
                self._next_server()
                raise ServerUnavailable(f"the orch scheduler at {where} did not answer in time") from None
            if status == 503:
                self._next_server()
            if status == 429 and (patient or tries < TOO_MANY_TRIES):
                tries += 1  # too many long-polls open: wait for one to end, then ask again
                await asyncio.sleep(_pause(tries))
                continue
            return _decode(status, raw)

    # ---- clients

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/healthz", read_timeout=10)

    async def submit(self, spec: dict[str, Any], wait: float = 0.0) -> dict[str, Any]:
        """Submit a job; with ``wait`` (seconds), the answer comes once it has ended or ``wait`` passed: the job
        as GET /v1/jobs/{id} shows it then (one request instead of a submit and a wait)."""
        if wait <= 0:
            return await self.request("POST", "/v1/jobs", body=spec)
        # A 429 (too many long-polls open) is answered before anything is submitted: asking again is safe.
        return await self.request("POST", "/v1/jobs", body=spec, params={"wait": wait}, read_timeout=wait + 30,
                                  patient=True)

    async def submit_many(self, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return (await self.request("POST", "/v1/jobs/batch", body={"jobs": list(specs)}))["jobs"]

    async def job(self, job_id: int | str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}")

    async def jobs(self, *, state: str | None = None, queue: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"state": state, "queue": queue, "limit": limit, "cursor": cursor}.items() if v is not None}
        return await self.request("GET", "/v1/jobs", params=params)

    async def cancel(self, job_id: int | str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/jobs/{job_id}/cancel")

    async def retry(self, job_id: int | str, by: str | None = None) -> dict[str, Any]:
        """Replay a failed or cancelled job (``by``: who asks, recorded in its event)."""
        return await self.request("POST", f"/v1/jobs/{job_id}/retry", body={"by": by} if by else None)

    async def retry_many(self, *, ids: Sequence[int] | None = None, state: str | None = None,
                         queue: str | None = None, by: str | None = None) -> dict[str, Any]:
        """Replay the jobs ``ids``, or every job in ``state`` (of ``queue``): ``{"replayed", "refused"}``."""
        body = {k: v for k, v in {"ids": list(ids) if ids is not None else None, "state": state, "queue": queue,
                                  "by": by}.items() if v is not None}
        return await self.request("POST", "/v1/jobs/retry", body=body, read_timeout=None)

    async def queues(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/queues"))["queues"]

    async def pause_queue(self, queue: str, paused: bool = True) -> dict[str, Any]:
        """Pause (or, ``paused`` False, resume) a queue: its answer, with ``changed``."""
        return await self.request("POST", f"/v1/queues/{quote(queue, safe='')}/{'pause' if paused else 'resume'}")

    async def set_queue(self, queue: str, concurrency: int | None) -> dict[str, Any]:
        """Set a queue's concurrency limit (None lifts it): its answer, with ``changed``."""
        return await self.request("PATCH", f"/v1/queues/{quote(queue, safe='')}", body={"concurrency": concurrency})

    async def purge(self, older_than: float, state: str | None = None) -> int:
        """Purge the jobs that ended more than ``older_than`` seconds ago (of ``state``): how many."""
        body: dict[str, Any] = {"older_than": older_than, **({"state": state} if state else {})}
        return int((await self.request("POST", "/v1/jobs/purge", body=body, read_timeout=None))["purged"])

    async def limits(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/limits"))["limits"]

    async def set_limit(self, name: str, rate: str, burst: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"rate": rate, **({"burst": burst} if burst is not None else {})}
        return await self.request("PUT", f"/v1/limits/{quote(name, safe='')}", body=body)

    async def delete_limit(self, name: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/limits/{quote(name, safe='')}")

    async def wait(self, job_id: int | str, timeout: float = 30.0) -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}/wait", params={"timeout": timeout},
                                  read_timeout=timeout + 30, patient=True)

    async def wait_many(self, job_ids: Sequence[int], timeout: float = 30.0) -> dict[str, Any]:
        """Hold until one of the jobs has ended, or ``timeout``: ``{"ended": [job summaries], "waiting": n}``
        with every one of them that has ended by then. One long-poll however many jobs."""
        return await self.request("POST", "/v1/jobs/wait", body={"ids": list(job_ids), "timeout": timeout},
                                  read_timeout=timeout + 30, patient=True)

    async def events(self, job_id: int | str, after: int = 0) -> list[dict[str, Any]]:
        params = {"after": after} if after else None
        return (await self.request("GET", f"/v1/jobs/{job_id}/events", params=params))["events"]

    async def follow_events(self, job_id: int | str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """State changes as they happen (``{"id", "attempt", "from", "to", "at", "reason", ...}``),
        then ``{"end": true, "state": ...}`` once the job has ended."""
        async for item in self._stream(f"/v1/jobs/{job_id}/events", {"follow": "1", "after": str(after)}):
            yield item

    async def schedules(self, next_n: int = 1) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/schedules", params={"next": str(next_n)}))["schedules"])

    async def schedule(self, name: str, next_n: int = 5) -> dict[str, Any]:
        return await self.request("GET", f"/v1/schedules/{quote(name, safe='')}", params={"next": str(next_n)})

    async def create_schedule(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", "/v1/schedules", body=body)

    async def change_schedule(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", f"/v1/schedules/{quote(name, safe='')}", body=body)

    async def schedule_action(self, name: str, action: str) -> dict[str, Any]:
        """POST /v1/schedules/NAME/ACTION: pause, resume or trigger."""
        return await self.request("POST", f"/v1/schedules/{quote(name, safe='')}/{action}")

    async def delete_schedule(self, name: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/schedules/{quote(name, safe='')}")

    async def workflow(self, job_id: int | str) -> dict[str, Any]:
        """The workflow job ``job_id`` is part of: ``{"id", "state", "counts", "jobs": [... "dependencies"]}``."""
        return await self.request("GET", f"/v1/workflows/{job_id}")

    async def why(self, job_id: int | str) -> dict[str, Any]:
        """Why the job is (not) running: ``{"reason": code, "message": text, ...}``."""
        return await self.request("GET", f"/v1/jobs/{job_id}/why")

    async def _stream(self, path: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """NDJSON lines of a streaming GET, decoded; a 429 (too many long-polls open) is waited out for as
        long as it takes."""
        tries = 0
        while True:
            tries += 1
            try:
                async with self.session.get(
                    self.server + path, params=params, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=None),
                ) as resp:
                    if resp.status != 429:
                        if resp.status >= 400:
                            _decode(resp.status, await resp.read())
                        async for item in _ndjson(resp.content):
                            yield item
                        return
                    await resp.read()
            except aiohttp.ClientConnectionError as e:
                raise ServerUnavailable(f"lost the orch scheduler at {self.server}: {_why(e, self.server)}") from None
            await asyncio.sleep(_pause(tries))

    async def output(self, job_id: int | str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}/output")

    async def follow(self, job_id: int | str) -> AsyncIterator[dict[str, Any]]:
        """Output chunks as they come (``{"attempt", "stream", "data"}``; a hole is a chunk whose data is a
        marker and that says how many bytes it stands for, ``skipped``), then ``{"end": true, ...}``."""
        async for item in self._stream(f"/v1/jobs/{job_id}/output", {"follow": "1"}):
            yield item

    async def workers(self, show_all: bool = False) -> list[dict[str, Any]]:
        """Live workers, and stopped or lost ones heard from within scheduler.worker_retention (``show_all``: all)."""
        return (await self.request("GET", "/v1/workers", params={"all": "1"} if show_all else None))["workers"]

    # ---- workers

    async def register(self, **info: Any) -> dict[str, Any]:
        """Register a worker with the join token; its own credential is used for its routes from now on."""
        reply = await self.request("POST", "/v1/workers", body=info)
        if isinstance(reply, dict) and reply.get("credential") and reply.get("worker_id"):
            self._credentials[str(reply["worker_id"])] = reply["credential"]
        return reply

    async def heartbeat(self, worker_id: str, running: list[dict[str, int]], draining: bool = False) -> dict[str, Any]:
        return await self.request("POST", f"/v1/workers/{worker_id}/heartbeat",
                                  body={"running": running, "draining": draining}, read_timeout=30)

    async def lease(self, worker_id: str, queues: Sequence[str], limit: int, wait: float) -> list[dict[str, Any]]:
        body = {"max": limit, "queues": list(queues), "wait": wait}
        return (await self.request("POST", f"/v1/workers/{worker_id}/lease", body=body,
                                   read_timeout=wait + 30))["jobs"]

    async def send_output(self, worker_id: str, chunks: list[dict[str, Any]]) -> list[bool]:
        return (await self.request("POST", f"/v1/workers/{worker_id}/output", body={"chunks": chunks}))["accepted"]

    async def complete(self, worker_id: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return (await self.request("POST", f"/v1/workers/{worker_id}/complete", body={"results": results}))["results"]

    async def complete_and_lease(self, worker_id: str, results: list[dict[str, Any]], queues: Sequence[str],
                                 limit: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Report attempts' ends and claim up to ``limit`` more jobs (no waiting) in one round trip."""
        body = {"results": results, "lease": {"max": limit, "queues": list(queues)}}
        reply = await self.request("POST", f"/v1/workers/{worker_id}/complete", body=body)
        return reply["results"], reply.get("jobs", [])

    async def post_worker(self, worker_id: str, route: str, body: bytes) -> Any:
        """POST a body the worker encoded itself (orch/worker/outbox.py) to one of its own routes."""
        return await self.request("POST", f"/v1/workers/{worker_id}/{route}", raw=body)

    async def hand_back(self, worker_id: str, attempts: list[dict[str, int]], stop: bool) -> dict[str, Any]:
        return await self.request("POST", f"/v1/workers/{worker_id}/hand-back",
                                  body={"attempts": attempts, "stop": stop})


def _pause(tries: int) -> float:
    """Seconds before asking again after the ``tries``-th 429: growing to about 2 s, spread out."""
    return min(2.0, 0.2 * tries) * random.uniform(0.5, 1.0)


MAX_LINE = 64 << 20  # bytes of one NDJSON line, at most (a line holds one output chunk, far less)


async def _ndjson(content: aiohttp.StreamReader) -> AsyncIterator[Any]:
    """The decoded lines of an NDJSON stream. aiohttp's own line reading refuses lines over 128 KiB,
    and one chunk of output with many characters to escape can make a longer one."""
    buf = bytearray()
    async for data in content.iter_any():
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end])
            start = end + 1
            if line.strip():
                yield json.loads(line)
        del buf[:start]
        if len(buf) > MAX_LINE:
            raise ServerUnavailable(f"a line of the scheduler's stream is longer than {MAX_LINE} bytes")
    if buf.strip():
        yield json.loads(bytes(buf))


def retryable(e: Exception) -> bool:
    """An error worth waiting out and trying again: the scheduler unreachable, slow, overloaded or failing
    (5xx, 429, 408), or something in between answering what orch would not (a proxy's error page)."""
    if isinstance(e, ServerUnavailable):
        return True
    if isinstance(e, ApiError):
        if e.http_status in (401, 403, 413):
            return False
        return e.http_status >= 500 or e.http_status in (408, 429) or e.code == "http_error"
    return False


def _decode(status: int, raw: bytes) -> Any:
    """An answer's JSON object; an error answer as ApiError; anything else as not orch at all.

    Every orch answer is a JSON object, errors as ``{"error": {...}}``. Something else answering (another
    server, orch's metrics port, a proxy's page) is ServerUnavailable: the scheduler is not at that address.
    """
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and err.get("code") == NOT_THE_API:
        raise ServerUnavailable(f"not an orch API: {visible(err.get('message') or '')}")
    if status >= 400 and isinstance(err, dict):
        raise ApiError(status, str(err.get("code", "error")), visible(err.get("message") or ""), err.get("field"))
    if not isinstance(data, dict):
        raise ServerUnavailable(f"not an orch API: the server answered HTTP {status} with "
                                f"{raw[:80].decode(errors='replace')!r}, not orch's JSON (is --server the address "
                                "of the scheduler's API?)")
    return data


def _why(e: Exception, server: str = "") -> str:
    text = str(e) or type(e).__name__
    if "Connect call failed" in text or "Connection refused" in text:
        return "connection refused (is it running?)"
    https = server.startswith("https://")
    if isinstance(e, aiohttp.ClientConnectorCertificateError) or "CERTIFICATE_VERIFY_FAILED" in text:
        cert_error = getattr(e, "certificate_error", None)
        detail = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None) or ""
        return (f"certificate verify failed{': ' + str(detail) if detail else ''} "
                "(trust the scheduler's CA with --ca FILE or tls.ca)")
    if https and (isinstance(e, aiohttp.ClientSSLError) or "WRONG_VERSION_NUMBER" in text
                  or "record layer failure" in text or "SSL" in text):
        return "TLS handshake failed: the scheduler does not seem to speak TLS here (use http://)"
    if not https and (isinstance(e, aiohttp.ServerDisconnectedError) or (
            isinstance(e, aiohttp.ClientOSError) and not isinstance(e, aiohttp.ClientConnectorError))):
        base = server.split("://", 1)[-1]
        return (f"the connection was closed without an answer; if the scheduler serves TLS, use https://{base} "
                "(and --ca FILE for a private CA)")
    return text.splitlines()[0][:200]
