"""Grouped policies (lfu, importance) keep one ordered dict per group while priorities arrive in
order within each group, and fall back to one sorted list when they do not: either way the
candidates are every block by (priority, arrival), as a brute-force sort gives them."""

from __future__ import annotations

import random

import pytest

from policies import EVICTION, BlockStats, make_eviction

GROUPED = sorted(name for name, cls in EVICTION.items() if cls.grouped)


def brute_force(policy, stats: dict, arrival: dict) -> list:
    return sorted(stats, key=lambda k: (policy.priority(k, stats[k]), arrival[k]))


def drive(name: str, seed: int, steps: int, out_of_order_at: int | None = None):
    """A tier of 40 integer keys under a clock that only grows (as the simulator's), reads and
    evictions mixed; from step `out_of_order_at`, 20 steps go back in time."""
    rng = random.Random(seed)
    policy, stats, arrival = make_eviction(name), {}, {}  # arrival: the policy's tie-breaking sequence
    for step in range(steps):
        key = rng.randrange(60)
        late = out_of_order_at is not None and out_of_order_at <= step < out_of_order_at + 20
        clock = step - 1000 if late else step
        if key in stats:
            stats[key].hits += 1
            stats[key].last_access_step = clock
            policy.on_update(key, stats[key])
            arrival[key] = policy._entries[key][1]
        else:
            if len(stats) >= 40:
                gone = next(iter(policy.candidates()))
                policy.on_remove(gone)
                del stats[gone], arrival[gone]
            stats[key] = BlockStats(1, "device", clock, clock, clock, 0, 0, -float(rng.randrange(5)))
            policy.on_insert(key, stats[key])
            arrival[key] = policy._entries[key][1]
        assert list(policy.candidates()) == brute_force(policy, stats, arrival)
    return policy


@pytest.mark.parametrize("name", GROUPED)
def test_in_order_priorities_stay_grouped_and_match_a_sort(name):
    policy = drive(name, seed=1, steps=400)
    assert policy._sorted is None and len(policy._groups) > 1  # the fast path held throughout
    assert len(policy._group_heap) == len(policy._groups) <= 2 * len(policy) + 64  # emptied groups do not pile up


@pytest.mark.parametrize("name", GROUPED)
def test_an_out_of_order_priority_falls_back_to_the_same_order(name):
    policy = drive(name, seed=2, steps=400, out_of_order_at=200)
    assert policy._sorted is not None


def test_lfu_and_importance_are_grouped():
    assert GROUPED == ["importance", "lfu"]
