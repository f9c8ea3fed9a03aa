"""Monotone policies (lru, fifo) keep an ordered dict while priorities arrive in order; a block
that arrives below the newest priority (a renamed block keeps its old one) waits in a sorted list
beside it, and the candidates stay every block by (priority, arrival), as a brute-force sort gives."""

from __future__ import annotations

import random

import pytest

from policies import EVICTION, BlockStats, make_eviction

MONOTONE = sorted(name for name, cls in EVICTION.items() if cls.monotone)


def drive(name: str, seed: int, steps: int, late_every: int):
    """A tier of at most 40 of 60 integer keys: reads and evictions mixed; every `late_every`-th
    new block arrives with a priority 500 steps old (as a sealed, renamed block does)."""
    rng = random.Random(seed)
    policy, stats, arrival = make_eviction(name), {}, {}  # arrival: the policy's tie-breaking sequence
    late_count = 0
    for step in range(1000, 1000 + steps):
        key = rng.randrange(60)
        if key in stats:
            stats[key].hits += 1
            stats[key].last_access_step = step
            policy.on_update(key, stats[key])
        else:
            if len(stats) >= 40:
                gone = next(iter(policy.candidates()))
                policy.on_remove(gone)
                del stats[gone], arrival[gone]
            clock = step - 500 if step % late_every == 0 else step
            late_count += clock < step
            stats[key] = BlockStats(1, "device", clock, clock, clock)
            policy.on_insert(key, stats[key])
        arrival[key] = policy._entries[key][1]
        expected = sorted(stats, key=lambda k: (policy.priority(k, stats[k]), arrival[k]))
        assert list(policy.candidates()) == expected
        assert len(policy) == len(stats)
    return policy, late_count


@pytest.mark.parametrize("name", MONOTONE)
def test_late_arrivals_keep_the_order_of_a_sort_without_sorting_every_block(name):
    policy, late_count = drive(name, seed=3, steps=600, late_every=7)
    assert late_count > 20  # the late path was taken
    assert policy._sorted is None  # never the sorted list of every block
    assert len(policy._late) == len(policy._late_keys) < len(policy)


@pytest.mark.parametrize("name", MONOTONE)
def test_in_order_arrivals_need_no_sorted_list(name):
    policy, _ = drive(name, seed=4, steps=300, late_every=10**9)
    assert policy._sorted is None and not policy._late


def test_lru_and_fifo_are_monotone():
    assert MONOTONE == ["fifo", "lru"]

