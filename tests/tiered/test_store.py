"""TieredStore: blocks move between tiers intact, bad input changes nothing, counters are exact."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cuda, random_block
from tiered import BlockKey, KVBlock, StoreConfig, TieredStore

HEADS, TOKENS, DIM = 2, 16, 8
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 2  # fp16 keys + values of one full block


def small_config(device_blocks: int = 4, host_blocks: int = 8, **overrides) -> StoreConfig:
    fields = dict(
        device="cpu",
        device_bytes=device_blocks * BLOCK_BYTES,
        host_bytes=host_blocks * BLOCK_BYTES,
        block_tokens=TOKENS,
    )
    fields.update(overrides)
    return StoreConfig(**fields)


def block(seed: int, tokens: int = TOKENS, dtype: torch.dtype = torch.float16) -> KVBlock:
    return random_block(HEADS, tokens, DIM, dtype, seed)


def snapshot(store: TieredStore) -> tuple:
    keys = sorted(store.keys(), key=lambda k: (k.namespace, k.layer, k.index))
    return keys, [store.where(k) for k in keys], [store.peek(k) for k in keys], store.stats()


def same_snapshot(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and all(x.equal(y) for x, y in zip(a[2], b[2])) and a[3] == b[3]


@pytest.mark.parametrize("tokens", [TOKENS, 5, 1])
def test_round_trip_through_every_tier(tokens):
    with TieredStore(small_config(device_blocks=2, host_blocks=4)) as store:
        key = BlockKey("s1", 0, 0)
        original = block(seed=1, tokens=tokens)
        store.put(key, original)
        assert store.where(key) == "device"
        for i in range(1, 3):  # two more blocks push the first one down to host
            store.put(BlockKey("s1", 0, i), block(seed=10 + i))
        assert store.where(key) == "host"
        assert store.peek(key).equal(original)
        got = store.get(key)
        assert got.equal(original)
        assert got.device == torch.device("cpu")
        assert store.where(key) == "device"


def test_get_returns_a_copy_the_store_does_not_change():
    with TieredStore(small_config(device_blocks=1, host_blocks=4)) as store:
        key = BlockKey("s", 0, 0)
        store.put(key, block(seed=1))
        first = store.get(key)
        first.keys.zero_()  # the caller's copy is theirs
        assert store.get(key).equal(block(seed=1))
        held = store.get(key)
        store.put(BlockKey("s", 0, 1), block(seed=2))  # reuses the device slot
        assert held.equal(block(seed=1))


def test_put_replaces_an_earlier_block_in_any_tier():
    with TieredStore(small_config(device_blocks=1, host_blocks=4)) as store:
        key = BlockKey("s", 0, 0)
        store.put(key, block(seed=1))
        store.put(BlockKey("s", 0, 1), block(seed=2))
        assert store.where(key) == "host"
        store.put(key, block(seed=3))
        assert store.where(key) == "device"
        assert store.get(key).equal(block(seed=3))
        assert len(store) == 2


def test_bottom_tier_drops_in_lru_order_and_counts_it():
    with TieredStore(small_config(device_blocks=1, host_blocks=2)) as store:
        keys = [BlockKey("s", 0, i) for i in range(5)]
        for i, key in enumerate(keys):
            store.put(key, block(seed=i))
        assert [store.where(k) for k in keys] == [None, None, "host", "host", "device"]
        assert store.stats()["tiers"]["host"]["dropped"] == 2
        assert store.get(keys[0]) is None


@pytest.mark.parametrize("eviction, expected", [("lru", 1), ("fifo", 0), ("lfu", 2)])
def test_eviction_policy_chooses_the_victim(eviction, expected):
    with TieredStore(small_config(device_blocks=3, host_blocks=4, eviction=eviction)) as store:
        keys = [BlockKey("s", 0, i) for i in range(4)]
        for i in range(3):
            store.put(keys[i], block(seed=i))
        for i in (0, 1, 1, 2, 0):  # reads: blocks 0 and 1 twice, 2 once; 1 least recently
            store.get(keys[i])
        store.put(keys[3], block(seed=3))
        assert store.where(keys[expected]) == "host"
        assert sum(store.where(k) == "device" for k in keys) == 3


def test_prefetch_moves_blocks_up_in_the_background():
    with TieredStore(small_config(device_blocks=2, host_blocks=8)) as store:
        keys = [BlockKey("s", 0, i) for i in range(6)]
        for i, key in enumerate(keys):
            store.put(key, block(seed=i))
        future = store.prefetch([keys[0], keys[1], BlockKey("absent", 0, 0), keys[5]])
        assert future.result(timeout=10) == 2
        assert store.where(keys[0]) == "device" and store.where(keys[1]) == "device"
        stats = store.stats()
        assert stats["tiers"]["host"]["prefetched"] == 2
        assert stats["tiers"]["host"]["hits"] == 0  # a prefetch is not a read
        assert stats["prefetch_requests"] == 4
        assert store.get(keys[1]).equal(block(seed=1))


def test_prefetch_moves_no_more_than_the_device_holds():
    with TieredStore(small_config(device_blocks=2, host_blocks=8)) as store:
        keys = [BlockKey("s", 0, i) for i in range(8)]
        for i, key in enumerate(keys):
            store.put(key, block(seed=i))
        assert store.prefetch(keys[:4]).result(timeout=10) == 2
        assert [store.where(k) for k in keys[:4]] == ["device", "device", "host", "host"]


def test_stats_count_exactly_what_happened():
    with TieredStore(small_config(device_blocks=2, host_blocks=4)) as store:
        a, b, c = (BlockKey("s", 0, i) for i in range(3))
        store.put(a, block(seed=0, tokens=4))
        store.put(b, block(seed=1))
        store.put(c, block(seed=2))  # a goes to host
        assert store.get(a) is not None  # host hit; b goes to host
        assert store.get(a) is not None  # device hit
        assert store.get(BlockKey("x", 0, 0)) is None  # miss everywhere
        assert store.remove(c) and not store.remove(c)
        stats = store.stats()
        assert (stats["puts"], stats["gets"], stats["hits"], stats["misses"], stats["removes"]) == (3, 3, 2, 1, 1)
        device, host = stats["tiers"]["device"], stats["tiers"]["host"]
        assert (device["hits"], device["misses"], device["evictions"]) == (1, 2, 2)
        assert (host["hits"], host["misses"], host["promotions"], host["evictions"]) == (1, 1, 1, 0)
        assert device["bytes_in"] == 2 * BLOCK_BYTES + 2 * (BLOCK_BYTES * 4 // TOKENS)
        assert host["bytes_in"] == BLOCK_BYTES + BLOCK_BYTES * 4 // TOKENS
        assert host["bytes_out"] == BLOCK_BYTES * 4 // TOKENS
        assert (device["blocks"], host["blocks"]) == (1, 1)
        assert device["used_bytes"] == BLOCK_BYTES and host["used_bytes"] == BLOCK_BYTES
        assert device["capacity_bytes"] == 2 * BLOCK_BYTES and host["capacity_bytes"] == 4 * BLOCK_BYTES


def test_put_many_and_get_many():
    with TieredStore(small_config(device_blocks=2, host_blocks=8)) as store:
        items = [(BlockKey("s", 1, i), block(seed=i)) for i in range(6)]
        store.put_many(items)
        got = store.get_many([key for key, _ in items] + [BlockKey("s", 1, 99)])
        assert all(g.equal(b) for g, (_, b) in zip(got, items))
        assert got[-1] is None


def test_layout_is_fixed_by_the_first_put():
    with TieredStore(small_config()) as store:
        assert store.layout is None
        store.put(BlockKey("s", 0, 0), block(seed=0, tokens=3))
        assert (store.layout.kv_heads, store.layout.block_tokens, store.layout.head_dim) == (HEADS, TOKENS, DIM)
        assert store.layout.dtype == torch.float16


def test_closed_store_refuses_work():
    store = TieredStore(small_config())
    store.put(BlockKey("s", 0, 0), block(seed=0))
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.get(BlockKey("s", 0, 0))
    with pytest.raises(RuntimeError, match="closed"):
        store.prefetch([BlockKey("s", 0, 0)])


BAD_PUTS = [
    ("not a key", block(0), TypeError, "expected a BlockKey"),
    (BlockKey("s", 0, 9), "not a block", TypeError, "expected a KVBlock"),
    (BlockKey("s", 0, 9), block(0, tokens=TOKENS + 1), ValueError, "at most block_tokens=16"),
    (BlockKey("s", 0, 9), random_block(HEADS + 1, TOKENS, DIM), ValueError, "kv_heads=2, head_dim=8"),
    (BlockKey("s", 0, 9), random_block(HEADS, TOKENS, DIM * 2), ValueError, "kv_heads=2, head_dim=8"),
    (BlockKey("s", 0, 9), block(0, dtype=torch.bfloat16), TypeError, "differs from this store's torch.float16"),
]


@pytest.mark.parametrize("key, value, error, words", BAD_PUTS)
def test_bad_put_raises_and_leaves_the_store_unchanged(key, value, error, words):
    with TieredStore(small_config(device_blocks=2, host_blocks=4)) as store:
        for i in range(4):
            store.put(BlockKey("s", 0, i), block(seed=i))
        before = snapshot(store)
        with pytest.raises(error, match=words):
            store.put(key, value)
        with pytest.raises(error, match=words):  # one bad item spoils the batch, before anything is stored
            store.put_many([(BlockKey("s", 0, 8), block(seed=8)), (key, value)])
        assert same_snapshot(before, snapshot(store))


@pytest.mark.parametrize("call", ["get", "where", "remove", "peek", "prefetch"])
def test_bad_key_raises_type_error(call):
    with TieredStore(small_config()) as store:
        argument = [("s", 0, 0)] if call == "prefetch" else ("s", 0, 0)
        with pytest.raises(TypeError, match="expected a BlockKey"):
            getattr(store, call)(argument)
        assert store.stats()["step"] == 0


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(device_bytes=0), ValueError, "device_bytes must be > 0"),
        (dict(host_bytes=-1), ValueError, "host_bytes must be > 0"),
        (dict(disk_bytes=0), ValueError, "disk_bytes must be > 0"),
        (dict(block_tokens=0), ValueError, "block_tokens must be > 0"),
        (dict(device_bytes=1.5), TypeError, "device_bytes must be int"),
        (dict(device="tpu"), ValueError, "'cpu' or 'cuda"),
        (dict(device=0), TypeError, "device must be str"),
        (dict(eviction="random"), ValueError, r"valid names: \[.*'lfu', 'lru'"),
        (dict(host_codec="zip"), ValueError, r"unknown codec 'zip'; valid names: \[.*'raw'"),
        (dict(eviction_kwargs=[1]), TypeError, "eviction_kwargs must be dict"),
    ],
)
def test_bad_config_is_rejected(overrides, error, words):
    with pytest.raises(error, match=words):
        small_config(**overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_config_without_cuda_is_rejected():
    with pytest.raises(ValueError, match="CUDA is not available"):
        small_config(device="cuda")


@pytest.mark.parametrize("tier_bytes", ["device_bytes", "host_bytes"])
def test_block_larger_than_a_tier_is_rejected(tier_bytes):
    with TieredStore(small_config(**{tier_bytes: BLOCK_BYTES - 1})) as store:
        with pytest.raises(ValueError, match=f"larger than the {tier_bytes.split('_')[0]} tier"):
            store.put(BlockKey("s", 0, 0), block(seed=0))
        assert store.layout is None and len(store) == 0
        assert store.stats()["puts"] == 0


@cuda
def test_cuda_round_trip_with_pinned_host_tier():
    config = StoreConfig(device="cuda", device_bytes=2 * BLOCK_BYTES, host_bytes=8 * BLOCK_BYTES, block_tokens=TOKENS)
    with TieredStore(config) as store:
        originals = {BlockKey("s", 0, i): block(seed=i) for i in range(6)}
        store.put_many(originals.items())
        spilled = [k for k in originals if store.where(k) == "host"]
        assert len(spilled) == 4
        assert all(store._place.tiers[1].get(k).payload.is_pinned() for k in spilled)
        for key, original in originals.items():
            got = store.get(key)
            assert got.device.type == "cuda"
            assert got.equal(original)


def test_blocks_of_a_computing_session_leave_the_store_last_until_every_pin_ends():
    """Out of the bottom tier, referenced blocks go before pinned ones (pinning: a session is
    computing with them), whatever the eviction order; nested pins of a block hold until both end."""
    with TieredStore(small_config(device_blocks=1, host_blocks=2)) as store:
        keys = [BlockKey("s", 0, i) for i in range(3)]
        store.retain(keys + [BlockKey("s", 0, 3), BlockKey("s", 0, 4)])  # every block has a reader
        for i, k in enumerate(keys):
            store.put(k, block(seed=i))
        with store.pinning(keys[:1]):  # the least recently used block, pinned twice
            with store.pinning(keys[:1]):
                store.put(BlockKey("s", 0, 3), block(seed=3))  # the host holds 0 and 1: 1 leaves
            assert keys[0] in store and keys[1] not in store
            store.put(BlockKey("s", 0, 4), block(seed=4))  # keys[0] still pinned by the outer pin: 2 leaves
            assert keys[0] in store and keys[2] not in store
        store.put(BlockKey("s", 0, 5), block(seed=5))  # no pin left: the least recently used leaves
        assert keys[0] not in store
