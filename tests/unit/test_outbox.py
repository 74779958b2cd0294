"""The worker's outbox: bounded unsent output with exact hole accounting, and requests that fit the budget."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from orch.worker import outbox
from orch.worker.outbox import Output, back_parcels, output_parcels, result_parcels, rides_along, utf8_len

TEXT = st.text(alphabet=st.sampled_from(["a", "b", "\n", "é", "\x1b", '"', "\\", "😀", "中"]), max_size=300)
STEP = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(["stdout", "stderr"]), TEXT),
    st.tuples(st.just("send"), st.integers(min_value=outbox.MIN_BUDGET, max_value=8000), st.booleans()),
)


def replay(delivered: list[dict], stream: str, original: str) -> None:
    """Delivered chunks of ``stream``, in order, with their skipped bytes, must be the original to the byte."""
    raw = original.encode()
    at = 0
    for c in delivered:
        if c["stream"] != stream:
            continue
        at += c.get("skipped", 0)
        data = c["data"].encode()
        assert raw[at:at + len(data)] == data, f"chunk at byte {at} is not what was written"
        at += len(data)
    assert at == len(raw), f"{stream}: delivered and skipped {at} bytes of {len(raw)}"


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(STEP, max_size=80), keep=st.integers(min_value=16, max_value=1500))
def test_whatever_is_written_taken_and_put_back_delivers_exactly_with_holes_counted(steps, keep) -> None:
    out = Output(7, 2, keep, 0.0)
    written = {"stdout": "", "stderr": ""}
    delivered: list[dict] = []
    for step in steps:
        if step[0] == "write":
            _, stream, text = step
            out.add(stream, text)
            written[stream] += text
            for s in ("stdout", "stderr"):  # bounded: at most keep bytes unsent per stream
                assert out.unsent[s] <= keep
        else:
            _, budget, ok = step
            parcels = output_parcels([out], budget, outbox.MAX_ITEMS)
            for p in parcels:
                assert len(p.body) <= budget
                body = json.loads(p.body)
                assert len(body["chunks"]) == len(p.chunks)
            if ok:
                delivered += [c for p in parcels for c in json.loads(p.body)["chunks"]]
            else:
                assert outbox.restore(parcels) == []
    for p in output_parcels([out], outbox.MIN_BUDGET, outbox.MAX_ITEMS):
        delivered += json.loads(p.body)["chunks"]
    assert all(c["job_id"] == 7 and c["attempt"] == 2 for c in delivered)
    for stream in ("stdout", "stderr"):
        replay(delivered, stream, written[stream])
        # What was sent last is the newest output: nothing at the end is ever dropped.
        tail = "".join(c["data"] for c in delivered if c["stream"] == stream)
        assert written[stream].endswith(tail[-keep // 4:] if tail else "")


def test_a_fast_writer_keeps_memory_bounded_and_the_tail_whole() -> None:
    out = Output(1, 1, 1 << 20, 0.0)
    line = "y" * 99 + "\n"
    for _ in range(200_000):  # 20 MB, nothing sent
        out.add("stdout", line)
    assert out.unsent["stdout"] <= 1 << 20
    assert out.dropped == 20_000_000 - out.unsent["stdout"]
    parcels = output_parcels([out], 256 * 1024, outbox.MAX_ITEMS)
    chunks = [c for p in parcels for c in json.loads(p.body)["chunks"]]
    assert all(len(p.body) <= 256 * 1024 for p in parcels) and len(parcels) >= 4
    assert chunks[0]["skipped"] == out.dropped and all("skipped" not in c for c in chunks[1:])
    assert "".join(c["data"] for c in chunks).endswith(line * 100)


def test_one_chunk_larger_than_a_request_is_split_and_nothing_is_lost() -> None:
    out = Output(1, 1, 1 << 20, 0.0)
    text = "\x01" * 5000  # each character is six bytes of JSON
    out.add("stderr", text)
    parcels = output_parcels([out], outbox.MIN_BUDGET, outbox.MAX_ITEMS)
    assert len(parcels) > 1 and all(len(p.body) <= outbox.MIN_BUDGET for p in parcels)
    assert "".join(c["data"] for p in parcels for c in json.loads(p.body)["chunks"]) == text


def test_an_end_rides_with_its_output_when_both_fit_and_the_lease_ask_goes_with_the_first() -> None:
    ends = []
    for i in range(1, 40):
        out = Output(i, 1, 1 << 20, 0.0)
        out.add("stdout", f"job {i}\n" * 20)
        result = {"job_id": i, "attempt": 1, "outcome": "succeeded", "exit_code": 0, "error": None, "duration": 0.1}
        assert rides_along(result, out, 2048, outbox.MAX_ITEMS)
        ends.append((result, out))
    lease = ',"lease":{"max":4,"queues":["default"]}'
    parcels = result_parcels(ends, 2048, outbox.MAX_ITEMS, lease)
    assert len(parcels) > 1 and all(len(p.body) <= 2048 for p in parcels)
    bodies = [json.loads(p.body) for p in parcels]
    assert bodies[0]["lease"] == {"max": 4, "queues": ["default"]} and all("lease" not in b for b in bodies[1:])
    got = [r for b in bodies for r in b["results"]]
    assert [r["job_id"] for r in got] == list(range(1, 40))
    assert all("".join(c["data"] for c in r["output"]) == f"job {r['job_id']}\n" * 20 for r in got)
    # A parcel that did not get through gives its ends back, in order, and the output to its attempts.
    back = outbox.restore(parcels[1:])
    assert [r["job_id"] for r in back] == [r["job_id"] for b in bodies[1:] for r in b["results"]]
    assert all(ends[r["job_id"] - 1][1].nbytes == utf8_len(f"job {r['job_id']}\n" * 20) for r in back)


def test_output_too_big_to_ride_goes_ahead_and_hand_backs_fit_too() -> None:
    out = Output(3, 1, 1 << 20, 0.0)
    out.add("stdout", "z" * 10_000)
    result = {"job_id": 3, "attempt": 1, "outcome": "failed", "exit_code": 1, "error": None, "duration": 1.0}
    assert not rides_along(result, out, 4096, outbox.MAX_ITEMS)
    ahead = output_parcels([out], 4096, outbox.MAX_ITEMS)
    (end,) = result_parcels([(result, out)], 4096, outbox.MAX_ITEMS)
    assert json.loads(end.body)["results"][0]["output"] == []
    assert "".join(c["data"] for p in ahead for c in json.loads(p.body)["chunks"]) == "z" * 10_000
    backs = back_parcels([{"hand_back": True, "job_id": i, "attempt": 1} for i in range(1, 500)], 1024, 100)
    assert all(len(p.body) <= 1024 and len(p.backs) <= 100 for p in backs)
    assert all(json.loads(p.body)["stop"] is False for p in backs)
    assert [a["job_id"] for p in backs for a in json.loads(p.body)["attempts"]] == list(range(1, 500))


def test_interleaved_small_writes_with_drops_and_failed_sends_replay_exactly() -> None:
    """The shape that makes the drop path work hardest: both streams interleaved (so chunks do not merge),
    a small keep, sends that fail and put their chunks back."""
    import random

    rng = random.Random(1234)
    for keep in (16, 40, 100, 333):
        out = Output(1, 1, keep, 0.0)
        written = {"stdout": "", "stderr": ""}
        delivered: list[dict] = []
        for i in range(3000):
            stream = "stdout" if i % 2 == 0 or rng.random() < 0.3 else "stderr"
            text = rng.choice("abcdefgh") * rng.randint(1, keep // 2 + 3) + ("é" if rng.random() < 0.2 else "")
            out.add(stream, text)
            written[stream] += text
            if rng.random() < 0.05:
                parcels = output_parcels([out], rng.randint(outbox.MIN_BUDGET, 3000), rng.randint(1, 50))
                if rng.random() < 0.5:
                    outbox.restore(parcels)
                else:
                    delivered += [c for p in parcels for c in json.loads(p.body)["chunks"]]
        for p in output_parcels([out], outbox.MIN_BUDGET, outbox.MAX_ITEMS):
            delivered += json.loads(p.body)["chunks"]
        for stream in ("stdout", "stderr"):
            replay(delivered, stream, written[stream])
