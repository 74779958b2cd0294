"""The pure part of concurrency limits by key (orch/core/concurrency.py): the spec's field, and what a submit to a
full key does under each on_limit, on plain data."""

from __future__ import annotations

import pytest

from orch.core.concurrency import Concurrency, Holder, OnLimit, check_concurrency, skips, to_cancel
from orch.core.errors import ValidationError
from orch.core.retry import RetryPolicy
from orch.core.spec import parse_spec, spec_view, view_defaults


def test_the_field_takes_a_key_a_limit_and_a_policy_and_keeps_its_submitted_form() -> None:
    assert check_concurrency({"key": "tenant-7", "limit": 2}) == Concurrency("tenant-7", 2, OnLimit.QUEUE)
    assert check_concurrency({"key": "a b/c@d", "limit": 2.0, "on_limit": "skip_new"}) == Concurrency(
        "a b/c@d", 2, OnLimit.SKIP_NEW)
    spec = parse_spec({"command": ["true"], "concurrency": {"key": "k", "limit": 1, "on_limit": "queue"}})
    assert spec.to_json()["concurrency"] == {"key": "k", "limit": 1}  # the default is left out, as any
    view = spec_view(spec.to_json(), view_defaults(RetryPolicy()))
    assert view["concurrency"] == {"key": "k", "limit": 1, "on_limit": "queue"}
    assert spec_view(parse_spec({"command": ["true"]}).to_json(), view_defaults(RetryPolicy()))["concurrency"] is None


@pytest.mark.parametrize(("value", "field"), [
    ("k", "concurrency"), ({"limit": 1}, "concurrency.key"), ({"key": "", "limit": 1}, "concurrency.key"),
    ({"key": "x" * 256, "limit": 1}, "concurrency.key"), ({"key": "a\tb", "limit": 1}, "concurrency.key"),
    ({"key": "k"}, "concurrency.limit"), ({"key": "k", "limit": 0}, "concurrency.limit"),
    ({"key": "k", "limit": True}, "concurrency.limit"), ({"key": "k", "limit": 100_001}, "concurrency.limit"),
    ({"key": "k", "limit": 1.5}, "concurrency.limit"), ({"key": "k", "limit": 1, "on_limit": "drop"},
                                                         "concurrency.on_limit"),
    ({"key": "k", "limit": 1, "on_limit": None}, "concurrency.on_limit"),
    ({"key": "k", "limit": 1, "extra": 1}, "concurrency.extra"),
])
def test_a_bad_field_is_refused_naming_its_part(value: object, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        parse_spec({"command": ["true"], "concurrency": value})
    assert e.value.field == field


def test_skip_new_and_cancel_running_go_only_with_jobs_queued_at_their_submit() -> None:
    for when in ({"delay": 5}, {"run_at": "2030-01-01T00:00:00Z"}):
        for policy in ("skip_new", "cancel_running"):
            with pytest.raises(ValidationError) as e:
                parse_spec({"command": ["true"], **when, "concurrency": {"key": "k", "limit": 1, "on_limit": policy}})
            assert e.value.field == "concurrency.on_limit"
        assert parse_spec({"command": ["true"], **when, "concurrency": {"key": "k", "limit": 1}}).concurrency


def test_skip_new_skips_only_when_the_slots_are_all_taken_by_unheld_jobs() -> None:
    assert not skips(2, [Holder(1, True, False)])
    assert skips(2, [Holder(1, True, False), Holder(2, False, False)])
    assert not skips(2, [Holder(1, True, False), Holder(2, False, True)])  # a held job takes no slot


def test_cancel_running_keeps_the_newest_and_cancels_the_older_held_ones_too() -> None:
    r1, r2, q3, h4 = Holder(1, True, False), Holder(2, True, False), Holder(3, False, False), Holder(4, False, True)
    assert to_cancel(1, [h4, r1]) == [r1, h4]  # limit 1: the new job alone goes on
    assert to_cancel(3, [r1, r2, q3, h4]) == [r1, r2]  # the newest two and the new one
    assert to_cancel(3, [r1]) == []  # room already
    going = Holder(5, True, False, cancel_requested=True)  # being cancelled: not asked again, and not counted
    assert to_cancel(2, [going, r2]) == []
