"""BlockKey and KVBlock validate what they are given."""

from __future__ import annotations

import pytest
import torch

from tiered import BlockKey, KVBlock


def test_block_key_is_frozen_and_hashable():
    key = BlockKey("s1", layer=2, index=7)
    assert key == BlockKey("s1", 2, 7)
    assert len({key, BlockKey("s1", 2, 7), BlockKey("s1", 2, 8)}) == 2
    with pytest.raises(AttributeError):
        key.index = 3


@pytest.mark.parametrize(
    "args, error, words",
    [
        ((1, 0, 0), TypeError, "namespace must be str"),
        (("", 0, 0), ValueError, "1..256 characters"),
        (("x" * 257, 0, 0), ValueError, "1..256 characters"),
        (("a\x00b", 0, 0), ValueError, "printable"),
        (("s", -1, 0), ValueError, "layer must be >= 0"),
        (("s", 0, -5), ValueError, "index must be >= 0"),
        (("s", 0.0, 0), TypeError, "layer must be int"),
        (("s", 0, True), TypeError, "index must be int"),
    ],
)
def test_block_key_rejects_bad_fields(args, error, words):
    with pytest.raises(error, match=words):
        BlockKey(*args)


def test_kv_block_properties(make_block):
    block = make_block(kv_heads=3, tokens=5, head_dim=8)
    assert (block.kv_heads, block.tokens, block.head_dim) == (3, 5, 8)
    assert block.nbytes == 2 * 3 * 5 * 8 * 2
    assert block.equal(block.clone())
    assert not block.equal(make_block(kv_heads=3, tokens=5, head_dim=8, seed=1))


@pytest.mark.parametrize(
    "keys, values, error, words",
    [
        (torch.zeros(2, 4), torch.zeros(2, 4), ValueError, r"\[kv_heads, tokens, head_dim\]"),
        (torch.zeros(2, 4, 8, dtype=torch.int32), torch.zeros(2, 4, 8, dtype=torch.int32), TypeError, "must be one of"),
        (torch.zeros(2, 4, 8), torch.zeros(2, 5, 8), ValueError, "same shape"),
        (torch.zeros(2, 4, 8), torch.zeros(2, 4, 8, dtype=torch.float16), TypeError, "same dtype"),
        (torch.zeros(2, 0, 8), torch.zeros(2, 0, 8), ValueError, "must not be empty"),
        ([[[0.0]]], torch.zeros(1, 1, 1), TypeError, "torch.Tensor"),
    ],
)
def test_kv_block_rejects_bad_tensors(keys, values, error, words):
    with pytest.raises(error, match=words):
        KVBlock(keys, values)
