"""One interface suite over every registered eviction policy (adding one to EVICTION tests it)."""

from __future__ import annotations

import random

import pytest

from policies import EVICTION, BlockStats, make_eviction
from tiered import BlockKey


def stats_for(rng: random.Random, step: int) -> BlockStats:
    return BlockStats(
        nbytes=1024,
        tier="device",
        inserted_step=step,
        tier_step=step,
        last_access_step=step,
        hits=rng.randrange(4),
        score=rng.choice([0.0, 0.5, 1.0, 2.0, rng.random()]),
    )


def build(name: str, seed: int = 0, blocks: int = 24) -> tuple:
    """A policy tracking `blocks` keys of two sequences and two layers, after some updates."""
    rng = random.Random(seed)
    policy = make_eviction(name)
    stats = {}
    for step in range(blocks):
        key = BlockKey(f"seq{step % 2}", layer=(step // 2) % 2, index=step // 4)
        stats[key] = stats_for(rng, step)
        policy.on_insert(key, stats[key])
    for step, key in enumerate(rng.sample(sorted(stats, key=repr), blocks // 2), start=blocks):
        stats[key].last_access_step = step
        stats[key].hits += 1
        stats[key].score = rng.random()
        policy.on_update(key, stats[key])
    return policy, stats


def check_order(policy, stats: dict) -> None:
    """Candidates name every key once, unprotected before protected, each part by priority."""
    order = list(policy.candidates())
    assert sorted(order, key=repr) == sorted(stats, key=repr)
    protected = [getattr(policy, "is_protected", lambda key: False)(key) for key in order]
    assert protected == sorted(protected), "a protected block came before an unprotected one"
    for part in (False, True):
        priorities = [policy.priority(k, stats[k]) for k, p in zip(order, protected) if p == part]
        assert priorities == sorted(priorities)


@pytest.mark.parametrize("name", sorted(EVICTION))
def test_candidates_have_no_side_effects(name):
    policy, stats = build(name)
    first = list(policy.candidates())
    for _ in range(3):
        next(iter(policy.candidates()))  # partly consumed iterators change nothing either
    assert list(policy.candidates()) == first
    assert len(policy) == len(stats)
    twin, _ = build(name)  # the same operations, candidates never asked for
    key = first[0]
    stats[key].last_access_step += 100
    stats[key].score += 10
    policy.on_update(key, stats[key])
    twin.on_update(key, stats[key])
    assert list(policy.candidates()) == list(twin.candidates())


@pytest.mark.parametrize("name", sorted(EVICTION))
def test_order_is_deterministic_and_follows_priority(name):
    policy, stats = build(name, seed=3)
    again, _ = build(name, seed=3)
    assert list(policy.candidates()) == list(again.candidates())
    check_order(policy, stats)


@pytest.mark.parametrize("name", sorted(EVICTION))
def test_removing_and_updating(name):
    policy, stats = build(name, seed=5)
    order = list(policy.candidates())
    gone = order[len(order) // 2]
    policy.on_remove(gone)
    del stats[gone]
    assert gone not in policy and gone not in list(policy.candidates())
    policy.on_remove(gone)  # removing an absent key is a no-op
    assert len(policy) == len(stats)
    rng = random.Random(7)
    for step, key in enumerate(sorted(stats, key=repr), start=1000):
        stats[key].last_access_step = step + rng.randrange(50)
        stats[key].score = rng.random()
        policy.on_update(key, stats[key])
        check_order(policy, stats)
    with pytest.raises(KeyError):
        policy.on_update(gone, BlockStats(1, "device", 0, 0, 0))
    with pytest.raises(KeyError):
        policy.on_insert(order[0], stats[order[0]])


@pytest.mark.parametrize("name", sorted(EVICTION))
def test_any_hashable_key_works(name):
    policy = make_eviction(name)
    for step, key in enumerate(["a", ("b", 1), 7]):
        policy.on_insert(key, BlockStats(1, "device", step, step, step))
    assert sorted(map(repr, policy.candidates())) == sorted(map(repr, ["a", ("b", 1), 7]))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names") as err:
        make_eviction("random")
    assert all(name in str(err.value) for name in EVICTION)
    with pytest.raises(ValueError, match="valid names"):
        make_eviction(None)
    with pytest.raises(TypeError, match="'lru'"):
        make_eviction("lru", window_blocks=2)
