"""Attention over quantized blocks where they lie, in plain torch: the definition the fused kernels
(cpu_kernels.c `tiered_attend`, triton_kernels.attend) reproduce within float tolerance.

With KIVI's axes nothing is dequantized into a block-sized tensor. Keys are quantized per channel
in groups of tokens: a key is k[t, d] = min[g, d] + code[t, d] · scale[g, d] for the group g of
token t, so a query's score against it is

    q · k[t] = (q ⊙ scale[g]) · code[t] + q · min[g]

(one product of the query with the group's scales, then integer codes). Values are quantized per
token in groups of channels: v[t, d] = min[t, c] + code[t, d] · scale[t, c] for the group c of
channel d, so the weighted sum folds each token's scale and min into its weight:

    Σ_t p[t] · v[t, d] = Σ_t (p[t] · scale[t, c]) · code[t, d] + Σ_t p[t] · min[t, c]

Results are partial: an output normalized over the blocks given, and its log-sum-exp, so the
attention over several sets of blocks (full-precision device blocks, quantized host blocks) is
merged exactly by `merge_partials`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .layout import QuantFormat
from .reference import param_views, section, unpack


def _codes_f32(fmt: QuantFormat, payload: torch.Tensor, layout, name: str) -> torch.Tensor:
    """The codes of section `name` as fp32 numbers: [H, T, D] (fp8 codes as their e4m3 values)."""
    codes = unpack(section(payload, layout, name), fmt.bits, layout.kv_heads * layout.tokens * layout.head_dim)
    codes = codes.view(layout.shape)
    return codes.view(torch.float8_e4m3fn).float() if fmt.kind == "fp8" else codes.float()


def _key_scores(fmt: QuantFormat, payload: torch.Tensor, layout, grouped_q: torch.Tensor) -> torch.Tensor:
    """Scores of grouped_q [H, R, D] (fp32, pre-scaled) against one block's keys: [H, R, T]."""
    params = param_views(payload, layout, "key")  # each [H, ⌈T/G⌉, D] fp16
    scales = params[-1].float()
    mins = params[0].float() if fmt.kind == "int" else None
    codes = _codes_f32(fmt, payload, layout, "key_codes")  # [H, T, D]
    tokens, group = layout.tokens, fmt.group
    scores = grouped_q.new_empty(grouped_q.shape[0], grouped_q.shape[1], tokens)  # [H, R, T]
    for g in range(layout.key_groups):
        first, last = g * group, min(tokens, (g + 1) * group)
        scaled_q = grouped_q * scales[:, g, None, :]  # q ⊙ scale: [H, R, D]
        part = torch.matmul(scaled_q, codes[:, first:last].transpose(1, 2))  # [H, R, tokens of g]
        if mins is not None:
            part += (grouped_q * mins[:, g, None, :]).sum(-1, keepdim=True)  # q · min: [H, R, 1]
        scores[:, :, first:last] = part
    return scores


def _weighted_values(fmt: QuantFormat, payload: torch.Tensor, layout, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t weights[t] · v[t] over one block's values, weights [H, R, T] fp32: [H, R, D]."""
    params = param_views(payload, layout, "value")  # each [H, T, ⌈D/G⌉] fp16
    scales = params[-1].float()
    mins = params[0].float() if fmt.kind == "int" else None
    codes = _codes_f32(fmt, payload, layout, "value_codes")  # [H, T, D]
    dim, group = layout.head_dim, fmt.group
    out = weights.new_zeros(weights.shape[0], weights.shape[1], dim)  # [H, R, D]
    for c in range(layout.value_groups):
        first, last = c * group, min(dim, (c + 1) * group)
        folded = weights * scales[:, None, :, c]  # p · scale: [H, R, T]
        out[:, :, first:last] = torch.matmul(folded, codes[:, :, first:last])
        if mins is not None:
            out[:, :, first:last] += torch.matmul(weights, mins[:, :, c, None])  # Σ p · min: [H, R, 1]
    return out


def visible(
    q_positions: torch.Tensor | None, starts: Sequence[int], tokens: Sequence[int], device: torch.device
) -> torch.Tensor | None:
    """[n, S] bool: key j (blocks laid end to end, block i's tokens at starts[i]..) is visible to
    query i when its position is at most q_positions[i]; None when q_positions is None (all are)."""
    if q_positions is None:
        return None
    positions = torch.cat([torch.arange(s, s + t, device=device) for s, t in zip(starts, tokens)])  # [S]
    return positions[None, :] <= q_positions.to(device)[:, None]


def attend_quantized(
    fmt: QuantFormat,
    q: torch.Tensor,
    payloads: Sequence[torch.Tensor],
    tokens: Sequence[int],
    starts: Sequence[int],
    kv_heads: int,
    q_positions: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over quantized blocks read from their payloads, never dequantized.

    fmt: the codec's format; q: [heads, n, head_dim] (query head h reads KV head h // (heads //
    kv_heads)); payloads[i]: [nbytes] uint8 of a block of tokens[i] tokens whose first token sits
    at position starts[i]; q_positions: [n] int64, a key is visible to a query at or after its
    position (None: every key is visible); scale: of the scores, default 1/sqrt(head_dim).

    Returns (out [heads, n, head_dim] fp32, normalized over these blocks; lse [heads, n] fp32, the
    log-sum-exp of the scaled scores). A query that sees no key gets out 0 and lse -inf.
    """
    heads, n, dim = q.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot read {kv_heads} KV heads")
    if not (len(payloads) == len(tokens) == len(starts)) or not payloads:
        raise ValueError("attend_quantized needs one or more payloads, each with its tokens and start")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    rows = heads // kv_heads * n
    grouped_q = q.float().reshape(kv_heads, rows, dim) * scale  # [H, R, D], row r = (head in group, query)
    layouts = [fmt.layout(kv_heads, t, dim) for t in tokens]
    scores = torch.cat([_key_scores(fmt, p, lay, grouped_q) for p, lay in zip(payloads, layouts)], dim=-1)  # [H, R, S]
    mask = visible(q_positions, starts, tokens, q.device)
    if mask is not None:
        scores.view(kv_heads, rows // n, n, -1).masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [H, R, 1]
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0))  # exp(-inf) = 0 where unseen
    out = torch.zeros(kv_heads, rows, dim, dtype=torch.float32, device=q.device)  # [H, R, D]
    offset = 0
    for payload, layout in zip(payloads, layouts):
        out += _weighted_values(fmt, payload, layout, weights[:, :, offset : offset + layout.tokens])
        offset += layout.tokens
    return out.view(heads, n, dim), lse.view(heads, n)


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention result from partial ones over disjoint sets of keys.

    parts[i] = (out [heads, n, head_dim], normalized over its keys; lse [heads, n] fp32). Returns
    (out fp32, lse) over all the keys: out = Σ_i exp(lse_i - lse) · out_i, lse = log Σ_i exp(lse_i).
    A query no part sees gets out 0 and lse -inf.
    """
    if not parts:
        raise ValueError("merging needs at least one partial result")
    if len(parts) == 1:
        return parts[0][0].float(), parts[0][1]
    lses = torch.stack([lse for _, lse in parts])  # [parts, heads, n]
    lse = torch.logsumexp(lses, dim=0)  # [heads, n]
    weights = torch.exp(lses - torch.where(torch.isfinite(lse), lse, 0.0))  # [parts, heads, n]
    out = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, parts))
    return out, lse
