"""What a worker has yet to tell the scheduler, and the requests that carry it, each below the body limit.

Output. Each attempt's unsent output is kept per stream up to ``keep`` bytes
(the scheduler's ``output_limit_bytes``, told at registration): the scheduler
keeps only that much of each stream's tail, so anything older that has not
been sent yet would be thrown away there anyway. When a stream's unsent
output grows past it (a job that writes faster than the scheduler takes it,
or while the scheduler is away), the oldest unsent part is dropped and
counted: the next chunk of that stream says how many bytes were dropped
right before it (``skipped``), and the scheduler marks the hole where it is,
in the stored output and in the followers' streams. So a worker holds about
``keep`` bytes (plus one chunk) of unsent output per stream and attempt,
whatever the job writes, and reads the job's pipes at full speed.

Requests. Every request body is built here as JSON text and measured, so
none is larger than the budget (the scheduler's ``max_body_bytes``, told at
registration; the worker halves it when a 413 says something in between
allows less) and none holds more than ``max_items`` items (halved when the
scheduler refuses a request, to find the one item it will not take). A
chunk too large for a request is split. An attempt's end rides with the
rest of its output when both fit in one request, so the scheduler stores the
last output in the transaction that closes the attempt; otherwise that
output goes ahead on its own. What was taken for requests that did not get
through goes back (``restore``) in front of what came since, and the byte
limit applies to it again.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_dumps = json.JSONEncoder(separators=(",", ":")).encode

PIECE = 64 * 1024  # bytes of one stream gathered into one chunk, at most
OVERHEAD = 512  # bytes of a request body around its items (braces, keys, a lease ask), at most
MIN_BUDGET = 1024  # the smallest body budget a worker shrinks to (the scheduler's own minimum)
MAX_ITEMS = 1000  # chunks, results or hand-backs in one request, at most (the API takes up to 10,000)
MAX_CHUNKS = 1000  # output chunks riding with one completion, at most


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _tail(text: str, nbytes: int) -> str:
    """At most the last ``nbytes`` UTF-8 bytes of ``text``, cut on a character boundary."""
    if text.isascii():
        return text[len(text) - nbytes:] if nbytes < len(text) else text
    raw = text.encode("utf-8", "surrogatepass")
    return raw[len(raw) - nbytes:].decode("utf-8", "ignore") if nbytes < len(raw) else text


class Chunk:
    """Output of one stream of one attempt: ``skipped`` bytes were dropped right before ``text``."""

    __slots__ = ("stream", "skipped", "text", "nbytes")

    def __init__(self, stream: str, skipped: int, text: str, nbytes: int) -> None:
        self.stream, self.skipped, self.text, self.nbytes = stream, skipped, text, nbytes

    def __repr__(self) -> str:
        return f"Chunk({self.stream}, skipped={self.skipped}, {self.nbytes} bytes)"


class Output:
    """One attempt's unsent output, in the order it was written, at most about ``keep`` bytes per stream."""

    __slots__ = ("job_id", "attempt", "keep", "chunks", "unsent", "since", "dropped")

    def __init__(self, job_id: int, attempt: int, keep: int, since: float) -> None:
        self.job_id, self.attempt, self.keep = job_id, attempt, keep
        self.chunks: deque[Chunk] = deque()
        self.unsent = {"stdout": 0, "stderr": 0}
        self.since = since  # loop time the oldest unsent chunk came (output waits a little for more)
        self.dropped = 0  # bytes dropped here so far

    @property
    def nbytes(self) -> int:
        return self.unsent["stdout"] + self.unsent["stderr"]

    def add(self, stream: str, text: str) -> int:
        """Append output of ``stream``; returns the bytes it added."""
        n = utf8_len(text)
        last = self.chunks[-1] if self.chunks else None
        if last is not None and last.stream == stream and last.nbytes + n <= PIECE:
            last.text += text
            last.nbytes += n
        else:
            self.chunks.append(Chunk(stream, 0, text, n))
        self.unsent[stream] += n
        if self.unsent[stream] > self.keep:
            self._trim(stream)
        return n

    def _trim(self, stream: str) -> None:
        """Drop the oldest unsent output of ``stream`` until the rest fits ``keep``; the next chunk counts it."""
        over = self.unsent[stream] - self.keep
        mine = [c for c in self.chunks if c.stream == stream]
        for i, c in enumerate(mine):
            if over <= 0:
                break
            if i + 1 < len(mine) and c.nbytes <= over:  # the whole chunk goes
                self.chunks.remove(c)
                mine[i + 1].skipped += c.skipped + c.nbytes
                gone = c.nbytes
            else:  # its head goes (never the newest bytes)
                text = _tail(c.text, c.nbytes - over)
                n = utf8_len(text)
                gone = c.nbytes - n
                c.skipped += gone
                c.text, c.nbytes = text, n
            self.unsent[stream] -= gone
            self.dropped += gone
            over -= gone

    def take(self, room: int, budget: int, max_items: int) -> list[tuple[Chunk, str]]:
        """Chunks from the front, oldest first, as (chunk, its JSON), that fit in ``room`` bytes and
        ``max_items``; a chunk too large for any request of ``budget`` bytes is split first."""
        out: list[tuple[Chunk, str]] = []
        used = 0
        while self.chunks and len(out) < max_items:
            c = self.chunks[0]
            text = chunk_json(self, c)
            if len(text) > budget - OVERHEAD:
                head, rest = split(c, budget - OVERHEAD - chunk_json_overhead(self, c))
                self.chunks[0] = rest
                self.chunks.appendleft(head)
                continue
            if used + len(text) + 1 > room:
                break
            self.chunks.popleft()
            self.unsent[c.stream] -= c.nbytes
            out.append((c, text))
            used += len(text) + 1
        return out

    def restore(self, chunks: list[Chunk]) -> None:
        """Put taken chunks back in front (their request did not get through); the byte limit applies again."""
        for c in reversed(chunks):
            self.chunks.appendleft(c)
            self.unsent[c.stream] += c.nbytes
        for stream in ("stdout", "stderr"):
            if self.unsent[stream] > self.keep:
                self._trim(stream)

    def lose(self, chunk: Chunk) -> None:
        """The scheduler refused ``chunk`` for good: the next chunk of its stream says those bytes are missing."""
        self.dropped += chunk.nbytes
        for c in self.chunks:
            if c.stream == chunk.stream:
                c.skipped += chunk.skipped + chunk.nbytes
                return
        self.chunks.appendleft(Chunk(chunk.stream, chunk.skipped + chunk.nbytes, "", 0))


def chunk_json(out: Output, c: Chunk) -> str:
    skipped = f',"skipped":{c.skipped}' if c.skipped else ""
    return (f'{{"job_id":{out.job_id},"attempt":{out.attempt},"stream":"{c.stream}",'
            f'"data":{_string(c.text)}{skipped}}}')


def chunk_json_overhead(out: Output, c: Chunk) -> int:
    return len(chunk_json(out, Chunk(c.stream, c.skipped, "", 0)))


def split(c: Chunk, room: int) -> tuple[Chunk, Chunk]:
    """Cut ``c`` in two so that the first part's JSON string fits ``room`` bytes: (first, rest)."""
    room = max(room, 16)
    lo, hi, best = 1, len(c.text) - 1, 1
    while lo <= hi:  # the longest head whose encoded form fits
        mid = (lo + hi) // 2
        if len(_string(c.text[:mid])) <= room:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best < len(c.text) and "\ud800" <= c.text[best - 1] <= "\udbff":
        best = max(1, best - 1)  # never cut a surrogate pair (output decoded with surrogateescape has none)
    head_text, rest_text = c.text[:best], c.text[best:]
    head = Chunk(c.stream, c.skipped, head_text, utf8_len(head_text))
    return head, Chunk(c.stream, 0, rest_text, c.nbytes - head.nbytes)


@dataclass
class Parcel:
    """One request: ``kind`` is the route under /v1/workers/{id}/ (output, complete, hand-back)."""

    kind: str
    body: bytes
    chunks: list[tuple[Output, Chunk]] = field(default_factory=list)
    results: list[tuple[dict[str, Any], Output | None, list[Chunk]]] = field(default_factory=list)
    backs: list[dict[str, Any]] = field(default_factory=list)
    asks_lease: bool = False

    @property
    def items(self) -> int:
        return len(self.chunks) + len(self.results) + len(self.backs)


class _Packer:
    """Fills request bodies of one kind up to the budget and the item limit."""

    def __init__(self, kind: str, key: str, budget: int, max_items: int, lease: str = "") -> None:
        self.kind, self.key, self.budget, self.max_items = kind, key, budget, max_items
        self.lease = lease  # ',"lease":{...}' for the first completion request
        self.parcels: list[Parcel] = []
        self._new()

    def _new(self) -> None:
        self.texts: list[str] = []
        self.parcel = Parcel(self.kind, b"")
        self.used = OVERHEAD

    def room(self) -> int:
        return self.budget - self.used if self.texts else self.budget - OVERHEAD

    def full(self, size: int) -> bool:
        return bool(self.texts) and (self.used + size + 1 > self.budget or self.parcel.items >= self.max_items)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.used += len(text) + 1

    def close(self) -> None:
        if not self.texts:
            return
        tail = ""
        if self.lease and not self.parcels:
            tail, self.parcel.asks_lease = self.lease, True
        self.parcel.body = ('{"' + self.key + '":[' + ",".join(self.texts) + "]" + tail + "}").encode()
        self.parcels.append(self.parcel)
        self._new()


def output_parcels(sources: Iterable[Output], budget: int, max_items: int) -> list[Parcel]:
    """All unsent output of ``sources``, in order, as ``/output`` requests."""
    p = _Packer("output", "chunks", budget, max_items)
    for out in sources:
        while out.chunks:
            room_items = max_items - p.parcel.items
            got = out.take(p.room(), budget, room_items) if room_items > 0 else []
            if not got:
                p.close()
                continue
            for c, text in got:
                p.add(text)
                p.parcel.chunks.append((out, c))
    p.close()
    return p.parcels


def result_json(result: dict[str, Any], chunk_texts: list[str]) -> str:
    head = _dumps(result)
    return head[:-1] + ',"output":[' + ",".join(chunk_texts) + "]}"


def rides_along(result: dict[str, Any], out: Output | None, budget: int, max_items: int) -> bool:
    """Whether an attempt's end and the rest of its output fit in one completion request."""
    if out is None or not out.chunks:
        return True
    if len(out.chunks) > MAX_CHUNKS:
        return False
    size = len(_dumps(result)) + sum(len(chunk_json(out, c)) + 1 for c in out.chunks)
    return size <= budget - OVERHEAD


def result_parcels(results: Iterable[tuple[dict[str, Any], Output | None]], budget: int, max_items: int,
                   lease: str = "") -> list[Parcel]:
    """Completions, each with the rest of its attempt's output (which must fit: see rides_along),
    as ``/complete`` requests; ``lease`` (``,"lease":{...}``) goes with the first."""
    p = _Packer("complete", "results", budget, max_items, lease)
    for result, out in results:
        chunks = list(out.chunks) if out is not None else []
        text = result_json(result, [chunk_json(out, c) for c in chunks] if out is not None else [])
        if p.full(len(text)):
            p.close()
        if out is not None:
            out.chunks.clear()
            out.unsent = {"stdout": 0, "stderr": 0}
        p.add(text)
        p.parcel.results.append((result, out, chunks))
    p.close()
    return p.parcels


def back_parcels(backs: Iterable[dict[str, Any]], budget: int, max_items: int) -> list[Parcel]:
    """Hand-backs as ``/hand-back`` requests."""
    p = _Packer("hand-back", "attempts", budget, max_items)
    for b in backs:
        text = f'{{"job_id":{b["job_id"]},"attempt":{b["attempt"]}}}'
        if p.full(len(text)):
            p.close()
        p.add(text)
        p.parcel.backs.append(b)
    p.close()
    for parcel in p.parcels:  # hand-backs of a draining worker are not its stop
        parcel.body = parcel.body[:-1] + b',"stop":false}'
    return p.parcels


def restore(parcels: Iterable[Parcel]) -> list[dict[str, Any]]:
    """Put the output of parcels that did not get through back where it came from, in order; returns
    their completions and hand-backs, in order, for the caller to keep."""
    ends: list[dict[str, Any]] = []
    groups: dict[int, tuple[Output, list[Chunk]]] = {}
    for p in parcels:
        for out, c in p.chunks:
            groups.setdefault(id(out), (out, []))[1].append(c)
        for result, rout, chunks in p.results:
            if rout is not None and chunks:
                groups.setdefault(id(rout), (rout, []))[1].extend(chunks)
            ends.append(result)
        ends.extend(p.backs)
    for out, chunks in groups.values():
        out.restore(chunks)
    return ends
