"""Shared fixtures: real tensors from seeded generators, and a fresh directory per test."""

from __future__ import annotations

import pytest
import torch

from tiered import KVBlock


def random_block(
    kv_heads: int = 2,
    tokens: int = 16,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> KVBlock:
    """A block of gaussian keys and values. keys, values: [kv_heads, tokens, head_dim]."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(kv_heads, tokens, head_dim, generator=generator).to(dtype)
    values = torch.randn(kv_heads, tokens, head_dim, generator=generator).to(dtype)
    return KVBlock(keys, values)


@pytest.fixture
def make_block():
    return random_block


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
