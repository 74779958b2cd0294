"""A reverse proxy for tests, run as its own process: forwards every request to an upstream scheduler, or
fails the way real proxies and servers fail, as told by a control file.

    python tests/proxy.py UPSTREAM_URL CONTROL_FILE STATS_FILE

The control file holds one word, read at every request: ``pass`` (forward; also when the file is missing or
empty), ``503`` (an HTML page, as nginx answers when its upstream is down), ``500`` (orch's own JSON error),
``429``, ``401`` (a JSON refusal: a revoked credential), ``reset`` (close the connection without an answer).
The stats file gets ``{mode: requests answered so}`` after every request. The proxy prints
``proxy listening on http://127.0.0.1:PORT`` once it listens (on a free port).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "host", "content-length"}


def main() -> None:
    upstream, control, stats_path = sys.argv[1].rstrip("/"), Path(sys.argv[2]), Path(sys.argv[3])
    counts: Counter[str] = Counter()
    session: ClientSession | None = None

    def mode() -> str:
        try:
            return control.read_text().strip() or "pass"
        except OSError:
            return "pass"

    def count(what: str) -> None:
        counts[what] += 1
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(counts))
        tmp.replace(stats_path)

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal session
        what = mode()
        count(what)
        if what == "503":
            return web.Response(status=503, content_type="text/html",
                                text="<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>")
        if what == "500":
            return web.json_response({"error": {"code": "internal", "message": "internal error"}}, status=500)
        if what == "429":
            return web.json_response({"error": {"code": "too_many_requests", "message": "slow down"}}, status=429)
        if what == "401":
            return web.json_response({"error": {"code": "unauthorized", "message": "unknown or revoked token"}},
                                     status=401)
        if what == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPBadRequest()  # never seen: the connection is gone
        if session is None:
            session = ClientSession(timeout=ClientTimeout(total=None, sock_read=None), auto_decompress=False)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=body,
                                   allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def serve() -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"proxy listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
