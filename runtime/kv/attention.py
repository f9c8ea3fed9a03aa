"""Grouped-query attention over keys and values read from the tiered store.

Query heads are grouped by the KV head they read, so K and V are never repeated per query head.
`attend_parts` reads a layer whose blocks lie in several tiers: full-precision runs and quantized
payloads each give a partial result, merged by log-sum-exp.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tiered import BlockKey, TieredStore
from tiered.codecs import cpu_kernels
from tiered.codecs.attend_reference import merge_partials
from tiered.gather import DenseRun, EncodedRun


def hide_later_keys(scores: Tensor, key_positions: Tensor, q_positions: Tensor) -> None:
    """Causal mask, in place: scores [kv_heads, group * n, S] (query heads grouped per KV head, n
    queries each) of keys after a query's position become -inf. key_positions: [S]; q_positions: [n]."""
    kv_heads, rows, total = scores.shape
    n = q_positions.shape[0]
    hidden = key_positions[None, :] > q_positions[:, None]  # [n, S]
    scores.view(kv_heads, rows // n, n, total).masked_fill_(hidden, float("-inf"))


def grouped_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    q_positions: Tensor,
    k_positions: Tensor | None = None,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Causal attention of new queries over keys at known positions.

    q: [heads, n, head_dim]; keys, values: [kv_heads, S, head_dim]; q_positions: [n] int64.
    k_positions: [S] int64, the position of each key; None means keys are positions 0..S-1.
    Query head h reads KV head h // (heads // kv_heads); a key is visible to a query at or after
    its position. Scale 1/sqrt(head_dim), softmax in float32.

    Returns the output [heads, n, head_dim] in q's dtype, and with `return_weights` the softmax
    weights [heads, n, S] (float32).
    """
    heads, n, head_dim = q.shape
    kv_heads, total, _ = keys.shape
    group = heads // kv_heads
    grouped = q.reshape(kv_heads, group * n, head_dim)  # [kv_heads, group * n, head_dim]
    scores = torch.matmul(grouped, keys.transpose(1, 2)).float()  # [kv_heads, group * n, S]
    scores.mul_(1.0 / math.sqrt(head_dim))
    if n > 1 or k_positions is not None:
        key_positions = torch.arange(total, device=q.device) if k_positions is None else k_positions
        hide_later_keys(scores, key_positions, q_positions)
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.to(values.dtype), values)  # [kv_heads, group * n, head_dim]
    out = out.view(heads, n, head_dim)
    return out, (weights.view(heads, n, total) if return_weights else None)


def attention_over_runs(q: Tensor, runs: list, q_positions: Tensor) -> Tensor:
    """grouped_attention over full-precision runs of keys and values (tiered.gather.DenseRun, token j
    of a run at position run.start + j) without joining them into one copy: each run's scores, one
    softmax over all of them, each run's share of the values. One run is grouped_attention itself.
    A decode step (one query) over runs that are views of one pool is one fused CPU call.

    q: [heads, n, head_dim]; q_positions: [n] int64. Returns [heads, n, head_dim] in q's dtype."""
    if q.shape[1] == 1 and q.dtype == torch.float32:
        spans = pool_spans(runs)
        if spans is not None:
            return cpu_kernels.attend_rows(q, *spans, 1.0 / math.sqrt(q.shape[-1]))[0]
    if len(runs) == 1 and runs[0].start == 0:
        return grouped_attention(q, runs[0].keys, runs[0].values, q_positions)[0]
    heads, n, head_dim = q.shape
    kv_heads = runs[0].keys.shape[0]
    grouped = q.reshape(kv_heads, heads // kv_heads * n, head_dim)  # [kv_heads, group * n, head_dim]
    scores = []
    for run in runs:
        part = torch.matmul(grouped, run.keys.transpose(1, 2)).float()  # [kv_heads, group * n, tokens]
        if n > 1:  # a query sees the keys at or before its position
            key_positions = torch.arange(run.start, run.start + run.keys.shape[1], device=q.device)
            hide_later_keys(part, key_positions, q_positions)
        scores.append(part)
    joined = torch.cat(scores, dim=-1).mul_(1.0 / math.sqrt(head_dim))  # [kv_heads, group * n, S]
    weights = torch.softmax(joined, dim=-1)
    out = None
    for run, share in zip(runs, weights.split([run.keys.shape[1] for run in runs], dim=-1)):
        term = torch.matmul(share.to(run.values.dtype), run.values)  # [kv_heads, group * n, head_dim]
        out = term if out is None else out.add_(term)
    return out.view(heads, n, head_dim)


def pool_spans(runs: list) -> tuple[Tensor, Tensor, list[int], list[int]] | None:
    """The runs as spans of rows of the device pools, for cpu_kernels.attend_rows: (keys pool, values
    pool, first rows, row counts; both [kv_heads · runs], head after head), when every run is a view
    of the fp32 pools on the CPU (DenseRun.pool_row) and the kernels are built; else None."""
    if any(run.pool_row is None for run in runs):
        return None
    keys_pool, values_pool = runs[0].keys._base, runs[0].values._base
    if (keys_pool.dim() != 4 or keys_pool._base is not None or not keys_pool.is_cpu or keys_pool.dtype != torch.float32
            or keys_pool.shape[-1] % 16 or not cpu_kernels.available()):
        return None  # not the pools themselves ([kv_heads, slots, block_tokens, head_dim]), or not for the kernel
    head_rows = keys_pool.shape[1] * keys_pool.shape[2]  # rows of one KV head: slots · block_tokens
    first = [run.pool_row + h * head_rows for h in range(keys_pool.shape[0]) for run in runs]
    return keys_pool, values_pool, first, [run.keys.shape[1] for run in runs] * keys_pool.shape[0]


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def partial_attention(
    q: Tensor, keys: Tensor, values: Tensor, q_positions: Tensor | None, k_positions: Tensor
) -> tuple[Tensor, Tensor]:
    """grouped_attention's output over these keys alone, and its log-sum-exp, for merging with
    other parts (tiered.codecs.attend_reference.merge_partials).

    q: [heads, n, head_dim]; keys, values: [kv_heads, S, head_dim]; k_positions: [S] int64;
    q_positions: [n] int64, or None when every key is visible. Returns (out [heads, n, head_dim]
    fp32, lse [heads, n] fp32); a query that sees no key gets out 0 and lse -inf.
    """
    heads, n, head_dim = q.shape
    kv_heads, total, _ = keys.shape
    group = heads // kv_heads
    grouped = q.reshape(kv_heads, group * n, head_dim)  # [kv_heads, group * n, head_dim]
    if q_positions is None and _FLASH_CPU is not None and q.is_cpu and q.dtype == torch.float32:
        # the kernel F.scaled_dot_product_attention runs on the CPU, which also returns the lse;
        # query heads grouped per KV head, so K and V are not repeated: [1, kv_heads, group * n, head_dim]
        out, lse = _FLASH_CPU(grouped[None], keys[None], values[None], 0.0, False, scale=1.0 / math.sqrt(head_dim))[:2]
        return out.reshape(heads, n, head_dim), lse.reshape(heads, n)
    scores = torch.matmul(grouped, keys.transpose(1, 2)).float()  # [kv_heads, group * n, S]
    scores.mul_(1.0 / math.sqrt(head_dim))
    if q_positions is not None:
        hide_later_keys(scores, k_positions, q_positions)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [kv_heads, group * n, 1]
    weights = torch.exp(scores.sub_(torch.where(torch.isfinite(lse), lse, 0.0)))
    out = torch.matmul(weights.to(values.dtype), values).float()  # [kv_heads, group * n, head_dim]
    return out.view(heads, n, head_dim), lse.view(heads, n)


def attend_parts(q: Tensor, parts: list, q_positions: Tensor) -> Tensor:
    """Causal attention of q over a layer's blocks read as parts (tiered.gather.read_parts):
    full-precision runs through `partial_attention`, quantized payloads through their codec's
    fused kernel (read where they lie, never dequantized), merged exactly by log-sum-exp.

    q: [heads, n, head_dim]; q_positions: [n] int64. Returns [heads, n, head_dim] in q's dtype.
    """
    masked = q_positions if q.shape[1] > 1 else None  # one query, the newest: it sees every key
    partials = []
    dense = [part for part in parts if isinstance(part, DenseRun)]
    spans = pool_spans(dense) if masked is None and dense and q.dtype == torch.float32 else None
    if spans is not None:  # the device runs in one fused call
        partials.append(cpu_kernels.attend_rows(q, *spans, 1.0 / math.sqrt(q.shape[-1])))
        parts = [part for part in parts if isinstance(part, EncodedRun)]
    for part in parts:
        if isinstance(part, EncodedRun):
            partials.append(part.codec.attend(q, part.items, part.starts, masked, memo=part.memo))
            continue
        positions = part.positions
        if positions is None and masked is not None:
            positions = torch.arange(part.start, part.start + part.keys.shape[1], device=q.device)
        partials.append(partial_attention(q, part.keys, part.values, masked, positions))
    out, _ = merge_partials(partials)
    return out.to(q.dtype)


def attend_stored(store: TieredStore, keys: list[BlockKey], tokens: int, q: Tensor, q_positions: Tensor) -> Tensor:
    """Causal attention of q over the first `tokens` tokens of one layer's blocks `keys` in `store`,
    read where they lie: device runs with one softmax, quantized blocks through their codec's fused
    kernel. KeyError if a block is not in the store.

    q: [heads, n, head_dim]; q_positions: [n] int64. Returns [heads, n, head_dim] in q's dtype."""
    with store.reading_parts(keys, limit_tokens=tokens) as parts:
        if all(isinstance(part, DenseRun) and part.positions is None for part in parts):
            return attention_over_runs(q, parts, q_positions)  # device runs, one softmax
        return attend_parts(q, parts, q_positions)  # quantized blocks read where they lie
