"""The fused decode attention over spans of the device pool's rows (cpu_kernels.attend_rows) equals
plain attention over the same rows joined, and refuses what it cannot read safely."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.kv.attention import attention_over_runs, grouped_attention, pool_spans
from tiered.codecs import cpu_kernels
from tiered.gather import DenseRun

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"no C compiler: {cpu_kernels.build_error()}")

KV_HEADS, SLOTS, BLOCK, DIM = 2, 12, 8, 32


def pools(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values pools: [kv_heads, slots, block_tokens, head_dim] fp32."""
    generator = torch.Generator().manual_seed(seed)
    shape = (KV_HEADS, SLOTS, BLOCK, DIM)
    return torch.randn(shape, generator=generator) * 3, torch.randn(shape, generator=generator)


def reference(q, keys_pool, values_pool, spans_per_head):
    """Softmax attention of q ([heads, 1, D]) over each KV head's spans of rows, joined in order."""
    group = q.shape[0] // KV_HEADS
    outs, lses = [], []
    for h, spans in enumerate(spans_per_head):
        rows_k, rows_v = keys_pool[h].reshape(-1, DIM), values_pool[h].reshape(-1, DIM)
        index = torch.cat([torch.arange(first, first + count) for first, count in spans])
        k, v = rows_k[index], rows_v[index]  # [S, D]
        scores = q[h * group : (h + 1) * group, 0] @ k.T / math.sqrt(DIM)  # [group, S]
        outs.append(torch.softmax(scores, -1) @ v)
        lses.append(torch.logsumexp(scores, -1))
    return torch.cat(outs)[:, None], torch.cat(lses)[:, None]


def assert_equals_reference(q, keys_pool, values_pool, spans_per_head):
    """attend_rows over each head's spans ((first row within the head, count)) equals reference."""
    head_rows = SLOTS * BLOCK
    first = [h * head_rows + f for h, spans in enumerate(spans_per_head) for f, _ in spans]
    count = [c for spans in spans_per_head for _, c in spans]
    out, lse = cpu_kernels.attend_rows(q, keys_pool, values_pool, first, count, 1 / math.sqrt(DIM))
    expected_out, expected_lse = reference(q, keys_pool, values_pool, spans_per_head)
    assert torch.allclose(out, expected_out, atol=2e-6)
    assert torch.allclose(lse, expected_lse, atol=2e-6)


@pytest.mark.parametrize("group", [1, 3])
def test_spans_per_head_equal_attention_over_the_joined_rows(group):
    """Odd span lengths, spans that differ per head (sparse pages), GQA groups of 1 and 3."""
    keys_pool, values_pool = pools()
    q = torch.randn(KV_HEADS * group, 1, DIM, generator=torch.Generator().manual_seed(2))
    spans = [[(3, 5), (40, 17), (90, 1)], [(0, 8), (10, 13), (60, 30)]]  # (first row within the head, count)
    assert_equals_reference(q, keys_pool, values_pool, spans)


def test_many_scattered_spans_equal_attention_over_the_joined_rows():
    """A sparse step's read: many short spans per head in shuffled slots, the last at the pool's
    end (the kernel fetches the spans ahead while it reads one)."""
    keys_pool, values_pool = pools(7)
    q = torch.randn(2 * KV_HEADS, 1, DIM, generator=torch.Generator().manual_seed(8))
    head_rows = SLOTS * BLOCK
    spans = []
    for h in range(KV_HEADS):
        order = torch.randperm(head_rows // 4, generator=torch.Generator().manual_seed(h))[:20].tolist()
        spans.append([(4 * page, 4) for page in order] + [(head_rows - 3, 3)])
    assert_equals_reference(q, keys_pool, values_pool, spans)


def test_a_head_without_keys_gets_zeros_and_minus_infinity():
    keys_pool, values_pool = pools()
    q = torch.randn(KV_HEADS, 1, DIM)
    out, lse = cpu_kernels.attend_rows(q, keys_pool, values_pool, [0, SLOTS * BLOCK], [0, 7], 1.0)
    assert torch.equal(out[0], torch.zeros(1, DIM)) and lse[0, 0] == float("-inf")
    assert torch.isfinite(lse[1]).all()


def test_pool_views_are_attended_by_the_kernel_and_equal_the_torch_path():
    """Runs as gather makes them (views of the pools with pool_row) go to the kernel; the same runs
    without pool_row take the torch path; both equal attention over one joined copy."""
    keys_pool, values_pool = pools(1)
    q = torch.randn(3 * KV_HEADS, 1, DIM, generator=torch.Generator().manual_seed(3))

    def run(first_slot, last_slot, tokens, start, pooled=True):
        chosen = slice(first_slot, last_slot + 1)
        return DenseRun(keys_pool[:, chosen].reshape(KV_HEADS, -1, DIM)[:, :tokens],
                        values_pool[:, chosen].reshape(KV_HEADS, -1, DIM)[:, :tokens], start,
                        pool_row=first_slot * BLOCK if pooled else None)

    runs = [run(5, 8, 4 * BLOCK, 0), run(1, 2, BLOCK + 3, 4 * BLOCK)]
    assert pool_spans(runs) is not None
    plain = [run(5, 8, 4 * BLOCK, 0, pooled=False), run(1, 2, BLOCK + 3, 4 * BLOCK, pooled=False)]
    assert pool_spans(plain) is None
    position = torch.tensor([5 * BLOCK + 2])
    joined_keys = torch.cat([r.keys for r in runs], 1)
    joined_values = torch.cat([r.values for r in runs], 1)
    expected, _ = grouped_attention(q, joined_keys, joined_values, position)
    assert torch.allclose(attention_over_runs(q, runs, position), expected, atol=2e-6)
    assert torch.allclose(attention_over_runs(q, plain, position), expected, atol=2e-6)


def test_bad_spans_and_tensors_are_refused():
    keys_pool, values_pool = pools()
    q = torch.randn(KV_HEADS, 1, DIM)
    rows = KV_HEADS * SLOTS * BLOCK
    with pytest.raises(ValueError, match="past the"):
        cpu_kernels.attend_rows(q, keys_pool, values_pool, [0, rows - 4], [1, 5], 1.0)
    with pytest.raises(ValueError, match="past the"):
        cpu_kernels.attend_rows(q, keys_pool, values_pool, [-1, 0], [1, 1], 1.0)
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_kernels.attend_rows(q, keys_pool.half(), values_pool.half(), [0, 0], [1, 1], 1.0)
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_kernels.attend_rows(q, keys_pool[:, ::2], values_pool[:, ::2], [0, 0], [1, 1], 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        odd = torch.randn(KV_HEADS, 4, 8, 24)
        cpu_kernels.attend_rows(torch.randn(KV_HEADS, 1, 24), odd, odd, [0, 0], [1, 1], 1.0)
    with pytest.raises(ValueError, match="spans each"):
        cpu_kernels.attend_rows(q, keys_pool, values_pool, [0, 0, 0], [1, 1, 1], 1.0)


def test_device_runs_beside_quantized_blocks_merge_to_the_same_attention():
    """attend_parts: the pool's runs in one fused call, merged with a quantized block read where it
    lies, equal the same parts attended run by run (no pool_row)."""
    from runtime.kv.attention import attend_parts
    from tiered import KVBlock
    from tiered.codecs import make_codec
    from tiered.gather import EncodedRun

    keys_pool, values_pool = pools(4)
    q = torch.randn(3 * KV_HEADS, 1, DIM, generator=torch.Generator().manual_seed(5))
    codec = make_codec("int8")
    below = codec.encode(KVBlock(torch.randn(KV_HEADS, BLOCK, DIM), torch.randn(KV_HEADS, BLOCK, DIM)))

    def parts(pooled):
        runs = [DenseRun(keys_pool[:, 2:4].reshape(KV_HEADS, -1, DIM), values_pool[:, 2:4].reshape(KV_HEADS, -1, DIM), 0,
                         pool_row=2 * BLOCK if pooled else None),
                DenseRun(keys_pool[:, 7].reshape(KV_HEADS, -1, DIM)[:, :5], values_pool[:, 7].reshape(KV_HEADS, -1, DIM)[:, :5],
                         3 * BLOCK, pool_row=7 * BLOCK if pooled else None)]
        return [runs[0], EncodedRun(codec, [below], [2 * BLOCK]), runs[1]]

    position = torch.tensor([3 * BLOCK + 4])
    assert pool_spans([p for p in parts(True) if isinstance(p, DenseRun)]) is not None
    assert torch.allclose(attend_parts(q, parts(True), position), attend_parts(q, parts(False), position), atol=2e-6)


def test_heads_split_over_threads_give_the_same_attention():
    """A large read goes to torch's threads, KV heads apart: the same result as one thread."""
    generator = torch.Generator().manual_seed(6)
    keys_pool = torch.randn(KV_HEADS, 100, 64, DIM, generator=generator)  # 6,400 rows a head
    values_pool = torch.randn(KV_HEADS, 100, 64, DIM, generator=generator)
    q = torch.randn(3 * KV_HEADS, 1, DIM, generator=generator)
    first, count = [0, 6400 + 100], [6000, 6000]  # enough rows to be split
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = cpu_kernels.attend_rows(q, keys_pool, values_pool, first, count, 0.2)
        torch.set_num_threads(2)
        split = cpu_kernels.attend_rows(q, keys_pool, values_pool, first, count, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], split[0]) and torch.equal(alone[1], split[1])
    spans = [[(0, 6000)], [(100, 6000)]]
    expected_out, _ = reference(q * (0.2 * math.sqrt(DIM)), keys_pool, values_pool, spans)
    assert torch.allclose(split[0], expected_out, atol=1e-5)
