"""Async HTTP client of the scheduler's API, shared by the CLI, the worker and Python users."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Sequence

import aiohttp

from orch.errors import ApiError, ServerUnavailable


class Client:
    """One connection pool to one scheduler. Use as ``async with Client(url) as c:``."""

    def __init__(self, server: str, *, connect_timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                json_serialize=lambda o: json.dumps(o, separators=(",", ":")),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                      read_timeout: float | None = 60.0) -> Any:
        url = self.server + path
        try:
            async with self.session.request(
                method, url, json=body, params=params,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=read_timeout),
            ) as resp:
                raw = await resp.read()
                return _decode(resp.status, raw)
        except aiohttp.ClientConnectionError as e:
            raise ServerUnavailable(f"cannot reach the orch scheduler at {self.server}: {_why(e)}") from None
        except TimeoutError:
            raise ServerUnavailable(f"the orch scheduler at {self.server} did not answer in time") from None

    # ---- clients

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/healthz", read_timeout=10)

    async def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", "/v1/jobs", body=spec)

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

    async def wait(self, job_id: int | str, timeout: float = 30.0) -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}/wait", params={"timeout": timeout},
                                  read_timeout=timeout + 30)

    async def events(self, job_id: int | str) -> list[dict[str, Any]]:
        return (await self.request("GET", f"/v1/jobs/{job_id}/events"))["events"]

    async def output(self, job_id: int | str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}/output")

    async def follow(self, job_id: int | str) -> AsyncIterator[dict[str, Any]]:
        """Output chunks as they come (``{"attempt", "stream", "data"}``), then ``{"end": true, ...}``."""
        url = f"{self.server}/v1/jobs/{job_id}/output"
        try:
            async with self.session.get(
                url, params={"follow": "1"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=None),
            ) as resp:
                if resp.status >= 400:
                    _decode(resp.status, await resp.read())
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientConnectionError as e:
            raise ServerUnavailable(f"lost the orch scheduler at {self.server}: {_why(e)}") from None

    async def workers(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/workers"))["workers"]

    # ---- workers

    async def register(self, **info: Any) -> dict[str, Any]:
        return await self.request("POST", "/v1/workers", body=info)

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

    async def hand_back(self, worker_id: str, attempts: list[dict[str, int]], stop: bool) -> dict[str, Any]:
        return await self.request("POST", f"/v1/workers/{worker_id}/hand-back",
                                  body={"attempts": attempts, "stop": stop})


def _decode(status: int, raw: bytes) -> Any:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if status >= 400:
        err = (data or {}).get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            raise ApiError(status, err.get("code", "error"), err.get("message", ""), err.get("field"))
        raise ApiError(status, "http_error", f"HTTP {status}: {raw[:200].decode(errors='replace')}")
    return data


def _why(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if "Connect call failed" in text or "Connection refused" in text:
        return "connection refused (is it running?)"
    return text.splitlines()[0][:200]
