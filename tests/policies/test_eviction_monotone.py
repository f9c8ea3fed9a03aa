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


@pytest.mark.parametrize("name", sorted(EVICTION))
def test_a_read_of_many_blocks_orders_them_as_one_update_each(name):
    """on_update_all (a read of many blocks) leaves every policy in the order that on_update key by
    key gives, with late arrivals among the keys read, and refuses a key it does not track."""
    rng = random.Random(3)
    one, many = make_eviction(name), make_eviction(name)
    stats_one, stats_many = {}, {}
    for key in range(30):  # every fifth arrives 500 steps old, as a renamed block does
        clock = 1000 + key - (500 if key % 5 == 0 else 0)
        for policy, stats in ((one, stats_one), (many, stats_many)):
            stats[key] = BlockStats(1, "device", clock, clock, clock)
            policy.on_insert(key, stats[key])
    for step in range(1100, 1140):
        read = rng.sample(range(30), 8)
        for stats in (stats_one, stats_many):
            for key in read:
                stats[key].hits += 1
                stats[key].last_access_step = step
        for key in read:
            one.on_update(key, stats_one[key])
        many.on_update_all(read, stats_many)
        assert list(many.candidates()) == list(one.candidates())
    with pytest.raises(KeyError):
        many.on_update_all([99], {99: BlockStats(1, "device", 0, 0, 0)})
