"""Big JSON in and out without holding the event loop: parse, map and encode in slices that yield.

The json module's C code holds the GIL from start to end: encoding 28 MB took
0.11 s here and stalled the loop for all of it, whether it ran on the loop or
on a thread (a thread gains nothing while it holds the GIL). So what can be
big is cut into slices of about a millisecond each, and the loop runs other
requests between them: a batch body is parsed one job spec at a time, specs
are checked and their answers made a slice at a time, and long strings (a
job's output) are encoded a slice at a time. Small requests take the plain
path (one ``json.loads``, one ``dumps``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Sequence, TypeVar

from orch.core.errors import ValidationError

T = TypeVar("T")
U = TypeVar("U")

SLICE_SECONDS = 0.002  # work done between two yields to the loop, about
BIG_BODY = 1 << 20  # bodies up to this size are parsed in one go (a few milliseconds)
STRING_SLICE = 128 * 1024  # characters of a long string encoded between yields

_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_decoder = json.JSONDecoder()
_WS = " \t\n\r"


EACH_SLICE = 256  # items mapped between two yields to the loop (a spec's check is ~10 us: ~2.5 ms)


async def each(items: Sequence[T], fn: Callable[[int, T], U]) -> list[U]:
    """``[fn(i, item) for ...]``, a slice of EACH_SLICE items between two yields to the loop."""
    if len(items) <= EACH_SLICE:
        return [fn(i, item) for i, item in enumerate(items)]
    out: list[U] = []
    for at in range(0, len(items), EACH_SLICE):
        out += [fn(i, items[i]) for i in range(at, min(at + EACH_SLICE, len(items)))]
        await asyncio.sleep(0)
    return out


def _skip(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


async def loads_object(raw: bytes, list_key: str) -> Any:
    """``json.loads(raw)`` for a body that should be an object, parsing the elements of its ``list_key``
    array one at a time (yielding to the loop between slices) when the body is big."""
    if len(raw) <= BIG_BODY:
        return json.loads(raw)
    text = raw.decode("utf-8")
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "{":
        return json.loads(text)  # not an object: the usual path says what is wrong (the caller refuses it)
    out: dict[str, Any] = {}
    i = _skip(text, i + 1)
    began = time.perf_counter()
    if i < len(text) and text[i] == "}":
        i += 1
    else:
        while True:
            if i >= len(text) or text[i] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
            key, i = _decoder.raw_decode(text, i)
            i = _skip(text, i)
            if i >= len(text) or text[i] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i = _skip(text, i + 1)
            if key == list_key and i < len(text) and text[i] == "[":
                items: list[Any] = []
                i = _skip(text, i + 1)
                if i < len(text) and text[i] == "]":
                    i += 1
                else:
                    while True:
                        item, i = _decoder.raw_decode(text, i)
                        items.append(item)
                        i = _skip(text, i)
                        if i < len(text) and text[i] == ",":
                            i = _skip(text, i + 1)
                        elif i < len(text) and text[i] == "]":
                            i += 1
                            break
                        else:
                            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
                        if time.perf_counter() - began > SLICE_SECONDS:
                            await asyncio.sleep(0)
                            began = time.perf_counter()
                value: Any = items
            else:
                value, i = _decoder.raw_decode(text, i)
            out[key] = value
            i = _skip(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip(text, i + 1)
                continue
            if i < len(text) and text[i] == "}":
                i += 1
                break
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    if _skip(text, i) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, i))
    return out


async def encode(obj: Any) -> bytes:
    """``dumps(obj)`` (compact), with long strings encoded a slice at a time and long lists an item at a
    time, yielding to the loop between them."""
    parts: list[str] = []
    clock = [time.perf_counter()]

    async def breathe() -> None:
        if time.perf_counter() - clock[0] > SLICE_SECONDS:
            await asyncio.sleep(0)
            clock[0] = time.perf_counter()

    async def walk(o: Any) -> None:
        if isinstance(o, str):
            if len(o) <= STRING_SLICE:
                parts.append(_string(o))
                return
            parts.append('"')
            for at in range(0, len(o), STRING_SLICE):
                parts.append(_string(o[at:at + STRING_SLICE])[1:-1])
                await breathe()
            parts.append('"')
        elif isinstance(o, dict):
            parts.append("{")
            for n, (k, v) in enumerate(o.items()):
                if n:
                    parts.append(",")
                parts.append(_string(str(k)) + ":")
                await walk(v)
            parts.append("}")
        elif isinstance(o, (list, tuple)):
            parts.append("[")
            for n, v in enumerate(o):
                if n:
                    parts.append(",")
                await walk(v)
                if n & 15 == 15:
                    await breathe()
            parts.append("]")
        else:
            parts.append(_dumps(o))

    await walk(obj)
    return "".join(parts).encode()


async def let_go(*lists: list[Any]) -> None:
    """Empty big lists a slice at a time: freeing the objects of a 10,000-job batch at once, when its
    handler returns, held the loop ~30 ms."""
    for items in lists:
        while items:
            del items[-1024:]
            await asyncio.sleep(0)


def bad_json(e: Exception) -> ValidationError:
    return ValidationError(f"request body is not valid JSON: {e}", field="body")


async def encode_list(key: str, items: Sequence[Any]) -> bytes:
    """``dumps({key: items})`` for a long list of small items (each bounded: a job and its spec), an item at
    a time between yields; ``encode`` walks every value, which costs more than this for many small ones."""
    parts = ['{"', key, '":[']
    began = time.perf_counter()
    for n, item in enumerate(items):
        if n:
            parts.append(",")
        parts.append(_dumps(item))
        if n & 31 == 31 and time.perf_counter() - began > SLICE_SECONDS:
            await asyncio.sleep(0)
            began = time.perf_counter()
    parts.append("]}")
    return "".join(parts).encode()
