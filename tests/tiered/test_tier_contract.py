"""The Tier contract (tiered.tier), checked the same way over every tier: device, host, disk and
shared. A tier that passes these can sit anywhere in a TieredStore's hierarchy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from tiered import BlockKey, BlockLayout, KVBlock
from tiered.codecs import make_codec
from tiered.content import DIGEST_BYTES, content_key
from tiered.device import DeviceTier
from tiered.disk import DiskTier
from tiered.host import HostTier
from tiered.shared import SharedTier
from tiered.tier import Tier

LAYOUT = BlockLayout(kv_heads=2, block_tokens=16, head_dim=32, dtype=torch.float16)
CAPACITY_BYTES = 1 << 20
# keys every tier takes (the shared tier keeps content keys in its common part)
KEY = content_key(bytes(range(DIGEST_BYTES)), layer=0, index=0)
OTHER = content_key(bytes(range(1, DIGEST_BYTES + 1)), layer=0, index=1)


def block(seed: int, tokens: int = LAYOUT.block_tokens) -> KVBlock:
    generator = torch.Generator().manual_seed(seed)
    shape = (LAYOUT.kv_heads, tokens, LAYOUT.head_dim)  # keys, values: [kv_heads, tokens, head_dim]
    return KVBlock(torch.randn(shape, generator=generator).half(), torch.randn(shape, generator=generator).half())


@dataclass
class Case:
    tier: Tier
    codec_spec: str | None  # None: the tier holds KVBlocks (the device)

    def item(self, seed: int, tokens: int = LAYOUT.block_tokens):
        kv = block(seed, tokens)
        return kv if self.codec_spec is None else make_codec(self.codec_spec).encode(kv)

    def same(self, got, want) -> bool:
        if self.codec_spec is None:
            return got is not None and got.equal(want)
        return (
            got is not None
            and (got.codec, got.dtype, tuple(got.shape)) == (want.codec, want.dtype, tuple(want.shape))
            and torch.equal(got.payload.view(-1), want.payload.view(-1))
        )


def _device(tmp_path) -> Case:
    return Case(DeviceTier(torch.device("cpu"), CAPACITY_BYTES), None)


def _host(tmp_path) -> Case:
    return Case(HostTier(CAPACITY_BYTES, pin=False), "int8")


def _disk(tmp_path) -> Case:
    tier = DiskTier(tmp_path / "disk", CAPACITY_BYTES, codec=make_codec("int4").spec, block_tokens=LAYOUT.block_tokens)
    return Case(tier, "int4")


def _shared(tmp_path) -> Case:
    return Case(SharedTier(tmp_path / "shared", CAPACITY_BYTES, codec="raw"), "raw")


OPENERS: dict[str, Callable] = {"device": _device, "host": _host, "disk": _disk, "shared": _shared}


@pytest.fixture(params=list(OPENERS))
def case(request, tmp_path) -> Iterator[Case]:
    opened = OPENERS[request.param](tmp_path)
    spec = opened.codec_spec
    codec_bytes = (
        LAYOUT.block_nbytes
        if spec is None
        else make_codec(spec).encoded_nbytes(LAYOUT.kv_heads, LAYOUT.block_tokens, LAYOUT.head_dim, LAYOUT.dtype)
    )
    opened.tier.allocate(LAYOUT, codec_bytes)  # as the store does once the first block fixes the layout
    yield opened
    opened.tier.close()


def test_an_empty_tier_holds_nothing(case):
    tier = case.tier
    assert KEY not in tier and tier.get(KEY) is None and list(tier.keys()) == [] and len(tier) == 0
    assert tier.remove(KEY) is False
    assert tier.free_bytes <= tier.capacity_bytes == CAPACITY_BYTES


def test_put_then_get_returns_the_item_and_charges_capacity(case):
    tier, item = case.tier, case.item(1)
    free_before = tier.free_bytes
    assert tier.put(KEY, item) == []
    assert KEY in tier and OTHER not in tier
    assert case.same(tier.get(KEY), item)
    assert list(tier.keys()) == [KEY] and len(tier) == 1
    assert 0 < tier.used_bytes and 0 <= tier.free_bytes < free_before
    assert tier.free_bytes <= tier.capacity_bytes - tier.used_bytes + tier.charge(item)


def test_get_returns_a_view_of_what_the_tier_holds_unless_it_declares_copies(case):
    """get_copies tells readers whether a get's item is a new copy out of storage (not to be kept
    past a read) or a view of memory the tier holds (the same bytes at every get)."""
    tier = case.tier
    tier.put(KEY, case.item(9))
    first, second = tier.get(KEY), tier.get(KEY)
    pointer = (lambda item: item.keys.data_ptr()) if case.codec_spec is None else (lambda item: item.payload.data_ptr())
    assert (pointer(first) != pointer(second)) == tier.get_copies
    assert tier.get_copies == (type(tier).__name__ in ("DiskTier", "SharedTier"))


def test_the_charge_of_a_payload_size_is_the_charge_of_an_item_of_that_size(case):
    item = case.item(2)
    assert case.tier.charge_for(item.nbytes) <= case.tier.charge(item)
    assert case.tier.charge(item) >= item.nbytes


def test_held_reports_the_charge_and_tokens_of_a_partial_block(case):
    tier, item = case.tier, case.item(3, tokens=5)
    tier.put(KEY, item)
    held = tier.held(KEY)
    assert held is not None
    charge_bytes, tokens = held
    assert tokens == 5 and 0 < charge_bytes <= tier.charge(item)
    assert case.same(tier.get(KEY), item)
    assert tier.held(OTHER) is None


def test_remove_forgets_the_item_and_gives_its_room_back(case):
    tier = case.tier
    tier.put(KEY, case.item(4))
    free_with = tier.free_bytes
    assert tier.remove(KEY) is True
    assert KEY not in tier and tier.get(KEY) is None and len(tier) == 0
    assert tier.remove(KEY) is False
    if not tier.evicts_itself:  # a self-evicting tier frees room on its own schedule (the disk log: compaction)
        assert tier.free_bytes > free_with


def test_rename_moves_the_item_and_refuses_an_absent_key(case):
    tier, item = case.tier, case.item(5)
    tier.put(KEY, item)
    assert tier.rename(KEY, OTHER) == []
    assert KEY not in tier and OTHER in tier and case.same(tier.get(OTHER), item)
    assert list(tier.keys()) == [OTHER]
    with pytest.raises(KeyError):
        tier.rename(KEY, BlockKey("s:absent", 0, 0))


def test_several_items_stay_apart(case):
    tier = case.tier
    keys = [content_key(bytes([n]) * DIGEST_BYTES, layer=0, index=n) for n in range(5)]
    items = [case.item(10 + n, tokens=3 + n) for n in range(5)]
    for key, item in zip(keys, items):
        tier.put(key, item)
    tier.remove(keys[2])
    assert set(tier.keys()) == set(keys[:2] + keys[3:]) and len(tier) == 4
    for key, item in zip(keys, items):
        if key != keys[2]:
            assert case.same(tier.get(key), item)


def test_landing_buffers_are_kept_without_a_copy(case):
    tier = case.tier
    if case.codec_spec is None:  # the device holds blocks: it has no payload buffers
        assert tier.landing_buffers([64]) == []
        return
    codec, kvs = make_codec(case.codec_spec), [block(6), block(7, tokens=5), block(8)]
    sizes = [codec.encoded_nbytes(kv.kv_heads, kv.tokens, kv.head_dim, kv.dtype) for kv in kvs]
    buffers = tier.landing_buffers(sizes)
    if not buffers:  # a tier over files has no memory to land in
        assert tier.reads_unlocked or tier.evicts_itself
        return
    assert [(b.dtype, b.numel()) for b in buffers] == [(torch.uint8, n) for n in sizes]
    assert len({b.data_ptr() for b in buffers}) == len(buffers)
    keys = [content_key(bytes([n]) * DIGEST_BYTES, layer=0, index=n) for n in range(len(kvs))]
    for key, encoded in zip(keys, codec.encode_many_into(kvs, buffers)):
        tier.put(key, encoded)
    for key, kv, buffer in zip(keys, kvs, buffers):
        got = tier.get(key)
        assert got.payload.data_ptr() == buffer.data_ptr()
        assert codec.decode(got, "cpu").equal(codec.decode(codec.encode(kv), "cpu"))


def test_a_landing_buffer_stays_intact_when_an_earlier_put_lands_elsewhere(case):
    tier = case.tier
    if case.codec_spec is None:
        return
    codec, kvs = make_codec(case.codec_spec), [block(20), block(21)]
    sizes = [codec.encoded_nbytes(kv.kv_heads, kv.tokens, kv.head_dim, kv.dtype) for kv in kvs]
    tier.put(OTHER, case.item(22))
    buffers = tier.landing_buffers(sizes)
    if len(buffers) < 2:
        return
    landed = codec.encode_many_into(kvs, buffers)
    tier.remove(OTHER)  # frees a slot: the next put may land there instead of in buffers[0]
    tier.put(KEY, landed[0])
    second = content_key(bytes([9]) * DIGEST_BYTES, layer=0, index=9)
    tier.put(second, landed[1])
    for key, kv in ((KEY, kvs[0]), (second, kvs[1])):
        assert codec.decode(tier.get(key), "cpu").equal(codec.decode(codec.encode(kv), "cpu"))


def test_sync_then_close_keeps_the_contract(case):
    tier, item = case.tier, case.item(7)
    tier.put(KEY, item)
    tier.sync()
    assert case.same(tier.get(KEY), item)


def test_a_put_that_raises_leaves_the_tier_as_it_was(case):
    tier, item = case.tier, case.item(8)
    tier.put(KEY, item)
    used, keys = tier.used_bytes, set(tier.keys())
    wrong = block(9) if case.codec_spec is not None else make_codec("raw").encode(block(9))  # the other kind
    with pytest.raises(TypeError, match="KVBlock|Encoded"):
        tier.put(OTHER, wrong)
    assert OTHER not in tier and set(tier.keys()) == keys and tier.used_bytes == used
    assert case.same(tier.get(KEY), item)
