"""Routing policies: the registry suite and each policy's decisions."""

from __future__ import annotations

import random

import pytest

from policies import ROUTING, make_routing


@pytest.mark.parametrize("name", sorted(ROUTING))
def test_choices_are_valid_and_repeatable(name):
    rng = random.Random(0)
    calls = [([rng.randrange(10) for _ in range(5)], [rng.randrange(4) for _ in range(5)]) for _ in range(50)]
    first, second = make_routing(name), make_routing(name)
    answers = [first.choose(loads, prefix) for loads, prefix in calls]
    assert all(0 <= a < 5 for a in answers)
    assert answers == [second.choose(loads, prefix) for loads, prefix in calls]
    with pytest.raises(ValueError, match="at least one replica"):
        make_routing(name).choose([], [])
    with pytest.raises(ValueError, match="prefix lengths"):
        make_routing(name).choose([0, 0], [1])


def test_round_robin_takes_turns():
    policy = make_routing("round-robin")
    assert [policy.choose([9, 0, 0]) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_takes_the_lowest_load_then_the_lowest_index():
    policy = make_routing("least-loaded")
    assert policy.choose([3, 1, 2]) == 1
    assert policy.choose([2, 1, 1]) == 1
    assert not policy.uses_prefix


def test_prefix_affinity_follows_the_longest_prefix_then_load():
    policy = make_routing("prefix-affinity")
    assert policy.uses_prefix
    assert policy.choose([0, 3, 1], [1, 5, 2]) == 1  # longest prefix, although busier
    assert policy.choose([2, 3, 1], [5, 5, 2]) == 0  # equal prefixes: the less loaded
    assert policy.choose([2, 3, 1], [0, 0, 0]) == 2  # nobody holds it: least loaded
    with pytest.raises(ValueError, match="prefix_blocks"):
        policy.choose([0, 0])


def test_prefix_affinity_gives_way_to_two_choices_when_overloaded():
    policy = make_routing("prefix-affinity", max_imbalance=2, seed=1)
    loads, prefix = [9, 0, 0, 0], [8, 0, 0, 0]
    picks = [policy.choose(loads, prefix) for _ in range(200)]
    assert set(picks) == {1, 2, 3}  # the overloaded replica never wins the least-loaded of two
    assert make_routing("prefix-affinity", max_imbalance=9).choose(loads, prefix) == 0
    with pytest.raises(ValueError, match="max_imbalance"):
        make_routing("prefix-affinity", max_imbalance=-1)
