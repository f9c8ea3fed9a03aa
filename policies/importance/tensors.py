"""Tensor helpers every estimator shares: shape checks, per-block sums, key bounds, GQA grouping.

Shapes, as the KV manager hands them over at one decode step of one layer:
    query    [heads, head_dim]             RoPE applied; heads = kv_heads * group
    key_min  [blocks, kv_heads, head_dim]  per-channel minimum of each block's keys (Quest)
    key_max  [blocks, kv_heads, head_dim]  per-channel maximum
    weights  [heads, tokens]               attention probabilities of one query over the tokens,
                                           0 where a token was not attended; tokens <= blocks * block_tokens
"""

from __future__ import annotations

import torch


def check_query_bounds(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> tuple[int, int]:
    """Raise ValueError/TypeError unless the shapes above hold; returns (kv_heads, group)."""
    for name, tensor, dims in (("query", query, 2), ("key_min", key_min, 3), ("key_max", key_max, 3)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != dims or not tensor.is_floating_point():
            expected = "[heads, head_dim]" if dims == 2 else "[blocks, kv_heads, head_dim]"
            raise ValueError(
                f"{name} must be a floating tensor of shape {expected}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
    if key_min.shape != key_max.shape:
        raise ValueError(
            f"key_min and key_max must have the same shape, got {tuple(key_min.shape)} and {tuple(key_max.shape)}"
        )
    heads, head_dim = query.shape
    _, kv_heads, bound_dim = key_min.shape
    if bound_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} differs from the key bounds' head_dim {bound_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return kv_heads, heads // kv_heads


def check_weights(weights: torch.Tensor, heads: int, blocks: int, block_tokens: int) -> None:
    """Raise unless weights is [heads, tokens] with tokens <= blocks * block_tokens."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != 2 or not weights.is_floating_point() or weights.shape[0] != heads:
        raise ValueError(
            f"weights must be a floating tensor of shape [heads={heads}, tokens], "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )
    if weights.shape[1] > blocks * block_tokens:
        raise ValueError(
            f"weights cover {weights.shape[1]} tokens but {blocks} blocks of {block_tokens} tokens "
            f"hold at most {blocks * block_tokens}"
        )


def check_positive_int(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}.{name} must be int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


def check_nonnegative_int(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}.{name} must be int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


def blocks_of(tokens: int, block_tokens: int) -> int:
    """Blocks that hold `tokens` tokens (the last one may be partial)."""
    return -(-tokens // block_tokens)


def block_sums(per_token: torch.Tensor, block_tokens: int, blocks: int | None = None) -> torch.Tensor:
    """Sum [rows, tokens] over each block's tokens: [rows, blocks] (zero-padded to `blocks`)."""
    rows, tokens = per_token.shape
    blocks = blocks_of(tokens, block_tokens) if blocks is None else blocks
    padded = per_token.new_zeros(rows, blocks * block_tokens)  # [rows, blocks * block_tokens]
    padded[:, :tokens] = per_token
    return padded.view(rows, blocks, block_tokens).sum(-1)


def block_mass(weights: torch.Tensor, block_tokens: int, blocks: int | None = None) -> torch.Tensor:
    """Attention mass per block: weights [heads, tokens] -> [heads, blocks] in float32."""
    return block_sums(weights.float(), block_tokens, blocks)


def group_heads(per_head: torch.Tensor, kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Reduce [heads, n] over the query heads of each KV group: [kv_heads, n].

    Query head h belongs to KV head h // group (the layout of Llama-family GQA).
    """
    heads, n = per_head.shape
    grouped = per_head.view(kv_heads, heads // kv_heads, n)  # [kv_heads, group, n]
    if how == "mean":
        return grouped.mean(1)
    if how == "max":
        return grouped.amax(1)
    if how == "sum":
        return grouped.sum(1)
    raise ValueError(f"how must be 'mean', 'max' or 'sum', got {how!r}")


def key_bounds(keys: torch.Tensor, block_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's per-block summaries of a layer's keys.

    keys: [kv_heads, tokens, head_dim] -> (key_min, key_max), each [blocks, kv_heads, head_dim],
    the per-channel minimum and maximum over each block's tokens (the last block may be partial).
    """
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[1] == 0:
        raise ValueError(
            f"keys must be a tensor of shape [kv_heads, tokens>0, head_dim], got {getattr(keys, 'shape', keys)}"
        )
    check_positive_int("key_bounds", block_tokens=block_tokens)
    kv_heads, tokens, head_dim = keys.shape
    blocks = blocks_of(tokens, block_tokens)
    full = tokens // block_tokens
    key_min = keys.new_empty(blocks, kv_heads, head_dim)  # [blocks, kv_heads, head_dim]
    key_max = keys.new_empty(blocks, kv_heads, head_dim)
    if full:
        grid = keys[:, : full * block_tokens].reshape(kv_heads, full, block_tokens, head_dim)
        key_min[:full] = grid.amin(2).transpose(0, 1)
        key_max[:full] = grid.amax(2).transpose(0, 1)
    if blocks > full:
        tail = keys[:, full * block_tokens :]  # [kv_heads, partial, head_dim]
        key_min[full] = tail.amin(1)
        key_max[full] = tail.amax(1)
    return key_min, key_max
