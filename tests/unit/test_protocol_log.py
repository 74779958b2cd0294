"""The logger aiohttp's HTTP protocol writes to: malformed requests are one short WARNING line at most a minute,
counted in between; anything else keeps its traceback."""

from __future__ import annotations

import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from orch.scheduler.security import ProtocolLog


def test_refused_requests_are_one_line_a_minute_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    log = ProtocolLog(logging.getLogger("orch.test.protocol"), interval=60.0, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, "orch.test.protocol")
    bad = BadHttpMessage("Missing 'Host' header in request.")
    for _ in range(5):
        log.exception("Error handling request from %s", "10.0.0.7", exc_info=bad)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "refused a malformed HTTP request from 10.0.0.7: Missing 'Host' header in request.")]
    assert all(r.exc_info is None for r in caplog.records)
    now[0] += 61
    log.exception("Error handling request from %s", "10.0.0.8", exc_info=BadHttpMessage("Invalid header value char"))
    assert caplog.records[-1].getMessage() == (
        "refused a malformed HTTP request from 10.0.0.8: Invalid header value char (4 more since the last such line)")
    assert len(caplog.records) == 2


def test_other_errors_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = ProtocolLog(logging.getLogger("orch.test.protocol2"))
    caplog.set_level(logging.DEBUG, "orch.test.protocol2")
    try:
        raise RuntimeError("a bug")
    except RuntimeError as e:
        log.exception("Unhandled exception", exc_info=e)
    (record,) = caplog.records
    assert record.levelname == "ERROR" and record.exc_info is not None and record.getMessage() == "Unhandled exception"
