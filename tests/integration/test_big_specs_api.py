"""Large valid specs and long outputs cannot blow up the scheduler: a spec size limit, bounded listings that read
an index, and big bodies parsed and encoded in slices that let the loop serve others (in process, on loopback)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from test_api import call, register, serve, submit

import orch.scheduler.bodies as bodies
from helpers import until
from orch.scheduler.app import HUB, STORE


def test_a_spec_over_max_spec_bytes_is_413_naming_its_largest_field(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        big = {"command": ["true"], "env": {"BLOB": "x" * 5000}}
        status, err = await call(client, "POST", "/v1/jobs", big)
        assert status == 413 and err["error"]["code"] == "too_large" and err["error"]["field"] == "env", err
        assert "max_spec_bytes" in err["error"]["message"]
        # In a batch the field says which job; nothing of the batch is stored.
        status, err = await call(client, "POST", "/v1/jobs/batch",
                                 {"jobs": [{"command": ["true"]}] * 3 + [{"command": ["x" * 6000]}]})
        assert status == 413 and err["error"]["field"] == "jobs[3].command", err
        status, page = await call(client, "GET", "/v1/jobs")
        assert page["jobs"] == []
        # A body far over the limit is refused before it is parsed.
        status, err = await call(client, "POST", "/v1/jobs", raw=json.dumps(big).encode() * 5)
        assert status == 413 and err["error"]["field"] == "body", err
        # Under the limit it is fine.
        status, job = await call(client, "POST", "/v1/jobs", {"command": ["true"], "env": {"BLOB": "x" * 3000}})
        assert status == 201, job

    serve(tmp_path, body, **{"scheduler.max_spec_bytes": 4096})


def test_listings_are_bounded_summaries_whatever_the_specs(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        blob = "y" * 120_000  # each string at most MAX_ARG_LEN; the spec, ~240 KB, under max_spec_bytes
        for i in range(40):
            await submit(client, command=["sh", "-c", f"echo {i} {blob}"], env={"BIG": blob}, name=f"job-{i}")
        status, raw = await call(client, "GET", "/v1/jobs", params={"limit": "50"})
        assert status == 200 and len(raw["jobs"]) == 40
        size = len(json.dumps(raw))
        assert size < 40 * 650, f"a page of 40 summaries is {size:,} bytes"  # ~616 each: 256 of command
        first = raw["jobs"][0]
        assert "spec" not in first and first["name"] == "job-39"
        assert first["command_truncated"] is True and first["command"] == f"sh -c 'echo 39 {blob}'"[:256]
        # The job itself still has its whole spec.
        status, job = await call(client, "GET", f"/v1/jobs/{first['id']}")
        assert job["spec"]["env"]["BIG"] == blob and job["command_truncated"] is True

    serve(tmp_path, body)


@pytest.mark.backend_specific
def test_every_listing_filter_reads_an_index_in_id_order(tmp_path: Path) -> None:
    """At 1,000,000 jobs a filter that scans the table takes seconds; one that reads an index in order stops
    after a page (benchmarks/suite.py measures it). Here: the plan of every query the listing route runs."""
    queries: list[tuple[str, tuple[Any, ...]]] = []

    async def body(client: TestClient) -> None:
        store = client.server.app[STORE]
        real = store._read

        async def spy(sql: str, params: Any = ()) -> Any:
            queries.append((sql, tuple(params)))
            return await real(sql, params)

        store._read = spy
        await submit(client, queue="q1")
        for params in ({}, {"state": "queued"}, {"queue": "q1"}, {"state": "running", "queue": "q1"},
                       {"state": "queued", "cursor": "5"}, {"queue": "q1", "cursor": "5"},
                       {"state": "queued", "queue": "q1", "cursor": "9", "limit": "10"}):
            status, _ = await call(client, "GET", "/v1/jobs", params=params)
            assert status == 200
        store._read = real

    serve(tmp_path, body)
    conn = sqlite3.connect(str(tmp_path / "orch.db"))
    try:
        for sql, params in queries:
            steps = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            plan = " | ".join(steps)
            for before, step in zip(["", *steps[:-1]], steps, strict=True):
                # Rows of jobs are read in id order and the reading stops after a page: a sort is only ever
                # of a subquery's page (a queue alone: a page of each state, merged), never of jobs' rows.
                if "TEMP B-TREE" in step:
                    assert before.startswith("SCAN (subquery") or before.startswith("COMPOUND"), (sql, plan)
            if "WHERE" in sql and ("state =" in sql or "queue =" in sql):
                assert "USING INDEX" in plan and "SCAN jobs" not in plan, (sql, plan)
    finally:
        conn.close()
    assert len(queries) == 7


def test_big_batches_and_outputs_are_parsed_and_encoded_in_slices(tmp_path: Path, monkeypatch: Any) -> None:
    """While a 10,000-job batch is parsed, checked, stored and answered, and while a job with megabytes of
    output is answered, other tasks on the loop keep getting turns (yields between slices)."""
    monkeypatch.setattr(bodies, "SLICE_SECONDS", 0.0)  # a yield at every slice boundary: a count, not a clock
    monkeypatch.setattr(bodies, "BIG_BODY", 1024)

    async def body(client: TestClient) -> None:
        turns = 0
        stop = asyncio.Event()

        async def other() -> None:
            nonlocal turns
            while not stop.is_set():
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other())
        try:
            status, data = await call(client, "POST", "/v1/jobs/batch",
                                      {"jobs": [{"command": ["echo", str(i)], "labels": {"n": str(i)}}
                                                for i in range(10_000)]})
            assert status == 201 and len(data["jobs"]) == 10_000
            assert data["jobs"][-1]["command"] == "echo 9999" and "spec" not in data["jobs"][-1]
            during_batch, turns = turns, 0
            wid = await register(client)
            await call(client, "POST", f"/v1/workers/{wid}/lease", {"max": 1})
            first = data["jobs"][0]["id"]
            for stream in ("stdout", "stderr"):
                await call(client, "POST", f"/v1/workers/{wid}/output", {"chunks": [
                    {"job_id": first, "attempt": 1, "stream": stream, "data": "z\u00e9" * 300_000}]})
            status, job = await call(client, "GET", f"/v1/jobs/{first}")
            assert status == 200 and job["result"]["stdout"] == "z\u00e9" * 300_000
            during_output = turns
        finally:
            stop.set()
            await ticker
        assert during_batch >= 300, f"the loop ran other tasks {during_batch} times during the batch"
        assert during_output >= 8, f"the loop ran other tasks {during_output} times while encoding the output"

    serve(tmp_path, body, **{"scheduler.output_limit_bytes": 1 << 20})


def test_a_big_batch_body_parsed_in_slices_says_what_is_wrong_like_a_small_one(tmp_path: Path,
                                                                              monkeypatch: Any) -> None:
    monkeypatch.setattr(bodies, "BIG_BODY", 64)

    async def body(client: TestClient) -> None:
        good = json.dumps({"jobs": [{"command": ["true"]}] * 20}).encode()
        status, data = await call(client, "POST", "/v1/jobs/batch", raw=good)
        assert status == 201 and len(data["jobs"]) == 20
        for bad in (good[:-3], good.replace(b"},", b"} ", 1), b'{"jobs": [1, 2,]}' + b" " * 100,
                    b'  {"jobs": []} trailing' + b" " * 100, b'[{"jobs": 1}]' + b" " * 100):
            status, err = await call(client, "POST", "/v1/jobs/batch", raw=bad)
            assert status == 400 and err["error"]["field"] in ("body", "jobs"), (bad[:40], err)
        status, err = await call(client, "POST", "/v1/jobs/batch",
                                 raw=b'{"jobs": [{"command": ["true"]}], "extra": 1}' + b" " * 100)
        assert status == 400 and err["error"]["field"] == "extra"

    serve(tmp_path, body)




def test_one_long_poll_waits_for_many_jobs_and_answers_with_those_that_ended(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        jobs = [await submit(client) for _ in range(5)]
        ids = [j["id"] for j in jobs]
        status, data = await call(client, "POST", "/v1/jobs/wait", {"ids": ids, "timeout": 0})
        assert status == 200 and data == {"ended": [], "waiting": 5}
        waiting = asyncio.ensure_future(call(client, "POST", "/v1/jobs/wait", {"ids": ids, "timeout": 20}))
        hub = client.server.app[HUB]
        await until(lambda: all(i in hub._many for i in ids), 10, "the wait to be registered for every job")
        assert not waiting.done()  # held: none has ended
        status, _ = await call(client, "POST", f"/v1/jobs/{ids[3]}/cancel")
        status, data = await asyncio.wait_for(waiting, 10)
        assert status == 200 and [j["id"] for j in data["ended"]] == [ids[3]] and data["waiting"] == 4
        assert data["ended"][0]["state"] == "cancelled" and "spec" not in data["ended"][0]
        # Every one that has ended is listed, not only the one that woke it.
        await call(client, "POST", f"/v1/jobs/{ids[0]}/cancel")
        status, data = await call(client, "POST", "/v1/jobs/wait", {"ids": ids, "timeout": 5})
        assert sorted(j["id"] for j in data["ended"]) == [ids[0], ids[3]]
        # Unknown ids and bad input name the field.
        status, err = await call(client, "POST", "/v1/jobs/wait", {"ids": [ids[1], 99_999], "timeout": 0})
        assert status == 404 and err["error"]["field"] == "ids[1]", err
        for bad, field in (({"ids": []}, "ids"), ({"ids": ["1"]}, "ids[0]"), ({"ids": [1], "timeout": -1}, "timeout"),
                           ({"ids": [1], "x": 1}, "x")):
            status, err = await call(client, "POST", "/v1/jobs/wait", bad)
            assert status == 400 and err["error"]["field"] == field, (bad, err)

    serve(tmp_path, body)


def test_claims_hand_out_big_specs_whole_as_well_as_small_ones(tmp_path: Path) -> None:
    """A claim returns small specs in its own statement and reads big ones after it: a worker gets each whole."""
    async def body(client: TestClient) -> None:
        blob = "b" * 100_000
        small = await submit(client, command=["echo", "small"])
        big = [await submit(client, command=["echo", str(i)], env={"BLOB": blob}) for i in range(3)]
        wid = await register(client, concurrency=8)
        status, data = await call(client, "POST", f"/v1/workers/{wid}/lease", {"max": 2})
        got = data["jobs"]
        assert [j["job_id"] for j in got] == [small["id"], big[0]["id"]]
        assert got[0]["spec"]["command"] == ["echo", "small"] and got[1]["spec"]["env"]["BLOB"] == blob
        status, data = await call(client, "POST", f"/v1/workers/{wid}/complete", {
            "results": [{"job_id": small["id"], "attempt": 1, "outcome": "succeeded", "exit_code": 0}],
            "lease": {"max": 5, "queues": ["default"]}})
        assert status == 200, data
        assert [(j["job_id"], j["spec"]["command"], j["spec"]["env"]["BLOB"] == blob) for j in data["jobs"]] == [
            (big[1]["id"], ["echo", "1"], True), (big[2]["id"], ["echo", "2"], True)]

    serve(tmp_path, body)


def test_a_queue_listing_pages_through_every_state_newest_first(tmp_path: Path) -> None:
    async def body(client: TestClient) -> None:
        ids = [(await submit(client, queue="q1"))["id"] for _ in range(7)]
        await submit(client, queue="other")
        for i in (ids[1], ids[4], ids[5]):
            await call(client, "POST", f"/v1/jobs/{i}/cancel")
        seen, cursor = [], None
        while True:
            params = {"queue": "q1", "limit": "2", **({"cursor": cursor} if cursor else {})}
            status, page = await call(client, "GET", "/v1/jobs", params=params)
            assert status == 200 and len(page["jobs"]) <= 2
            seen += [(j["id"], j["state"]) for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [(i, "cancelled" if i in (ids[1], ids[4], ids[5]) else "queued") for i in reversed(ids)]

    serve(tmp_path, body)
