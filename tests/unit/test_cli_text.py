"""The CLI's human text: server fields shown escaped, times that say their zone, bad input as one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import orch.config
from orch.cli import app, format_event, format_status, table
from orch.client import _decode
from orch.config import ConfigError, normalize_server
from orch.core.errors import ApiError, ServerUnavailable
from orch.text import visible

# What a job name, a command or a worker name could carry to take over the operator's terminal.
EVIL = {
    "\x1b]0;owned\x07": r"\x1b]0;owned\x07",   # set the window title
    "\x1b[2J\x1b[H": r"\x1b[2J\x1b[H",         # clear the screen, cursor home
    "row\n9  succeeded": r"row\n9  succeeded",  # a fake table row
    "back\rspace\x08\x7f": r"back\rspace\x08\x7f",
    "\x9b31m": r"\x9b31m",                     # C1 CSI
    "abc\u202edcba": r"abc\u202edcba",         # right-to-left override
    "\u2066iso\u2069\u200f\u200e": r"\u2066iso\u2069\u200f\u200e",
    "zero\u200bwidth\ufeff": r"zero\u200bwidth\ufeff",
    "line\u2028sep": r"line\u2028sep",
    "tag\U000e0041": r"tag\U000e0041",
}


def raw_controls(text: str) -> list[str]:
    """Characters in printed text that a terminal would act on or that reorder it (newlines end lines)."""
    return [c for c in text if c != "\n" and not c.isprintable()]


@pytest.mark.parametrize(("given", "shown"), EVIL.items())
def test_visible_escapes_controls_and_bidi(given: str, shown: str) -> None:
    assert visible(given) == shown


@pytest.mark.parametrize("text", ["echo héllo wörld", "日本語のジョブ", "sh -c 'printf \"a\\n\"'", "emoji 🎉", ""])
def test_visible_keeps_printable_text_as_it_is(text: str) -> None:
    assert visible(text) == text


def job(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 7, "state": "failed", "queue": "default", "priority": 0, "attempt": 1, "max_attempts": 1,
        "name": None, "spec": {"kind": "command", "argv": ["echo", "hi"]}, "created_at": "2026-01-05T10:00:01.624Z",
        "started_at": "2026-01-05T10:00:01.700Z", "finished_at": "2026-01-05T10:00:02.000Z", "retry_at": None,
        "worker": "w-6287aaf8119d", "cancel_requested": False, "exit_code": 127, "error": None,
        "attempts": [{"attempt": 1, "state": "failed", "worker": "w-6287aaf8119d", "started_at": "2026-01-05T10:00:01.700Z",
                      "finished_at": "2026-01-05T10:00:02.000Z", "duration": 0.3, "exit_code": 127, "error": None}],
    }
    return {**base, **kw}


EVENTS = [{"id": 1, "job_id": 7, "attempt": 0, "from": None, "to": "queued", "at": "2026-01-05T10:00:01.624Z",
           "reason": "submitted"}]


def test_status_shows_every_server_field_escaped() -> None:
    evil = "".join(EVIL)
    text = format_status(
        job(name=evil, spec={"kind": "command", "argv": [evil, "x"]}, worker=evil, error=evil,
            attempts=[{**job()["attempts"][0], "worker": evil, "error": evil}]),
        [{**EVENTS[0], "reason": evil}])
    assert raw_controls(text) == []
    shown = "".join(EVIL.values())
    lines = text.splitlines()
    assert any(line.startswith("  name:") and shown in line for line in lines), text
    for label in ("  command:", "  worker:", "  exit code:"):
        assert any(line.startswith(label) and shown in line for line in lines), (label, text)
    assert sum(shown in line for line in lines) == 6, text  # name, command, worker, error, attempt, history
    assert len(lines) == len(format_status(job(name="n"), EVENTS).splitlines())  # no line was split


def test_shell_command_and_event_lines_are_escaped() -> None:
    text = format_status(job(spec={"kind": "shell", "shell": "echo \x1b[31mred"}), EVENTS)
    assert r"  command:   echo \x1b[31mred" in text.splitlines()
    line = format_event({**EVENTS[0], "reason": "claimed by \x1b[2Jx\u202e"})
    assert raw_controls(line) == [] and line.endswith(r"claimed by \x1b[2Jx\u202e")


def test_table_cells_are_escaped_and_columns_stay_aligned() -> None:
    out = table([["NAME", "HOST"], ["\x1b]0;t\x07", "h\nfake"], ["plain", "box1"]])
    lines = out.splitlines()
    assert raw_controls(out) == [] and len(lines) == 3
    assert lines[1] == r"\x1b]0;t\x07  h\nfake"
    assert lines[2].index("box1") == lines[1].index("h\\nfake") == lines[0].index("HOST")


def test_times_say_their_zone() -> None:
    text = format_status(job(retry_at="2026-01-05T10:00:09.000Z"), EVENTS)
    for label in ("created:", "started:", "finished:", "retry at:"):
        line = next(line for line in text.splitlines() if line.strip().startswith(label))
        assert line.endswith(" UTC"), line
    attempt = next(line for line in text.splitlines() if line.startswith("  #1"))
    assert "10:00:01.700 UTC -> 2026-01-05 10:00:02.000 UTC" in attempt
    assert format_event(EVENTS[0]).startswith("2026-01-05 10:00:01.624 UTC  #0  - -> queued")
    assert "  started:   -" in format_status(job(started_at=None), []).splitlines()  # no time, no zone


def test_decode_names_an_answer_that_is_not_orch() -> None:
    for status, raw in [(404, b"404: Not Found"), (200, b"orch metrics: GET /metrics\n"), (200, b""),
                        (200, b"[1, 2]"), (502, b"<html>Bad Gateway</html>"), (200, b"\x1b[2J")]:
        with pytest.raises(ServerUnavailable) as e:
            _decode(status, raw)
        assert "not an orch API" in e.value.message and e.value.exit_code == 3
        assert raw_controls(e.value.message) == []
    metrics = json.dumps({"error": {"code": "not_the_api", "message": "this port is orch's metrics listener"}})
    with pytest.raises(ServerUnavailable, match="not an orch API: this port is orch's metrics listener"):
        _decode(404, metrics.encode())
    # orch's own errors and answers are as before, their messages escaped.
    with pytest.raises(ApiError) as api:
        _decode(404, json.dumps({"error": {"code": "not_found", "message": "no job 9\x1b[2J"}}).encode())
    assert (api.value.exit_code, api.value.message) == (4, r"no job 9\x1b[2J")
    assert _decode(200, b'{"id": 1}') == {"id": 1}


# --------------------------------------------------------------------------- bad input on the command line

BAD_SERVERS = {
    "htp://x": "scheme",
    "ftp://127.0.0.1:21": "scheme",
    "http://127.0.0.1:80a80": "port",
    "http://127.0.0.1:99999": "port",
    "127.0.0.1:0": "port",
    "http://127.0.0.1:": "port",
    "http://:8080": "no host",
    ":": "port",
    "http://a b:8080": "'a b'",
    "http://127.0.0.1:8080/a b": "spaces",
    "http://u:p@127.0.0.1:8080": "password",
    "http://127.0.0.1:8080?x=1": "no ?",
    "http://[::1:8080": "IPv6",
    "\x1b[2J:8080": r"\x1b[2J",
}


@pytest.mark.parametrize(("given", "why"), BAD_SERVERS.items())
def test_normalize_server_refuses_what_no_client_can_reach(given: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        normalize_server(given, key="client.server")
    assert e.value.message.startswith("client.server: ") and why in e.value.message
    assert raw_controls(e.value.message) == []


@pytest.mark.parametrize(("given", "expected"), [
    ("HTTPS://Sched.example:443/", "https://Sched.example:443"),
    ("[::1]:8080", "http://[::1]:8080"),
    ("http://[fe80::1]", "http://[fe80::1]"),
    ("http://proxy.example/orch/", "http://proxy.example/orch"),
    ("sched_1.internal:65535", "http://sched_1.internal:65535"),
])
def test_normalize_server_keeps_good_addresses(given: str, expected: str) -> None:
    assert normalize_server(given) == expected


CLIENT_VERBS = [["run", "echo", "hi"], ["run", "--wait", "echo", "hi"], ["status", "1"], ["jobs"], ["logs", "1"],
                ["logs", "--follow", "1"], ["cancel", "1"], ["workers"], ["events", "1"], ["events", "--follow", "1"],
                ["why", "1"], ["submit", "--file", "-"]]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run orch in this process with no user config and no ORCH_* from outside; (exit code, stdout, stderr)."""
    import os

    for name in [n for n in os.environ if n.startswith("ORCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-config.yaml")
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    runner = CliRunner()

    def invoke(args: list[str], stdin: str = "") -> tuple[int, str, str]:
        result = runner.invoke(app, args, input=stdin)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.mark.parametrize("server", ["htp://x", "http://127.0.0.1:80a80", "http://:8080", "http://a b:8080", "h:0"])
def test_every_client_verb_refuses_a_bad_server_in_one_line(cli: Any, server: str) -> None:
    for verb in CLIENT_VERBS:
        code, out, err = cli([*verb, "--server", server], stdin='{"command": ["true"]}\n')
        assert code == 2, (verb, server, out, err)
        assert err.count("\n") == 1 and err.startswith("orch: client.server: ") and "Traceback" not in err, (verb, err)
        assert out == ""


@pytest.mark.parametrize("pair", ["NOVALUE", "=x", "="])
def test_run_env_without_key_or_value_is_one_line_exit_2(cli: Any, pair: str) -> None:
    code, out, err = cli(["run", "--env", "A=1", "--env", pair, "--server", "127.0.0.1:9", "echo"])
    assert (code, out) == (2, "")
    assert err == f"orch: --env takes KEY=VALUE, not {pair!r}\n"


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600), ("90s", 90), ("1h30m", 5400), ("2d", 172800),
                                                ("1d2h3m4s", 93784), ("1.5h", 5400), ("45", 45), ("0.25", 0.25),
                                                ("0s", 0), (" 2H ", 7200)])
def test_run_in_takes_durations_as_people_write_them(text: str, seconds: float) -> None:
    from orch.cli import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("args", "said"), [
    (["--in", "10x"], "--in takes a duration like 90s, 10m, 1h30m or 2d, not '10x'"),
    (["--in", "m"], "--in takes a duration like 90s, 10m, 1h30m or 2d, not 'm'"),
    (["--in", "30m1h"], "--in takes a duration like 90s, 10m, 1h30m or 2d, not '30m1h'"),
    (["--in", "-5m"], "--in takes a duration like 90s, 10m, 1h30m or 2d, not '-5m'"),
    (["--in", "367d"], "--in 367d is more than 366 days"),
    (["--at", "2026-12-24T08:00:00"], "--at '2026-12-24T08:00:00' has no UTC offset: add Z or +HH:MM"),
    (["--at", "next tuesday"], "--at must be an RFC 3339 time with a UTC offset, e.g. 2026-12-24T08:00:00+01:00"),
    (["--at", "2026-02-30T08:00:00Z"], "--at '2026-02-30T08:00:00Z' is not a date of the calendar"),
    (["--in", "5m", "--at", "2026-12-24T08:00:00Z"], "--in and --at are exclusive: give one of them"),
])
def test_run_with_a_bad_in_or_at_is_one_line_exit_2(cli: Any, args: list[str], said: str) -> None:
    code, out, err = cli(["run", *args, "--server", "127.0.0.1:9", "--", "./report.sh"])
    assert (code, out) == (2, "")
    assert err.startswith(f"orch: {said}") and err.count("\n") == 1 and "Traceback" not in err, err


def test_status_says_when_a_scheduled_job_is_due() -> None:
    job = {"id": 9, "state": "scheduled", "name": None, "spec": {"command": ["./report.sh"]}, "queue": "default",
           "priority": 0, "attempt": 0, "max_attempts": 3, "created_at": "2026-12-24T06:50:00.000Z",
           "started_at": None, "finished_at": None, "retry_at": None, "scheduled_for": "2026-12-24T07:00:00.000Z",
           "worker": None, "exit_code": None, "error": None, "attempts": []}
    assert "  due at:    2026-12-24 07:00:00.000 UTC  (scheduled: then it is queued)" in format_status(job, []).splitlines()
