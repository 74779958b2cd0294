"""Rate limits as plain data: the rate syntax, and the token bucket's reservations (orch/core/rates.py)."""

from __future__ import annotations

import itertools

import pytest

from orch.core.errors import ValidationError
from orch.core.rates import Rate, check_rate_keys, parse_rate, reserve


@pytest.mark.parametrize("text, count, per", [
    ("100/m", 100, 60.0), ("10/s", 10, 1.0), ("5/10s", 5, 10.0), ("1000/h", 1000, 3600.0), ("1/d", 1, 86400.0),
    ("3 / min", 3, 60.0), ("7/2hour", 7, 7200.0),
])
def test_rates_read_as_count_per_period(text: str, count: int, per: float) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.per, rate.burst) == (count, per, 1)
    assert parse_rate(rate.text()) == rate


@pytest.mark.parametrize("text", ["", "100", "0/s", "10/y", "-1/s", "1/0s", "1/1000d", "ten/s", "1e3/s", "10/s/s"])
def test_a_rate_that_is_not_one_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ValidationError) as e:
        parse_rate(text)
    assert e.value.field == "rate"


@pytest.mark.parametrize("burst", [0, -1, True, 2.5, "3", 10**7])
def test_a_burst_is_a_whole_number_from_one(burst: object) -> None:
    with pytest.raises(ValidationError) as e:
        parse_rate("10/s", burst)  # type: ignore[arg-type]
    assert e.value.field == "burst"


def test_rate_keys_are_limit_names_each_named_once() -> None:
    assert check_rate_keys(["api-calls", "db.writes"]) == ("api-calls", "db.writes")
    for bad in ("api", ["a", "a"], ["bad name"], [""], [1], ["x"] * 17):
        with pytest.raises(ValidationError) as e:
            check_rate_keys(bad)
        assert e.value.field == "rate_keys"


def _starts(rate: Rate, n: int, now: float = 1000.0) -> list[float]:
    """The start times ``n`` jobs asking at once at ``now`` are given."""
    tat: float | None = None
    out = []
    for _ in range(n):
        at, _holder, new = reserve({"k": rate}, {"k": tat}, ["k"], now)
        tat = new["k"]
        out.append(at)
    return out


def test_starts_asked_at_once_are_spaced_at_the_rate() -> None:
    starts = _starts(parse_rate("10/s"), 100)
    assert starts[0] == 1000.0
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(abs(g - 0.1) < 1e-9 for g in gaps)
    assert starts[-1] - starts[0] == pytest.approx(9.9)


def test_a_burst_lets_that_many_start_at_once_then_the_rate_holds() -> None:
    starts = _starts(parse_rate("10/s", 10), 100)
    assert starts[:10] == [1000.0] * 10
    assert starts[-1] - starts[0] == pytest.approx(9.0)
    # In any window of one second, never more than burst + rate starts.
    for s in starts:
        assert sum(1 for t in starts if s <= t < s + 1.0) <= 20


def test_a_bucket_left_alone_fills_again_up_to_its_burst() -> None:
    rate = parse_rate("1/s", 3)
    tats: dict[str, float | None] = {"k": None}
    for _ in range(3):
        at, holder, new = reserve({"k": rate}, tats, ["k"], 0.0)
        assert (at, holder) == (0.0, None)
        tats = dict(new)
    at, holder, _ = reserve({"k": rate}, tats, ["k"], 0.0)
    assert (at, holder) == (1.0, "k")  # the fourth waits for a token
    at, holder, _ = reserve({"k": rate}, tats, ["k"], 100.0)  # long after: full again, never more than the burst
    assert (at, holder) == (100.0, None)
    later = tats
    for _ in range(3):
        at, _, later = reserve({"k": rate}, later, ["k"], 100.0)  # type: ignore[assignment]
    assert at == 100.0
    at, holder, _ = reserve({"k": rate}, later, ["k"], 100.0)
    assert (at, holder) == (101.0, "k")


def test_a_job_naming_several_limits_starts_when_all_allow_it_and_uses_each() -> None:
    limits = {"fast": parse_rate("10/s"), "slow": parse_rate("1/s")}
    at, holder, new = reserve(limits, {"fast": None, "slow": 5.0}, ["fast", "slow"], 1.0)
    assert (at, holder) == (5.0, "slow")
    assert new == {"fast": pytest.approx(5.1), "slow": pytest.approx(6.0)}


def test_a_name_without_a_limit_holds_nothing() -> None:
    at, holder, new = reserve({}, {}, ["gone"], 7.0)
    assert (at, holder, new) == (7.0, None, {})
