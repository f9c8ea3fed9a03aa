"""DenseKV, the reference AttentionBackend, against attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.model import AttentionBackend, DenseKV

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def naive_attention(q, keys, values, start):
    """q: [heads, n, d]; keys, values: [kv_heads, start + n, d]; repeated heads and an explicit mask."""
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [heads, tokens, d]
    scores = q @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])  # [heads, n, tokens]
    n, tokens = q.shape[1], keys.shape[1]
    visible = torch.arange(tokens)[None, :] <= (start + torch.arange(n))[:, None]  # [n, tokens]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ values


def random_qkv(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(HEADS, n, HEAD_DIM, generator=g).to(dtype), torch.randn(KV_HEADS, n, HEAD_DIM, generator=g).to(dtype),
            torch.randn(KV_HEADS, n, HEAD_DIM, generator=g).to(dtype))


def test_is_an_attention_backend():
    assert isinstance(DenseKV(2, KV_HEADS, HEAD_DIM), AttentionBackend)


@pytest.mark.parametrize("chunks", [[13], [5, 1, 1, 6], [1] * 9, [4, 20]])
def test_chunks_match_naive_attention(chunks):
    kv = DenseKV(num_layers=2, kv_heads=KV_HEADS, head_dim=HEAD_DIM, capacity_tokens=2)
    all_k, all_v, start = [], [], 0
    for seed, n in enumerate(chunks):
        q, k, v = random_qkv(n, seed)
        all_k.append(k)
        all_v.append(v)
        out = kv.attend(1, q, k, v, torch.arange(start, start + n))
        expected = naive_attention(q, torch.cat(all_k, 1), torch.cat(all_v, 1), start)
        assert out.shape == (HEADS, n, HEAD_DIM)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        start += n
    assert kv.length_tokens(1) == start and kv.length_tokens(0) == 0
    assert torch.equal(kv.keys(1), torch.cat(all_k, 1)) and torch.equal(kv.values(1), torch.cat(all_v, 1))


def test_non_contiguous_inputs():
    """The decoder hands over views of its fused projection; they are copied in, not aliased."""
    kv = DenseKV(1, KV_HEADS, HEAD_DIM)
    q, k, v = random_qkv(5, 0)
    qk = torch.cat([q, k]).transpose(0, 1).contiguous().transpose(0, 1)  # strided like the decoder's
    out = kv.attend(0, qk[:HEADS], qk[HEADS:], v, torch.arange(5))
    torch.testing.assert_close(out, naive_attention(q, k, v, 0), atol=1e-5, rtol=1e-5)
    qk.zero_()
    assert torch.equal(kv.keys(0), k)


def test_rejects_bad_calls_without_writing():
    kv = DenseKV(2, KV_HEADS, HEAD_DIM)
    q, k, v = random_qkv(3, 0)
    with pytest.raises(ValueError, match="continue layer 0's sequence at 0"):
        kv.attend(0, q, k, v, torch.arange(1, 4))
    with pytest.raises(ValueError, match="layer must be in"):
        kv.attend(2, q, k, v, torch.arange(3))
    with pytest.raises(ValueError, match="k and v must be"):
        kv.attend(0, q, k[:, :2], v, torch.arange(3))
    with pytest.raises(ValueError, match="q must be"):
        kv.attend(0, q[:5], k, v, torch.arange(3))
    with pytest.raises(TypeError, match="k and v must be torch.float32"):
        kv.attend(0, q, k.half(), v.half(), torch.arange(3))
    assert kv.length_tokens(0) == 0
    with pytest.raises(ValueError, match="capacity_tokens must be a positive int"):
        DenseKV(2, KV_HEADS, HEAD_DIM, capacity_tokens=0)
