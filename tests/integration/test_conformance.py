"""What tools pointed at the API check (schemathesis, a JSON Schema validator, Prometheus): the document and the
server agree, routes are not shadowed, error JSON has one shape and one encoding, bodies' encodings are honoured
or refused in JSON. In process, over loopback (aiohttp's test server)."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable

import jsonschema
import pytest
from aiohttp.test_utils import TestClient, TestServer

import orch.config
from helpers import storage_overrides
from orch.compose import build_app
from orch.config import load_settings
from orch.core.spec import MAX_ARG_LEN
from orch.scheduler.routes import document

CLIENT = "conformance-client-token"
JOIN = "conformance-join-token"

Body = Callable[[TestClient], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config" / "config.yaml")


def serve(tmp_path: Path, body: Body, **overrides: Any) -> None:
    settings = load_settings(None, {**storage_overrides(), "storage.data_dir": str(tmp_path), "auth.token": CLIENT, "auth.join_token": JOIN,
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


# --------------------------------------------------------------------------- the document says what the server does

DOC = document(long_poll=0.2)
JSON_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def schema_says(instance: Any, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(instance, {**schema, "components": DOC["components"]})
    except jsonschema.ValidationError:
        return False
    return True


def query_value(raw: str, schema: dict[str, Any]) -> Any:
    """A query parameter's text as the value its schema types (a form-style parameter: 5 is "5")."""
    if schema.get("type") == "integer" and re.fullmatch(r"-?[0-9]+", raw):
        return int(raw)
    if schema.get("type") == "number" and JSON_NUMBER.fullmatch(raw):
        return float(raw)
    return raw


BIG = "x" * (MAX_ARG_LEN + 1)
# (body, the field the server names if it refuses it); every one is checked against the document too.
SPECS: list[tuple[dict[str, Any], str | None]] = [
    ({"command": ["true"], "priority": 1.0}, None),  # JSON Schema counts 1.0 as an integer
    ({"shell": "exit 0", "max_attempts": 2.0, "retry_on_exit": [1.0, 75]}, None),
    ({"task": "echo", "args": []}, None),
    ({"command": ["true"], "timeout": 1, "cwd": "/tmp", "name": "n", "labels": {"a": "b"}, "env": {"A": "1"}}, None),
    ({"task": "echo", "args": [], "command": ["true"]}, "command"),
    ({"command": ["true"], "shell": "true"}, "command"),
    ({"command": ["true"], "args": ["x"]}, "args"),
    ({"args": ["x"]}, "command"),
    ({"command": ["true"], "priority": 1.5}, "priority"),
    ({"command": ["true"], "max_attempts": 2.5}, "max_attempts"),
    ({"command": ["true"], "retry_on_exit": [1.5]}, "retry_on_exit"),
    ({"command": ["true"], "name": None}, "name"),
    ({"command": ["true"], "retry_on_exit": None}, "retry_on_exit"),
    ({"command": ["true"], "cwd": None}, "cwd"),
    ({"command": ["true"], "timeout": None}, "timeout"),
    ({"command": ["true"], "max_attempts": None}, "max_attempts"),
    ({"command": ["a\x00b"]}, "command[0]"),
    ({"command": ["true", "a\x00b"]}, "command[1]"),
    ({"task": "echo", "args": ["a\x00b"]}, "args[0]"),
    ({"shell": "   "}, "shell"),
    ({"shell": "\x1c\u3000"}, "shell"),  # whitespace to Python's str.strip(), which the server uses
    ({"shell": "a\x00"}, "shell"),
    ({"task": " \t"}, "task"),
    ({"task": BIG}, "task"),
    ({"command": ["true"], "cwd": "a\x00"}, "cwd"),
    ({"command": ["true"], "env": {"A": "a\x00"}}, "env.A"),
    ({"command": ["true"], "labels": {"a": "b\x00"}}, "labels.a"),
]


def test_job_specs_are_valid_to_the_document_exactly_when_the_server_takes_them(tmp_path: Path) -> None:
    schema = DOC["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    async def body(client: TestClient) -> None:
        wrong = []
        for spec, field in SPECS:
            valid = schema_says(spec, schema)
            status, _, raw = await send(client, "POST", "/v1/jobs", spec)
            if valid != (field is None) or (status == 201) != (field is None):
                wrong.append(f"{spec!r:.120}: document says {'valid' if valid else 'invalid'}, server {status}")
            elif field is not None:
                error_of(status, raw, 400, field=field)
        assert not wrong, "\n".join(wrong)
        status, _, raw = await send(client, "GET", "/v1/jobs", params={"limit": "1000"})
        stored = []
        for j in json.loads(raw)["jobs"]:  # listings carry no spec: each job does
            stored.append(json.loads((await send(client, "GET", f"/v1/jobs/{j['id']}"))[2])["spec"])
        assert {s["priority"] for s in stored} == {0, 1} and all(type(s["priority"]) is int for s in stored)
        assert all(type(s["max_attempts"]) is int for s in stored)

    serve(tmp_path, body)


def test_worker_bodies_are_valid_to_the_document_exactly_when_the_server_takes_them(tmp_path: Path) -> None:
    def schema(path: str) -> dict[str, Any]:
        return DOC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    async def body(client: TestClient) -> None:
        status, _, raw = await send(client, "POST", "/v1/jobs", {"command": ["true"]})
        job_id = json.loads(raw)["id"]
        join = {"Authorization": f"Bearer {JOIN}"}
        status, _, raw = await send(client, "POST", "/v1/workers", {"queues": ["default"]}, headers=join)
        reg = json.loads(raw)
        wid, mine = reg["worker_id"], {"Authorization": f"Bearer {reg['credential']}"}
        w = "/v1/workers/{worker_id}"
        one = f"{w}/jobs/{{job_id}}/complete"
        cases: list[tuple[str, dict[str, Any], str | None]] = [
            ("/v1/workers", {"concurrency": 2.0, "name": "n", "hostname": "h"}, None),
            ("/v1/workers", {"name": None}, "name"),
            ("/v1/workers", {"hostname": None}, "hostname"),
            ("/v1/workers", {"concurrency": 2.5}, "concurrency"),
            (f"{w}/heartbeat", {"running": [{"job_id": float(job_id), "attempt": 1.0}]}, None),
            (f"{w}/lease", {"max": 1.0, "wait": 0}, None),
            (f"{w}/lease", {"max": 1.5}, "max"),
            (f"{w}/complete", {"results": [{"job_id": job_id, "attempt": 1.0, "outcome": "failed", "exit_code": 3.0,
                                            "error": None, "duration": None}]}, None),
            (f"{w}/complete", {"results": [{"job_id": job_id, "attempt": 1, "outcome": "failed"}], "lease": None},
             "lease"),
            (f"{w}/complete", {"results": [{"job_id": job_id, "attempt": 1, "outcome": "failed", "exit_code": 0.5}]},
             "results[0].exit_code"),
            (one, {"attempt": 9, "outcome": "failed", "job_id": job_id + 1}, "job_id"),
            (f"{w}/hand-back", {"attempts": [{"job_id": job_id, "attempt": 2.0}], "stop": False}, None),
        ]
        wrong = []
        for template, payload, field in cases:
            valid = schema_says(payload, schema(template))
            path = template.replace("{worker_id}", wid).replace("{job_id}", str(job_id))
            status, _, raw = await send(client, "POST", path, payload, headers=join if path == "/v1/workers" else mine)
            if valid != (field is None) or (status < 300) != (field is None):
                wrong.append(f"{template} {payload!r:.100}: document says {'valid' if valid else 'invalid'}, "
                             f"server {status} {raw[:100]!r}")
            elif field is not None:
                error_of(status, raw, 400, field=field)
        assert not wrong, "\n".join(wrong)

    serve(tmp_path, body)


def test_query_parameters_are_valid_to_the_document_exactly_when_the_server_takes_them(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        status, _, raw = await send(client, "POST", "/v1/jobs", {"command": ["true"]})
        job_id = json.loads(raw)["id"]
        cases: list[tuple[str, str, str, bool]] = [
            ("/v1/jobs", "queue", "default", True),
            ("/v1/jobs", "queue", "", False),
            ("/v1/jobs", "state", "", False),
            ("/v1/jobs", "limit", "2", True),
            ("/v1/jobs", "limit", "", False),
            ("/v1/jobs", "limit", "1.5", False),
            ("/v1/jobs", "limit", " 2", False),
            ("/v1/jobs", "limit", "2_0", False),
            ("/v1/jobs", "cursor", "", False),
            ("/v1/jobs", "cursor", "12", True),
            ("/v1/jobs/{job_id}/events", "after", str(2**62), True),
            ("/v1/jobs/{job_id}/events", "after", str(2**62 + 1), False),
            ("/v1/jobs/{job_id}/events", "after", "1.5", False),
            ("/v1/jobs/{job_id}/events", "after", "", False),
            ("/v1/jobs/{job_id}/wait", "timeout", "0.05", True),
            ("/v1/jobs/{job_id}/wait", "timeout", "", False),
            ("/v1/jobs/{job_id}/wait", "timeout", "1_0", False),
            ("/v1/jobs/{job_id}/wait", "timeout", "nan", False),
            ("/v1/jobs/{job_id}/output", "follow", "", False),
        ]
        wrong = []
        for template, name, value, ok in cases:
            params = {p["name"]: p["schema"] for p in DOC["paths"][template]["get"]["parameters"] if p["in"] == "query"}
            valid = schema_says(query_value(value, params[name]), params[name])
            status, _, raw = await send(client, "GET", template.replace("{job_id}", str(job_id)), params={name: value})
            if valid != ok or (status == 200) != ok:
                wrong.append(f"{template}?{name}={value!r}: document says {'valid' if valid else 'invalid'}, "
                             f"server {status} {raw[:120]!r}")
            elif not ok:
                error = error_of(status, raw, 400, field=name)
                assert "e+" not in error["message"], error  # bounds are said as integers, not 4.61169e+18
        assert not wrong, "\n".join(wrong)

    serve(tmp_path, body)
