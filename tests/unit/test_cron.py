"""Cron schedules on plain data (orch/core/cron.py), with the clock injected: tick times across both DST
transitions, catch-up and missed ticks, the overlap policy, what a tick's job carries, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orch.core.cron import (
    MAX_MISSED_COUNTED,
    Overlap,
    TickAction,
    check_schedule,
    next_ticks,
    on_tick,
    plan,
    tick_key,
    tick_spec,
)
from orch.core.errors import ValidationError
from orch.core.spec import parse_spec

NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def _at(zone: Any, *parts: int) -> float:
    return datetime(*parts, tzinfo=zone).timestamp()  # type: ignore[misc]


def _local(t: float, zone: Any) -> str:
    return datetime.fromtimestamp(t, zone).strftime("%Y-%m-%d %H:%M %Z")


def _every_day(cron: str, tz: str, days: int, start: float) -> list[float]:
    """The ticks a scheduler firing once a minute (the clock moved on by a minute each time) fires over ``days``."""
    s = check_schedule("daily", {"cron": cron, "tz": tz, "job": {"command": ["true"]}})
    fired: list[float] = []
    last, now = start, start
    while now < start + days * 86400:
        now += 60
        p = plan(s, last, now)
        fired += p.fire
        assert p.missed == 0
        last = now
    return fired


def test_a_daily_0230_runs_once_on_the_day_0230_is_skipped_and_once_on_the_other_days() -> None:
    start = _at(NY, 2026, 3, 6, 12, 0)  # 2026-03-08: clocks go from 02:00 to 03:00 in New York
    fired = _every_day("30 2 * * *", "America/New_York", 4, start)
    assert [_local(t, NY) for t in fired] == ["2026-03-07 02:30 EST", "2026-03-08 03:00 EDT",
                                             "2026-03-09 02:30 EDT", "2026-03-10 02:30 EDT"]
    berlin = _every_day("30 2 * * *", "Europe/Berlin", 3, _at(BERLIN, 2026, 3, 28, 12, 0))  # the 29th skips 02:30
    assert [_local(t, BERLIN) for t in berlin] == ["2026-03-29 03:00 CEST", "2026-03-30 02:30 CEST",
                                                  "2026-03-31 02:30 CEST"]


def test_a_daily_0130_runs_once_not_twice_on_the_day_0130_repeats() -> None:
    start = _at(NY, 2026, 10, 31, 12, 0)  # 2026-11-01: 01:00-02:00 comes twice in New York
    fired = _every_day("30 1 * * *", "America/New_York", 3, start)
    assert [_local(t, NY) for t in fired] == ["2026-11-01 01:30 EDT", "2026-11-02 01:30 EST",
                                             "2026-11-03 01:30 EST"]
    # An hourly job is another matter: the hour does happen twice, and so do its runs (as in Debian's cron).
    hourly = next_ticks("0 * * * *", "America/New_York", _at(NY, 2026, 11, 1, 0, 30), 3)
    assert [t - hourly[0] for t in hourly] == [0, 3600, 7200]


def test_ticks_are_in_the_zone_given_and_utc_by_default() -> None:
    t0 = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
    assert next_ticks("0 9 * * *", "UTC", t0, 1) == [t0 + 9 * 3600]
    assert next_ticks("0 9 * * *", "Europe/Berlin", t0, 1) == [t0 + 7 * 3600]  # 09:00 CEST is 07:00 UTC
    assert next_ticks("*/15 * * * * *", "UTC", t0 + 1, 3) == [t0 + 15, t0 + 30, t0 + 45]  # seconds first


def test_after_downtime_ticks_within_the_catch_up_window_fire_and_older_ones_are_missed_never_fired() -> None:
    s = check_schedule("m", {"cron": "* * * * *", "catchup": 600, "job": {"command": ["true"]}})
    last = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    p = plan(s, last, last + 3600 + 30)  # down for an hour
    assert len(p.fire) == 10 and p.fire[0] == last + 3060 and p.fire[-1] == last + 3600  # from now - 600 on
    assert p.missed == 50 and p.first_missed == last + 60
    assert p.next_at == last + 3660
    on_time = plan(s, last, last + 60.002)
    assert on_time.fire == [last + 60] and on_time.missed == 0
    assert plan(s, last, last + 59).fire == []


def test_a_week_down_at_one_tick_a_second_counts_its_missed_ticks_without_walking_them_all() -> None:
    s = check_schedule("fast", {"cron": "* * * * * *", "catchup": 5, "job": {"command": ["true"]}})
    last = 1_800_000_000.0
    p = plan(s, last, last + 7 * 86400)
    assert p.more_missed and p.missed >= MAX_MISSED_COUNTED
    assert len(p.fire) == 6 and p.fire[-1] == last + 7 * 86400  # the window's ticks, its edge included
    assert p.next_at == last + 7 * 86400 + 1


@pytest.mark.parametrize("overlap, running, waiting, action", [
    (Overlap.SKIP, False, False, TickAction.FIRE),
    (Overlap.SKIP, True, False, TickAction.SKIP),
    (Overlap.ALLOW, True, False, TickAction.FIRE),
    (Overlap.CANCEL_RUNNING, True, False, TickAction.CANCEL_AND_FIRE),
    (Overlap.CANCEL_RUNNING, False, False, TickAction.FIRE),
    (Overlap.QUEUE_ONE, True, False, TickAction.FIRE_AFTER),
    (Overlap.QUEUE_ONE, True, True, TickAction.SKIP),  # one waits already: no second
])
def test_the_overlap_policy_decides_a_tick_while_the_previous_job_is_going(
        overlap: Overlap, running: bool, waiting: bool, action: TickAction) -> None:
    assert on_tick(overlap, running, waiting) is action


def test_a_ticks_job_carries_the_schedule_its_time_and_a_key_of_its_own() -> None:
    job = {"command": ["./backup.sh"], "env": {"A": "1"}, "labels": {"team": "ops"}}
    t = datetime(2026, 12, 24, 7, 0, tzinfo=UTC).timestamp()
    spec = tick_spec("nightly", job, t, t + 0.2)
    assert spec["env"] == {"A": "1", "ORCH_SCHEDULE": "nightly", "ORCH_SCHEDULED_FOR": "2026-12-24T07:00:00Z"}
    assert spec["labels"] == {"team": "ops", "schedule": "nightly"}
    assert spec["idempotency_key"] == tick_key("nightly", t) == "schedule:nightly:2026-12-24T07:00:00Z"
    assert "idempotency_key" not in tick_spec("nightly", job, t, t, manual=True)
    assert tick_spec("nightly", job, t, t, after=41)["depends_on"] == [{"job": 41, "on": "completion"}]
    parse_spec(spec)
    assert job == {"command": ["./backup.sh"], "env": {"A": "1"}, "labels": {"team": "ops"}}  # left as it was


@pytest.mark.parametrize("body, field", [
    ({"job": {"command": ["true"]}}, "cron"),
    ({"cron": "* * * * *"}, "job"),
    ({"cron": "61 * * * *", "job": {"command": ["true"]}}, "cron"),
    ({"cron": "* * *", "job": {"command": ["true"]}}, "cron"),
    ({"cron": "0 0 30 2 *", "job": {"command": ["true"]}}, "cron"),  # February 30th: never
    ({"cron": "* * * * *", "tz": "Mars/Olympus", "job": {"command": ["true"]}}, "tz"),
    ({"cron": "* * * * *", "tz": "../../etc/passwd", "job": {"command": ["true"]}}, "tz"),
    ({"cron": "* * * * *", "overlap": "maybe", "job": {"command": ["true"]}}, "overlap"),
    ({"cron": "* * * * *", "catchup": -1, "job": {"command": ["true"]}}, "catchup"),
    ({"cron": "* * * * *", "job": {"command": []}}, "job.command"),
    ({"cron": "* * * * *", "job": {"command": ["true"], "delay": 5}}, "job.delay"),
    ({"cron": "* * * * *", "job": {"command": ["true"], "idempotency_key": "k"}}, "job.idempotency_key"),
    ({"cron": "* * * * *", "job": {"command": ["true"]}, "when": "now"}, "when"),
])
def test_a_bad_schedule_is_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        check_schedule("s", body)
    assert e.value.field == field


def test_a_patch_changes_only_what_it_names() -> None:
    s = check_schedule("s", {"cron": "0 * * * *", "tz": "Europe/Berlin", "overlap": "allow",
                             "job": {"command": ["true"]}})
    t = check_schedule("s", {"paused": True}, partial=s)
    assert (t.cron, t.tz, t.overlap, t.paused, dict(t.job)) == ("0 * * * *", "Europe/Berlin", Overlap.ALLOW, True,
                                                               {"command": ["true"]})
    assert timedelta(seconds=t.catchup) == timedelta(minutes=1)
