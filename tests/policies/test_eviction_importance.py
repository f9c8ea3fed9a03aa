"""The `importance` eviction policy: lowest score first, sinks and the recent window protected."""

from __future__ import annotations

import pytest
import torch

from policies import BlockStats, make_eviction
from tests.conftest import random_block
from tiered import BlockKey, StoreConfig, TieredStore


def tracked(policy, keys_scores: list[tuple[BlockKey, float]]) -> dict:
    stats = {}
    for step, (key, score) in enumerate(keys_scores):
        stats[key] = BlockStats(1, "device", step, step, step, score=score)
        policy.on_insert(key, stats[key])
    return stats


def test_lowest_score_leaves_first_and_ties_go_to_the_least_recently_used():
    policy = make_eviction("importance", sink_blocks=0, window_blocks=0)
    keys = [BlockKey("s", 0, i) for i in range(5)]
    stats = tracked(policy, list(zip(keys, [3.0, 1.0, 2.0, 1.0, 0.5])))
    assert list(policy.candidates()) == [keys[4], keys[1], keys[3], keys[2], keys[0]]
    stats[keys[4]].score = 5.0
    policy.on_update(keys[4], stats[keys[4]])
    assert list(policy.candidates())[-1] == keys[4]


def test_sinks_and_the_recent_window_are_offered_last():
    policy = make_eviction("importance", sink_blocks=1, window_blocks=2)
    keys = [BlockKey("s", 0, i) for i in range(6)]
    tracked(policy, [(k, 0.0) for k in keys])  # equal scores: without protection, plain LRU order
    assert list(policy.candidates()) == [keys[1], keys[2], keys[3], keys[0], keys[4], keys[5]]
    assert [policy.is_protected(k) for k in keys] == [True, False, False, False, True, True]
    policy.on_insert(BlockKey("s", 0, 6), BlockStats(1, "device", 9, 9, 9))  # the window moves on
    assert policy.is_protected(keys[5]) and not policy.is_protected(keys[4])
    assert list(policy.candidates())[:4] == [keys[1], keys[2], keys[3], keys[4]]


def test_protection_is_per_sequence_and_layer():
    policy = make_eviction("importance", sink_blocks=0, window_blocks=1)
    a = [BlockKey("a", 0, i) for i in range(3)]
    b = [BlockKey("a", 1, i) for i in range(2)]
    c = [BlockKey("c", 0, i) for i in range(4)]
    tracked(policy, [(k, 1.0) for k in a + b + c])
    assert {k for k in a + b + c if policy.is_protected(k)} == {a[2], b[1], c[3]}
    for key in c:  # once a sequence is gone, nothing of it is remembered
        policy.on_remove(key)
    policy.on_insert(BlockKey("c", 0, 0), BlockStats(1, "device", 20, 20, 20))
    assert policy.is_protected(BlockKey("c", 0, 0))


def test_keys_without_namespace_layer_index_are_never_protected():
    policy = make_eviction("importance", sink_blocks=4, window_blocks=4)
    tracked(policy, [("x", 1.0), (("y", 0, 0), 0.5)])
    assert not policy.is_protected("x") and not policy.is_protected(("y", 0, 0))
    assert list(policy.candidates()) == [("y", 0, 0), "x"]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="window_blocks must be >= 0"):
        make_eviction("importance", window_blocks=-1)
    with pytest.raises(TypeError, match="sink_blocks must be int"):
        make_eviction("importance", sink_blocks=1.5)


def test_a_store_keeps_sinks_and_recent_blocks_on_the_device():
    block_bytes = 2 * 2 * 16 * 8 * 2  # keys + values, fp16: [2 heads, 16 tokens, 8 dims]
    config = StoreConfig(
        device="cpu",
        device_bytes=4 * block_bytes,
        host_bytes=64 * block_bytes,
        block_tokens=16,
        eviction="importance",
        eviction_kwargs=dict(sink_blocks=1, window_blocks=2),
    )
    with TieredStore(config) as store:
        keys = [BlockKey("s", 0, i) for i in range(10)]
        for i, key in enumerate(keys):
            store.put(key, random_block(seed=i))
        on_device = [i for i, key in enumerate(keys) if store.where(key) == "device"]
        assert on_device == [0, 7, 8, 9]  # LRU would keep 6, 7, 8, 9
        store.set_score(keys[2], 10.0)  # a valued block comes back and stays; the unvalued one leaves
        assert store.get(keys[2]) is not None
        assert [i for i, key in enumerate(keys) if store.where(key) == "device"] == [0, 2, 8, 9]
        assert torch.equal(store.get(keys[0]).keys, random_block(seed=0).keys)
