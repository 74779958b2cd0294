"""Requests that break HTTP itself, sent over raw sockets to a real `orch scheduler`: each is refused with a 4xx
(JSON wherever a request got far enough to have a route), and the scheduler's log gets one short WARNING line
for all of them, never a traceback: anyone who can reach the port can send these, with no token."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import pytest

from helpers import client_token, http, start_scheduler, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.backend_specific]  # aiohttp's HTTP parser on raw sockets: not about storage


def exchange(port: int, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``parts`` on one connection, each after the first once the server has taken the request head
    (answered 100 Continue), and read the answer: its status, headers (lower-cased names) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        got = b""

        def more() -> None:
            nonlocal got
            data = s.recv(65536)
            assert data, f"the server closed the connection after {got!r}"
            got += data

        for i, part in enumerate(parts):
            if i:
                while b"100 Continue\r\n\r\n" not in got:
                    more()
                got = got.split(b"100 Continue\r\n\r\n", 1)[1]
            s.sendall(part)
        while b"\r\n\r\n" not in got:
            more()
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            more()
            body = got.partition(b"\r\n\r\n")[2]
        return int(lines[0].split()[1]), headers, body


def test_malformed_requests_are_4xx_and_log_one_short_line(tmp_path: Path, orch_env: dict[str, str]) -> None:
    # A short body deadline: aiohttp's C parser drops a body whose chunking breaks after the head was taken
    # without failing it, so such a request ends at the deadline (408) rather than at once (400).
    proc, url = start_scheduler(tmp_path, {**orch_env, "ORCH_SCHEDULER_BODY_TIMEOUT": "1"})
    try:
        port = int(url.rsplit(":", 1)[1])
        auth = f"Authorization: Bearer {client_token()}\r\n".encode()
        spec = b'{"command": ["true"]}'
        # What aiohttp's parser refuses before there is a request: no token needed to send these.
        parser_refused = {
            "no Host": b"GET /healthz HTTP/1.1\r\n\r\n",
            "bad chunk size": b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
            "Content-Length with Transfer-Encoding":
                b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
            "bad version": b"GET /healthz HTTP/9\r\nHost: x\r\n\r\n",
        }
        for name, raw in parser_refused.items():
            for _ in range(10):  # a flood: still one line in the log
                status, _, body = exchange(port, raw)
                assert status == 400, (name, body)
        # Requests with a route whose body breaks: orch's JSON error, naming the body.
        head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = exchange(port, head, b'5\r\n{"com\r\nzz\r\nx\r\n0\r\n\r\n')
        assert status in (400, 408) and headers["content-type"].startswith("application/json"), body
        assert json.loads(body)["error"]["field"] == "body"
        corrupt = b"\x1f\x8b\x08\x00" + b"\xff" * 16
        for coding, data, want in (("gzip", corrupt, 400), ("gzip", gzip.compress(spec)[:-9], 400),
                                   ("br", spec, 415), ("x-foo", spec, 415)):
            raw = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
                   b"Content-Encoding: " + coding.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            status, headers, body = exchange(port, raw)
            assert status == want and headers["content-type"].startswith("application/json"), (coding, body)
            error = json.loads(body)["error"]
            assert error["field"] == ("body" if want == 400 else "Content-Encoding"), error
        # The scheduler serves on, made no job, and its log says it all in one short line.
        assert http("GET", url + "/healthz")[0] == 200
        status, page = http("GET", url + "/v1/jobs")
        assert status == 200 and page["jobs"] == []
        lines = wait_until(lambda: [ln for ln in proc.log().splitlines() if "malformed HTTP request" in ln], 10,
                           "the log line about malformed requests")
        assert len(lines) == 1 and "WARNING" in lines[0] and len(lines[0]) < 250, lines
        log = proc.log()
        assert "Traceback" not in log and "ERROR" not in log, log
    finally:
        proc.stop()
