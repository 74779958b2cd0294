"""Log set-up: text or JSON lines on stderr, at the configured level."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)  # log.info(..., extra={"fields": {...}}): structured data
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class LoopBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines logged during one turn of the event loop go out in one write at its end.

    At thousands of state changes a second, a write() per line was a fifth of the
    scheduler's time. Nothing waits longer than the current loop turn, and
    records from other threads (or with no loop running) are written at once.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self.flush()
            super().emit(record)
            return
        try:
            self._lines.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._lines:
                data, self._lines = "".join(self._lines), []
                self.stream.write(data)
            super().flush()
        finally:
            self.release()


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = LoopBufferedHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # aiohttp's access log is one line per request: far too loud at info.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiosqlite logs every query with its parameters at debug: noise, and data that is not ours to log.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
