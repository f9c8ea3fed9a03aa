"""Attention over quantized blocks where they lie: the torch reference equals attention over the
dequantized blocks, the fused C kernel and the Triton kernel (interpreter here, CUDA when present)
equal the reference, and partial results merge exactly."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiered import KVBlock
from tiered.codecs import Encoded, cpu_kernels, make_codec
from tiered.codecs.attend_reference import attend_quantized, merge_partials

from ..conftest import cuda
from .attend_cases import CASES, Case, make_case

ROOT = Path(__file__).resolve().parents[2]


def dense_attention(q, keys, values, q_positions, k_positions):
    """Plain softmax attention with GQA. q: [heads, n, D]; keys, values: [kv_heads, S, D]."""
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [heads, S, D]
    scores = q @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])  # [heads, n, S]
    if q_positions is not None:
        scores = scores.masked_fill(k_positions[None, None, :] > q_positions[None, :, None], float("-inf"))
    return torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1)


def dequantized(case, payloads):
    """Keys and values of the case's blocks decoded by the codec, joined: [kv_heads, S, D] each."""
    codec = make_codec(f"int{case.bits}", group=case.group)
    blocks = [codec.decode(Encoded(codec.spec, torch.float32, (case.kv_heads, t, case.head_dim), p), "cpu")
              for p, t in zip(payloads, case.tokens)]
    return torch.cat([b.keys for b in blocks], 1), torch.cat([b.values for b in blocks], 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_equals_attention_over_dequantized_blocks(case):
    q, payloads, q_positions = make_case(case)
    fmt = make_codec(f"int{case.bits}", group=case.group).fmt
    out, lse = attend_quantized(fmt, q, payloads, case.tokens, case.starts, case.kv_heads, q_positions)
    keys, values = dequantized(case, payloads)
    expected_out, expected_lse = dense_attention(q, keys, values, q_positions, torch.arange(keys.shape[1]))
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_codec_attend_equals_dequantized_on_every_kind(name):
    """QuantizedCodec.attend dispatches (fp8 to the reference, int to the C kernel)."""
    codec = make_codec(name)
    generator = torch.Generator().manual_seed(5)
    blocks = [KVBlock(torch.randn(2, t, 32, generator=generator), torch.randn(2, t, 32, generator=generator))
              for t in (64, 64, 11)]  # each [kv_heads, tokens, head_dim]
    encoded = [codec.encode(b) for b in blocks]
    q = torch.randn(6, 2, 32, generator=generator)  # [heads, n, head_dim]
    positions = torch.tensor([100, 138])
    out, lse = codec.attend(q, encoded, [0, 64, 128], positions)
    decoded = [codec.decode(e, "cpu") for e in encoded]
    keys, values = torch.cat([d.keys for d in decoded], 1), torch.cat([d.values for d in decoded], 1)
    expected_out, expected_lse = dense_attention(q, keys, values, positions, torch.arange(139))
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=2e-5, rtol=1e-5)


def test_codec_attend_refuses_a_query_of_the_wrong_shape():
    codec = make_codec("int8")
    encoded = [codec.encode(KVBlock(torch.randn(2, 8, 16), torch.randn(2, 8, 16)))]
    with pytest.raises(ValueError, match="heads"):
        codec.attend(torch.randn(3, 1, 16), encoded, [0])  # 3 query heads cannot share 2 KV heads
    with pytest.raises(ValueError, match="at least one"):
        codec.attend(torch.randn(4, 1, 16), [], [])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cpu_kernel_equals_the_reference(case):
    assert cpu_kernels.available(), cpu_kernels.build_error()
    q, payloads, q_positions = make_case(case)
    fmt = make_codec(f"int{case.bits}", group=case.group).fmt
    scale = case.head_dim**-0.5
    expected = attend_quantized(fmt, q, payloads, case.tokens, case.starts, case.kv_heads, q_positions, scale)
    got = cpu_kernels.attend(fmt, q, payloads, list(case.tokens), list(case.starts), case.kv_heads, q_positions, scale)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_cpu_kernel_splits_many_blocks_over_threads_with_the_same_result(monkeypatch):
    codec = make_codec("int4")
    generator = torch.Generator().manual_seed(2)
    encoded = [codec.encode(KVBlock(torch.randn(3, 64, 64, generator=generator), torch.randn(3, 64, 64, generator=generator)))
               for _ in range(24)]  # 24 blocks of [3, 64, 64]: enough codes to split
    payloads, tokens, starts = [e.payload for e in encoded], [64] * 24, [64 * i for i in range(24)]
    q = torch.randn(9, 1, 64, generator=generator)  # [heads, 1, head_dim]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = cpu_kernels.attend(codec.fmt, q, payloads, tokens, starts, 3, None, 0.125)
        torch.set_num_threads(1)
        single = cpu_kernels.attend(codec.fmt, q, payloads, tokens, starts, 3, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    reference = attend_quantized(codec.fmt, q, payloads, tokens, starts, 3, None, 0.125)
    for got in (split, single):
        torch.testing.assert_close(got[0], reference[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], reference[1], atol=1e-5, rtol=1e-5)


def test_a_query_that_sees_no_key_gets_zero_and_minus_infinity():
    case = CASES[1]
    q, payloads, _ = make_case(case)
    fmt = make_codec(f"int{case.bits}", group=case.group).fmt
    positions = torch.tensor([-1, 0, 10, 63, 64])  # the first sees nothing
    for attend in (attend_quantized, cpu_kernels.attend):
        out, lse = attend(fmt, q, payloads, list(case.tokens), list(case.starts), case.kv_heads, positions, 0.125)
        assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])) and bool(torch.isneginf(lse[:, 0]).all())
        assert bool(torch.isfinite(lse[:, 1:]).all())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cpu_kernel_with_a_page_mask_reads_only_each_heads_pages(bits):
    """A sparse step's read below the device: each KV head sees only its marked pages (whole
    blocks unmarked for a head are skipped); equal to attention over those tokens of the
    dequantized blocks, head by head, with pages of 16 positions and of 12."""
    case = Case("masked", bits, 32 if bits == 2 else 64, 3, 6, 64, 1, (64, 64, 64, 37), False)
    q, payloads, _ = make_case(case)
    fmt = make_codec(f"int{bits}", group=case.group).fmt
    pages = 16  # 15 pages of 16 positions hold the 229 tokens
    visible = torch.zeros(3, pages, dtype=torch.bool)
    visible[0, [0, 5, 14]] = True  # head 0 sees nothing of blocks 1 and 3's first pages
    visible[1, [1, 2, 3, 14]] = True  # head 1: all of block 0, nothing of blocks 1 and 2
    visible[2, 8:15] = True
    odd = torch.zeros(3, 20, dtype=torch.bool)  # pages of 12 positions: not aligned to blocks or the kernel's 8 keys
    odd[0, [0, 6, 19]] = odd[1, [5, 6]] = odd[2, 1:20:3] = True
    table = cpu_kernels.BlockTable(fmt, payloads, list(case.tokens), list(case.starts), 3, 64)
    keys, values = dequantized(case, payloads)  # [kv_heads, 229, 64] each
    for mask, page_tokens in ((visible, 16), (odd, 12)):
        out, lse = table.attend(q, None, 0.125, visible=mask, page_tokens=page_tokens)
        for h in range(3):
            rows = torch.nonzero(mask[h].repeat_interleave(page_tokens)[: keys.shape[1]]).flatten()
            heads = slice(2 * h, 2 * h + 2)
            scores = q[heads, 0] @ keys[h, rows].T * 0.125  # [2, visible tokens]
            torch.testing.assert_close(out[heads, 0], torch.softmax(scores, -1) @ values[h, rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[heads, 0], torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    whole = table.attend(q, None, 0.125, visible=torch.ones(3, pages, dtype=torch.bool), page_tokens=16)
    plain = table.attend(q, None, 0.125)
    assert torch.equal(whole[0], plain[0]) and torch.equal(whole[1], plain[1])


def test_a_bad_page_mask_is_refused():
    case = CASES[0]
    q, payloads, _ = make_case(case)
    table = cpu_kernels.BlockTable(make_codec("int8").fmt, payloads, list(case.tokens), list(case.starts), 3, 64)
    for visible, page_tokens, match in [
        (torch.ones(3, 12, dtype=torch.bool), 0, "positive int"),
        (torch.ones(3, 12, dtype=torch.bool), 16.0, "positive int"),
        (torch.ones(3, 11, dtype=torch.bool), 16, "covering 192"),
        (torch.ones(2, 12, dtype=torch.bool), 16, r"\[3, pages\]"),
        (torch.ones(3, 12, dtype=torch.uint8), 16, "bool"),
    ]:
        with pytest.raises(ValueError, match=match):
            table.attend(q, None, 0.125, visible=visible, page_tokens=page_tokens)


def test_merged_partials_equal_attention_over_all_keys():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(4, 3, 16, generator=generator)  # [heads, n, head_dim]
    keys, values = torch.randn(2, 50, 16, generator=generator), torch.randn(2, 50, 16, generator=generator)
    positions = torch.tensor([5, 30, 49])
    k_positions = torch.arange(50)
    expected = dense_attention(q, keys, values, positions, k_positions)
    cuts = [(0, 12), (12, 40), (40, 50)]  # the first query sees nothing of the last two parts
    parts = [dense_attention(q, keys[:, a:b], values[:, a:b], positions, k_positions[a:b]) for a, b in cuts]
    parts = [(torch.nan_to_num(out), lse) for out, lse in parts]  # softmax of nothing: 0, as the kernels give
    out, lse = merge_partials(parts)
    torch.testing.assert_close(out, expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, expected[1], atol=1e-6, rtol=1e-5)


def test_triton_attention_equals_the_reference_in_the_interpreter():
    """Triton's interpreter runs the CUDA kernel on the CPU, against the reference."""
    pytest.importorskip("triton")  # in the test extra; only platforms without wheels lack it
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "tests.tiered.triton_attend_check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": close") == len(CASES), result.stdout


@cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_attention_on_cuda_equals_the_reference(case):
    q, payloads, q_positions = make_case(case)
    codec = make_codec(f"int{case.bits}", group=case.group)
    expected = attend_quantized(codec.fmt, q, payloads, case.tokens, case.starts, case.kv_heads, q_positions)
    encoded = [Encoded(codec.spec, torch.float32, (case.kv_heads, t, case.head_dim), p)
               for p, t in zip(payloads, case.tokens)]
    got = codec.attend(q.cuda(), encoded, list(case.starts), None if q_positions is None else q_positions.cuda())
    torch.testing.assert_close(got[0].cpu(), expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1].cpu(), expected[1], atol=1e-4, rtol=1e-4)
