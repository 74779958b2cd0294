"""What tools pointed at the API check (schemathesis, a JSON Schema validator, Prometheus): the document and the
server agree, routes are not shadowed, error JSON has one shape and one encoding, bodies' encodings are honoured
or refused in JSON. In process, over loopback (aiohttp's test server)."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

import orch.config
from orch.config import load_settings
from orch.scheduler.app import build_app

CLIENT = "conformance-client-token"
JOIN = "conformance-join-token"

Body = Callable[[TestClient], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def serve(tmp_path: Path, body: Body, **overrides: Any) -> None:
    settings = load_settings(None, {"storage.data_dir": str(tmp_path), "auth.token": CLIENT, "auth.join_token": JOIN,
                                    "scheduler.long_poll_timeout": 0.2, **overrides}, environ={})

    async def main() -> None:
        async with TestClient(TestServer(build_app(settings), host="127.0.0.1"),
                              headers={"Authorization": f"Bearer {CLIENT}"}) as client:
            await asyncio.wait_for(body(client), 30)

    asyncio.run(main())


async def send(client: TestClient, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
               headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
               ) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
    async with client.request(method, path, data=data, headers=hdrs, params=params) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def error_of(status: int, raw: bytes, want: int, field: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert status == want, (status, raw[:300])
    body = json.loads(raw)
    assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"], body
    if field is not None:
        assert body["error"].get("field") == field, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# --------------------------------------------------------------------------- routes


def test_batch_route_is_not_shadowed_by_the_job_route(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, headers, raw = await send(client, "GET", "/v1/jobs/batch")
        error_of(status, raw, 405, code="method_not_allowed")
        assert headers["Allow"] == "POST"
        status, headers, raw = await send(client, "PUT", "/v1/jobs/batch")
        error_of(status, raw, 405)
        assert headers["Allow"] == "POST"
        status, _, raw = await send(client, "POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"]}]})
        assert status == 201, raw
        # Ids match only ids; a word where an id goes is a 404 that still names the field.
        for path in ("/v1/jobs/batch/cancel", "/v1/jobs/abc", "/v1/jobs/abc/wait", "/job/batch", "/job/1e3"):
            method = "POST" if path.endswith("/cancel") else "GET"
            status, _, raw = await send(client, method, path)
            error_of(status, raw, 404, field="id", code="not_found")
        status, _, raw = await send(client, "GET", "/job/1")
        assert status == 200, raw

    serve(tmp_path, body)


# --------------------------------------------------------------------------- one error encoding


def test_every_error_is_encoded_the_same_compact_way(tmp_path: Path) -> None:
    """orch's own errors and those mapped from aiohttp (404, 405, 413) and the 401: one encoder, one shape."""

    async def body(client: TestClient) -> None:
        answers = [
            await send(client, "POST", "/v1/jobs", {"colour": "red"}),  # orch's own 400
            await send(client, "GET", "/v1/nothing-here"),  # aiohttp's 404
            await send(client, "DELETE", "/v1/jobs"),  # aiohttp's 405
            await send(client, "POST", "/v1/jobs", {"command": ["echo", "x" * 5000]}),  # aiohttp's 413
            await send(client, "GET", "/v1/jobs", headers={"Authorization": "Bearer nope"}),  # the 401
        ]
        assert [status for status, _, _ in answers] == [400, 404, 405, 413, 401]
        for status, headers, raw in answers:
            assert headers["Content-Type"].startswith("application/json"), (status, headers)
            data = json.loads(raw)
            assert raw == json.dumps(data, separators=(",", ":")).encode(), (status, raw)
        assert answers[-1][1]["WWW-Authenticate"].startswith("Bearer")

    serve(tmp_path, body, **{"scheduler.max_body_bytes": 4096})


# --------------------------------------------------------------------------- bodies' encodings

SPEC = json.dumps({"command": ["true"], "name": "encoded"}).encode()


def test_gzip_and_deflate_bodies_are_decoded(tmp_path: Path) -> None:
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    bodies = {
        "gzip": gzip.compress(SPEC),
        "x-gzip": gzip.compress(SPEC),
        "deflate": zlib.compress(SPEC),
        "Deflate": raw_deflate.compress(SPEC) + raw_deflate.flush(),  # raw deflate, as some clients send it
        "identity": SPEC,
        "gzip, identity": gzip.compress(SPEC),
        "deflate, gzip": gzip.compress(zlib.compress(SPEC)),  # applied in the order listed: undone backwards
    }

    async def body(client: TestClient) -> None:
        for coding, data in bodies.items():
            status, _, raw = await send(client, "POST", "/v1/jobs", raw=data, headers={"Content-Encoding": coding})
            assert status == 201, (coding, raw)
            assert json.loads(raw)["name"] == "encoded"

    serve(tmp_path, body)


def test_unknown_or_undecodable_content_encodings_are_415_json(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        for coding in ("br", "x-foo", "zstd", "gzip, br", "compress"):
            status, headers, raw = await send(client, "POST", "/v1/jobs", raw=SPEC,
                                              headers={"Content-Encoding": coding})
            err = error_of(status, raw, 415, field="Content-Encoding", code="unsupported_encoding")
            assert "gzip" in err["message"] and "install" not in err["message"].lower(), err
        status, _, raw = await send(client, "GET", "/v1/jobs", params={"limit": "1000"})
        assert json.loads(raw)["jobs"] == [], "nothing was submitted"

    serve(tmp_path, body)


def test_corrupt_or_oversized_compressed_bodies_are_4xx_json(tmp_path: Path) -> None:
    bomb = gzip.compress(b"[" + b" " * 300_000 + b"]")  # small on the wire, larger than the limit once decoded

    async def body(client: TestClient) -> None:
        cases = [
            ("gzip", b"0123456789", 400),
            ("gzip", gzip.compress(SPEC)[:-12], 400),  # cut short
            ("gzip", gzip.compress(SPEC) + b"junk", 400),
            ("deflate", b"\x78\x9c" + b"\xff" * 20, 400),
            ("deflate", zlib.compress(SPEC) + b"junk", 400),
            ("gzip", bomb, 413),
        ]
        for coding, data, want in cases:
            status, _, raw = await send(client, "POST", "/v1/jobs", raw=data, headers={"Content-Encoding": coding})
            error_of(status, raw, want, field="body")
        status, _, raw = await send(client, "GET", "/v1/jobs", params={"limit": "1000"})
        assert json.loads(raw)["jobs"] == [], "nothing was submitted"

    serve(tmp_path, body, **{"scheduler.max_body_bytes": 64 * 1024})
