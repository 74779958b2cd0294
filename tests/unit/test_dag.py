"""Job dependencies on plain data (orch/core/dag.py): what depends_on may say, when one is met, cycles."""

from __future__ import annotations

import random
from typing import Any

import pytest

from orch.core.dag import Dep, On, check_depends_on, find_cycle, met, resolve, workflow_state
from orch.core.errors import Conflict, ValidationError
from orch.core.spec import parse_spec
from orch.core.states import JobState


def test_depends_on_takes_ids_refs_and_objects_and_writes_them_back_as_given() -> None:
    deps = check_depends_on([4, "build", {"job": 7, "on": "failure"}, {"job": "lint", "on": "completion"}],
                            "depends_on")
    assert deps == (Dep(4, None), Dep(None, "build"), Dep(7, None, On.FAILURE), Dep(None, "lint", On.COMPLETION))
    assert [d.to_json() for d in deps] == [4, "build", {"job": 7, "on": "failure"}, {"job": "lint", "on": "completion"}]
    spec = parse_spec({"command": ["true"], "ref": "test", "depends_on": ["build", {"job": 7, "on": "failure"}]})
    assert spec.to_json()["depends_on"] == ["build", {"job": 7, "on": "failure"}]
    assert spec.to_json()["ref"] == "test"


@pytest.mark.parametrize("value, field", [
    ("build", "depends_on"),
    ([True], "depends_on[0]"),
    ([0], "depends_on[0]"),
    ([1.5], "depends_on[0]"),
    (["bad ref"], "depends_on[0]"),
    ([{"on": "success"}], "depends_on[0].job"),
    ([{"job": 3, "on": "maybe"}], "depends_on[0].on"),
    ([{"job": 3, "when": "x"}], "depends_on[0].when"),
    ([None], "depends_on[0]"),
])
def test_a_bad_depends_on_is_refused_naming_the_place(value: Any, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        parse_spec({"command": ["true"], "depends_on": value})
    assert e.value.field == field


def test_a_dependency_named_twice_is_one_and_twice_with_two_ends_is_refused() -> None:
    assert check_depends_on([3, 3, {"job": 3}], "depends_on") == (Dep(3, None),)
    with pytest.raises(Conflict) as e:
        check_depends_on([3, {"job": 3, "on": "failure"}], "depends_on")
    assert e.value.field == "depends_on[1].job"
    assert check_depends_on([4.0], "depends_on") == (Dep(4, None),)  # 4.0 is the integer 4


def test_depends_on_does_not_go_with_rate_keys_or_a_policy_that_decides_at_the_submit() -> None:
    with pytest.raises(ValidationError) as e:
        parse_spec({"command": ["true"], "depends_on": [1], "rate_keys": ["api"]})
    assert e.value.field == "rate_keys"
    with pytest.raises(ValidationError) as e:
        parse_spec({"command": ["true"], "depends_on": [1],
                    "concurrency": {"key": "k", "limit": 1, "on_limit": "skip_new"}})
    assert e.value.field == "concurrency.on_limit"
    parse_spec({"command": ["true"], "depends_on": [1], "concurrency": {"key": "k", "limit": 1}, "delay": 5})


def test_a_dependency_is_met_by_the_end_it_names_never_by_another_and_undecided_until_an_end() -> None:
    for state in (JobState.BLOCKED, JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING, JobState.RETRYING):
        assert all(met(on, state) is None for on in On)
    assert [met(On.SUCCESS, s) for s in ("succeeded", "failed", "cancelled", "skipped")] == [True, False, False, False]
    assert [met(On.FAILURE, s) for s in ("succeeded", "failed", "cancelled", "skipped")] == [False, True, False, False]
    assert [met(On.COMPLETION, s) for s in ("succeeded", "failed", "cancelled", "skipped")] == [True] * 4


def test_refs_resolve_to_batch_places_and_ids_stay_ids() -> None:
    got = resolve(["a", None, "c"], [(), (Dep(None, "a"), Dep(9, None, On.FAILURE)), (Dep(None, "a"),)])
    assert got == [[], [(None, 0, On.SUCCESS), (9, None, On.FAILURE)], [(None, 0, On.SUCCESS)]]


def test_a_cycle_is_found_and_named_however_long_and_wherever_it_is() -> None:
    assert find_cycle([[], [0], [1]]) is None
    cycle = find_cycle([[], [3], [1], [2], [0]])  # 1 -> 3 -> 2 -> 1, beside a chain
    assert cycle is not None and sorted(cycle) == [1, 2, 3]
    with pytest.raises(Conflict, match="cycle: b -> c -> b") as e:
        resolve(["a", "b", "c"], [(), (Dep(None, "c"),), (Dep(None, "b"), Dep(None, "a"))])
    assert e.value.field == "jobs[1].depends_on[0]"


def test_find_cycle_agrees_with_a_brute_force_on_random_graphs() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 9)
        edges = [sorted({rng.randrange(n) for _ in range(rng.randint(0, 3))} - {i}) for i in range(n)]

        def reaches(a: int, b: int, seen: set[int], edges: list[list[int]] = edges) -> bool:
            return any(k == b or (k not in seen and (seen.add(k) or reaches(k, b, seen))) for k in edges[a])

        has = any(reaches(i, i, set()) for i in range(n))
        cycle = find_cycle(edges)
        assert (cycle is not None) == has
        if cycle is not None:  # each depends on the next, the last on the first
            assert all(cycle[(i + 1) % len(cycle)] in edges[c] for i, c in enumerate(cycle))


def test_a_workflow_is_running_until_every_job_ended_then_failed_cancelled_or_succeeded() -> None:
    S = JobState
    assert workflow_state([S.SUCCEEDED, S.BLOCKED]) == "running"
    assert workflow_state([S.SUCCEEDED, S.FAILED, S.SKIPPED]) == "failed"
    assert workflow_state([S.SUCCEEDED, S.CANCELLED, S.SKIPPED]) == "cancelled"
    assert workflow_state([S.SUCCEEDED, S.SKIPPED]) == "succeeded"
