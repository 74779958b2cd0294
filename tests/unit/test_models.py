"""Unit tests of the domain: the job state machine, the retry policy and job spec validation."""

from __future__ import annotations

import itertools

import pytest

from orch.core.errors import Conflict, IllegalTransition, ValidationError
from orch.core.retry import RetryPolicy
from orch.core.spec import parse_spec
from orch.core.states import REPLAYABLE, TERMINAL, TRANSITIONS, JobState, Outcome, check_transition, sources_of
from orch.core.times import iso

# --------------------------------------------------------------------------- state machine

ALLOWED = sorted((f.value, t.value) for f, targets in TRANSITIONS.items() for t in targets)
FORBIDDEN = sorted(
    (f.value, t.value) for f, t in itertools.product(JobState, JobState) if t not in TRANSITIONS[f]
)


def test_every_state_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("frm", "to"), ALLOWED)
def test_allowed_transitions_pass(frm: str, to: str) -> None:
    check_transition(frm, to)
    check_transition(JobState(frm), JobState(to))


@pytest.mark.parametrize(
    ("frm", "to"),
    [
        ("queued", "succeeded"),
        ("queued", "failed"),
        ("queued", "retrying"),
        ("queued", "queued"),
        ("retrying", "running"),
        ("retrying", "succeeded"),
        ("running", "running"),
        ("succeeded", "queued"),
        ("failed", "retrying"),
        ("cancelled", "running"),
    ],
)
def test_illegal_transitions_raise(frm: str, to: str) -> None:
    assert (frm, to) in FORBIDDEN  # the sample really is outside the table
    with pytest.raises(IllegalTransition, match=f"{frm} -> {to}"):
        check_transition(frm, to)


@pytest.mark.parametrize("terminal", sorted(s.value for s in TERMINAL))
def test_ended_states_lead_nowhere_but_a_replay_to_queued_or_blocked(terminal: str) -> None:
    """An ended job runs nothing; a failed, cancelled or skipped one may only be replayed (orch retry: to queued,
    or blocked while its dependencies are undecided; a skipped one un-skipped likewise); a succeeded one is done
    for good."""
    assert JobState(terminal).terminal
    way_out = {JobState.QUEUED, JobState.BLOCKED} if JobState(terminal) in REPLAYABLE else set()
    assert TRANSITIONS[JobState(terminal)] == way_out
    for to in JobState:
        if to not in way_out:
            with pytest.raises(IllegalTransition):
                check_transition(terminal, to)


def test_a_replay_queues_failed_cancelled_and_skipped_jobs_and_refuses_the_rest_naming_the_state() -> None:
    from orch.core.decisions import REPLAYED_BY, replay

    assert REPLAYABLE == {JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED}
    for state in REPLAYABLE:
        move = replay(5, state, "alice@laptop")
        assert move.to is JobState.QUEUED and move.reason == REPLAYED_BY + "alice@laptop"
        check_transition(state, move.to)
        blocked = replay(5, state, "alice@laptop", pending=2)  # dependencies undecided again: it waits on them
        assert blocked.to is JobState.BLOCKED
        check_transition(state, blocked.to)
    with pytest.raises(Conflict, match="job 5 depends on job 3, which ended failed: replay that one"):
        replay(5, JobState.SKIPPED, "x", failed_dep=(3, "failed"))
    with pytest.raises(Conflict, match="job 5 has succeeded"):
        replay(5, JobState.SUCCEEDED, "x")
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.SCHEDULED, JobState.BLOCKED):
        with pytest.raises(Conflict, match=f"job 5 is {state}, not ended"):
            replay(5, state, "x")


def test_terminal_set_is_succeeded_failed_cancelled_skipped() -> None:
    assert {s.value for s in JobState if s.terminal} == {"succeeded", "failed", "cancelled", "skipped"}


def test_unknown_state_name_is_rejected() -> None:
    with pytest.raises(ValueError):
        check_transition("queued", "exploded")


def test_sources_of_matches_the_table() -> None:
    assert sources_of(JobState.QUEUED) == ("blocked", "cancelled", "failed", "retrying", "running", "scheduled",
                                           "skipped")
    assert sources_of(JobState.RUNNING) == ("queued",)
    assert set(sources_of(JobState.CANCELLED)) == {"blocked", "queued", "retrying", "running", "scheduled"}
    assert set(sources_of(JobState.SKIPPED)) == {"blocked", "queued"}  # a dependency failed; a full key


def test_a_scheduled_job_is_queued_when_due_or_cancelled_and_nothing_else() -> None:
    """``scheduled`` (a job whose run_at or delay is still ahead) goes to queued once due, or is cancelled; no
    other state leads to it but blocked (a submit's first state, or a delayed job's once its dependencies are
    met), and it is not an end."""
    assert TRANSITIONS[JobState.SCHEDULED] == {JobState.QUEUED, JobState.CANCELLED}
    assert sources_of(JobState.SCHEDULED) == ("blocked",)
    assert not JobState.SCHEDULED.terminal
    for to in ("running", "retrying", "succeeded", "failed", "scheduled"):
        with pytest.raises(IllegalTransition, match=f"scheduled -> {to}"):
            check_transition("scheduled", to)


def test_a_submit_starts_scheduled_only_while_its_time_is_ahead() -> None:
    from orch.core.decisions import DUE, submitted

    now = 1_800_000_000.0
    assert submitted(None, now) is JobState.QUEUED
    assert submitted(now + 0.001, now) is JobState.SCHEDULED
    assert submitted(now, now) is JobState.QUEUED  # delay 0: queued at once
    assert submitted(now - 3600, now) is JobState.QUEUED  # a run_at already past
    assert DUE.to is JobState.QUEUED and DUE.reason
    check_transition(JobState.SCHEDULED, DUE.to)


# --------------------------------------------------------------------------- retry policy


def test_delay_grows_exponentially_without_jitter() -> None:
    p = RetryPolicy(base=1.0, factor=2.0, cap=1000.0, jitter=0.0)
    assert [p.delay(a, 0.5) for a in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_delay_is_capped() -> None:
    p = RetryPolicy(base=1.0, factor=3.0, cap=10.0, jitter=0.0)
    assert p.delay(2, 0.5) == 3.0
    assert p.delay(3, 0.5) == 9.0
    assert p.delay(4, 0.5) == 10.0
    assert p.delay(50, 0.5) == 10.0  # no overflow on big attempt numbers either


def test_delay_jitter_bounds() -> None:
    p = RetryPolicy(base=10.0, factor=2.0, cap=1000.0, jitter=0.2)
    assert p.delay(1, 0.0) == pytest.approx(8.0)  # -20%
    assert p.delay(1, 0.5) == pytest.approx(10.0)  # the middle
    assert p.delay(1, 0.999999) == pytest.approx(12.0, rel=1e-5)  # -> +20%
    for r in (0.0, 0.1, 0.37, 0.5, 0.9, 0.999999):
        assert 8.0 <= p.delay(1, r) < 12.0


def test_delay_jitter_applies_to_the_capped_value_and_is_never_negative() -> None:
    p = RetryPolicy(base=1.0, factor=2.0, cap=5.0, jitter=1.0)
    assert p.delay(10, 0.0) == 0.0
    assert p.delay(10, 0.999999) == pytest.approx(10.0, rel=1e-5)


def test_retries_until_max_attempts() -> None:
    p = RetryPolicy(max_attempts=3)
    assert p.retries(Outcome.FAILED, 1, 1)
    assert p.retries(Outcome.FAILED, 1, 2)
    assert not p.retries(Outcome.FAILED, 1, 3)
    assert not p.retries(Outcome.FAILED, 1, 4)


def test_single_attempt_never_retries() -> None:
    p = RetryPolicy(max_attempts=1)
    for outcome in (Outcome.FAILED, Outcome.TIMED_OUT, Outcome.LOST):
        assert not p.retries(outcome, 1, 1)


def test_success_and_cancel_never_retry() -> None:
    p = RetryPolicy(max_attempts=5)
    assert not p.retries(Outcome.SUCCEEDED, 0, 1)
    assert not p.retries(Outcome.CANCELLED, None, 1)


def test_retry_on_exit_limits_which_codes_retry() -> None:
    p = RetryPolicy(max_attempts=5, retry_on_exit=(75, 99))
    assert p.retries(Outcome.FAILED, 75, 1)
    assert p.retries(Outcome.FAILED, 99, 1)
    assert not p.retries(Outcome.FAILED, 1, 1)
    assert not p.retries(Outcome.FAILED, 2, 1)


def test_every_nonzero_exit_retries_when_retry_on_exit_is_unset() -> None:
    p = RetryPolicy(max_attempts=5, retry_on_exit=None)
    for code in (1, 2, 75, 137, 255):
        assert p.retries(Outcome.FAILED, code, 1)


@pytest.mark.parametrize("outcome", [Outcome.TIMED_OUT, Outcome.LOST])
def test_timeout_and_lost_always_retry_while_attempts_remain(outcome: Outcome) -> None:
    p = RetryPolicy(max_attempts=3, retry_on_exit=(75,))
    assert p.retries(outcome, None, 1)
    assert p.retries(outcome, 1, 2)  # whatever the exit code, retry_on_exit does not apply
    assert not p.retries(outcome, None, 3)


# --------------------------------------------------------------------------- job specs


def test_command_form() -> None:
    spec = parse_spec({"command": ["echo", "hi there"]})
    assert spec.argv == ("echo", "hi there")
    assert spec.kind == "command"
    assert spec.queue == "default"
    assert spec.priority == 0
    assert spec.timeout is None
    assert spec.max_attempts is None
    assert dict(spec.env) == {}


def test_shell_form_runs_under_sh() -> None:
    spec = parse_spec({"shell": "echo $HOME | wc -c"})
    assert spec.argv == ("/bin/sh", "-c", "echo $HOME | wc -c")
    assert spec.kind == "shell"
    assert spec.to_json()["shell"] == "echo $HOME | wc -c"


def test_seed_task_form() -> None:
    spec = parse_spec({"task": "echo", "args": ["hello"]})
    assert spec.argv == ("echo", "hello")
    assert spec.kind == "task"
    assert parse_spec({"task": "true"}).argv == ("true",)


def test_optional_fields_are_kept() -> None:
    spec = parse_spec({
        "command": ["./build.sh"],
        "queue": "gpu.large-1",
        "priority": -1000,
        "env": {"MODE": "fast", "_X1": ""},
        "cwd": "/tmp",
        "timeout": 2.5,
        "max_attempts": 7,
        "labels": {"team": "infra", "ci:run": "42"},
        "name": "nightly build",
        "backoff": {"base": 0.5, "factor": 3, "cap": 60, "jitter": 0.1},
        "retry_on_exit": [75, 255],
    })
    assert spec.queue == "gpu.large-1"
    assert spec.priority == -1000
    assert dict(spec.env) == {"MODE": "fast", "_X1": ""}
    assert spec.cwd == "/tmp"
    assert spec.timeout == 2.5
    assert spec.max_attempts == 7
    assert dict(spec.labels) == {"team": "infra", "ci:run": "42"}
    assert spec.name == "nightly build"
    assert dict(spec.backoff) == {"base": 0.5, "factor": 3.0, "cap": 60.0, "jitter": 0.1}
    assert spec.retry_on_exit == (75, 255)
    assert parse_spec({"command": ["x"], "priority": 1000}).priority == 1000
    assert parse_spec({"command": ["x"], "timeout": 3}).timeout == 3.0


@pytest.mark.parametrize(("text", "epoch"), [
    ("2026-12-24T08:00:00+01:00", 1798095600.0),
    ("2026-12-24T07:00:00Z", 1798095600.0),
    ("2026-12-24t07:00:00z", 1798095600.0),
    ("2026-12-24T02:30:00-04:30", 1798095600.0),
    ("2026-12-24T07:00:00.250Z", 1798095600.25),
    ("2016-12-31T23:59:60Z", 1483228800.0),  # a leap second: the second after :59
    ("1970-01-01T00:00:00-00:00", 0.0),
    ("2028-02-29T00:00:00Z", 1835395200.0),
])
def test_run_at_is_rfc_3339_with_an_offset_as_unix_seconds(text: str, epoch: float) -> None:
    from datetime import datetime

    spec = parse_spec({"command": ["x"], "run_at": text})
    assert spec.run_at_ts == pytest.approx(epoch)
    if ":60" not in text:
        assert spec.run_at_ts == pytest.approx(datetime.fromisoformat(text.upper()).timestamp())
    assert spec.to_json()["run_at"] == text  # kept as written
    assert spec.due(0.0) == spec.run_at_ts  # a time is a time, whenever it was submitted


def test_delay_is_kept_as_written_and_due_that_long_after_the_submit() -> None:
    spec = parse_spec({"command": ["x"], "delay": 90})
    assert spec.to_json() == {"command": ["x"], "delay": 90} and isinstance(spec.to_json()["delay"], int)
    assert spec.due(1000.0) == 1090.0
    assert parse_spec({"command": ["x"], "delay": 0.5}).due(1000.0) == 1000.5
    assert parse_spec({"command": ["x"], "delay": 0}).due(1000.0) == 1000.0
    assert parse_spec({"command": ["x"], "delay": 366 * 86400}).delay == 366 * 86400
    assert parse_spec({"command": ["x"]}).due(1000.0) is None


def test_a_run_at_without_an_offset_says_so() -> None:
    with pytest.raises(ValidationError, match="no UTC offset") as info:
        parse_spec({"command": ["x"], "run_at": "2026-12-24T08:00:00"}, "jobs[2].")
    assert info.value.field == "jobs[2].run_at"


def test_spec_survives_a_json_round_trip() -> None:
    from orch.core.spec import spec_from_json

    spec = parse_spec({"shell": "exit 3", "queue": "q1", "priority": 5, "env": {"A": "1"},
                       "timeout": 9, "labels": {"k": "v"}, "name": "n", "backoff": {"base": 2},
                       "retry_on_exit": [3], "run_at": "2026-12-24T08:00:00+01:00"})
    back = spec_from_json(spec.to_json())
    assert back.run_at_ts == spec.run_at_ts == 1798095600.0
    assert spec_from_json(parse_spec({"command": ["x"], "delay": 2.5}).to_json()).delay == 2.5
    assert back.argv == spec.argv
    assert back.to_json() == spec.to_json()


BAD_SPECS = [
    # (body, field named by the error)
    ({"command": ["x"], "colour": "red"}, "colour"),
    ({}, "command"),
    ({"command": ["x"], "shell": "x"}, "command"),
    ({"command": []}, "command"),
    ({"command": "echo hi"}, "command"),
    ({"command": [""]}, "command[0]"),
    ({"command": ["echo", 3]}, "command[1]"),
    ({"command": ["echo", "a\x00b"]}, "command[1]"),
    ({"shell": ""}, "shell"),
    ({"shell": "   "}, "shell"),
    ({"shell": ["ls"]}, "shell"),
    ({"task": ""}, "task"),
    ({"task": 5}, "task"),
    ({"task": "echo", "args": "hello"}, "args"),
    ({"task": "echo", "args": ["ok", None]}, "args[1]"),
    ({"task": "echo", "args": [1]}, "args[0]"),
    ({"command": ["echo"], "args": ["x"]}, "args"),
    ({"command": ["x"], "priority": True}, "priority"),
    ({"command": ["x"], "priority": 1.5}, "priority"),
    ({"command": ["x"], "priority": "1"}, "priority"),
    ({"command": ["x"], "priority": 1001}, "priority"),
    ({"command": ["x"], "priority": -1001}, "priority"),
    ({"command": ["x"], "max_attempts": True}, "max_attempts"),
    ({"command": ["x"], "max_attempts": 0}, "max_attempts"),
    ({"command": ["x"], "max_attempts": 101}, "max_attempts"),
    ({"command": ["x"], "timeout": 0}, "timeout"),
    ({"command": ["x"], "timeout": -1}, "timeout"),
    ({"command": ["x"], "timeout": True}, "timeout"),
    ({"command": ["x"], "timeout": "10"}, "timeout"),
    ({"command": ["x"], "timeout": float("inf")}, "timeout"),
    ({"command": ["x"], "timeout": float("nan")}, "timeout"),
    ({"command": ["x"], "queue": ""}, "queue"),
    ({"command": ["x"], "queue": "has space"}, "queue"),
    ({"command": ["x"], "queue": "-leading-dash"}, "queue"),
    ({"command": ["x"], "queue": "q" * 65}, "queue"),
    ({"command": ["x"], "queue": 7}, "queue"),
    ({"command": ["x"], "queue": "default\n"}, "queue"),
    ({"command": ["x"], "env": ["A=1"]}, "env"),
    ({"command": ["x"], "env": {"1BAD": "v"}}, "env.1BAD"),
    ({"command": ["x"], "env": {"A-B": "v"}}, "env.A-B"),
    ({"command": ["x"], "env": {"A=B": "v"}}, "env.A=B"),
    ({"command": ["x"], "env": {"A\n": "v"}}, "env.A\n"),
    ({"command": ["x"], "env": {"A": 1}}, "env.A"),
    ({"command": ["x"], "labels": "team=infra"}, "labels"),
    ({"command": ["x"], "labels": {"bad key": "v"}}, "labels.bad key"),
    ({"command": ["x"], "labels": {"team": 5}}, "labels.team"),
    ({"command": ["x"], "labels": {"team": "v" * 257}}, "labels.team"),
    ({"command": ["x"], "cwd": ""}, "cwd"),
    ({"command": ["x"], "cwd": 5}, "cwd"),
    ({"command": ["x"], "name": ""}, "name"),
    ({"command": ["x"], "name": "n" * 201}, "name"),
    ({"command": ["x"], "backoff": 5}, "backoff"),
    ({"command": ["x"], "backoff": {"delay": 1}}, "backoff.delay"),
    ({"command": ["x"], "backoff": {"base": -1}}, "backoff.base"),
    ({"command": ["x"], "backoff": {"base": "1"}}, "backoff.base"),
    ({"command": ["x"], "backoff": {"jitter": 1.5}}, "backoff.jitter"),
    ({"command": ["x"], "backoff": {"factor": 0.5}}, "backoff.factor"),
    ({"command": ["x"], "backoff": {"factor": "2"}}, "backoff.factor"),
    ({"command": ["x"], "backoff": {"factor": None}}, "backoff.factor"),
    ({"command": ["x"], "retry_on_exit": 1}, "retry_on_exit"),
    ({"command": ["x"], "retry_on_exit": [0]}, "retry_on_exit"),
    ({"command": ["x"], "retry_on_exit": [256]}, "retry_on_exit"),
    ({"command": ["x"], "retry_on_exit": [True]}, "retry_on_exit"),
    ({"command": ["x"], "run_at": "2026-12-24T08:00:00"}, "run_at"),  # no offset: a local time of no known zone
    ({"command": ["x"], "run_at": "2026-12-24 08:00:00"}, "run_at"),
    ({"command": ["x"], "run_at": "2026-12-24 08:00:00Z"}, "run_at"),  # RFC 3339 says T
    ({"command": ["x"], "run_at": "2026-12-24T08:00Z"}, "run_at"),  # no seconds
    ({"command": ["x"], "run_at": "2026-12-24"}, "run_at"),
    ({"command": ["x"], "run_at": "2026-02-30T08:00:00Z"}, "run_at"),
    ({"command": ["x"], "run_at": "2026-13-01T08:00:00Z"}, "run_at"),
    ({"command": ["x"], "run_at": "0000-01-01T00:00:00Z"}, "run_at"),
    ({"command": ["x"], "run_at": "2026-12-24T24:00:00Z"}, "run_at"),
    ({"command": ["x"], "run_at": "2026-12-24T12:99:00Z"}, "run_at"),
    ({"command": ["x"], "run_at": "2026-12-24T08:00:00+24:00"}, "run_at"),
    ({"command": ["x"], "run_at": "2026-12-24T08:00:00+0100"}, "run_at"),
    ({"command": ["x"], "run_at": "tomorrow"}, "run_at"),
    ({"command": ["x"], "run_at": ""}, "run_at"),
    ({"command": ["x"], "run_at": "2026-12-24T08:00:00." + "0" * 64 + "Z"}, "run_at"),
    ({"command": ["x"], "run_at": "\u0662\u0660\u0662\u0666-12-24T08:00:00Z"}, "run_at"),  # digits, not ASCII ones
    ({"command": ["x"], "run_at": 1798095600}, "run_at"),
    ({"command": ["x"], "run_at": None}, "run_at"),
    ({"command": ["x"], "delay": -1}, "delay"),
    ({"command": ["x"], "delay": 366 * 86400 + 1}, "delay"),
    ({"command": ["x"], "delay": float("inf")}, "delay"),
    ({"command": ["x"], "delay": float("nan")}, "delay"),
    ({"command": ["x"], "delay": True}, "delay"),
    ({"command": ["x"], "delay": "10"}, "delay"),
    ({"command": ["x"], "delay": None}, "delay"),
    ({"command": ["x"], "delay": 10, "run_at": "2026-12-24T08:00:00Z"}, "delay"),  # one or the other
]


@pytest.mark.parametrize(("body", "field"), BAD_SPECS, ids=[repr(b)[:60] for b, _ in BAD_SPECS])
def test_bad_spec_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(body)
    assert info.value.field == field
    assert info.value.message
    assert info.value.http_status == 400


@pytest.mark.parametrize(("body", "field"), BAD_SPECS[:12], ids=[repr(b)[:60] for b, _ in BAD_SPECS[:12]])
def test_bad_spec_in_a_batch_gets_the_prefix(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(body, "jobs[3].")
    assert info.value.field == "jobs[3]." + field


@pytest.mark.parametrize("body", [None, [], "echo hi", 5])
def test_a_job_must_be_an_object(body: object) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(body)
    assert info.value.field is None
    with pytest.raises(ValidationError) as info:
        parse_spec(body, "jobs[3].")
    assert info.value.field == "jobs[3]"


def test_error_json_shape() -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec({"command": []})
    assert info.value.to_json() == {
        "error": {"code": "invalid", "message": info.value.message, "field": "command"}
    }


def test_iso_is_datetimes_text_with_milliseconds() -> None:
    import random
    from datetime import UTC, datetime

    def reference(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    rng = random.Random(7)
    values = [rng.uniform(0, 4e9) for _ in range(20_000)]
    # Edges of the microsecond rounding and of the millisecond cut, and seconds shared by many values.
    values += [int(v) + k / 1e6 for v in values[:500] for k in (0, 499, 500, 501, 999_499, 999_500, 999_999)]
    values += [1_800_000_000.9999995, 1_800_000_000.9999996, 1_799_999_999.9999999, 0.0, 1.0]
    assert [iso(v) for v in values] == [reference(v) for v in values]
    assert iso(None) is None
