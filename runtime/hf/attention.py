"""The "tiered" attention of transformers models: a decode step reads a TieredCache's blocks where they lie.

With `model.set_attn_implementation("tiered")` (or `from_pretrained(..., attn_implementation="tiered")`,
after importing runtime.hf), a TieredLayer hands a decode step (one new token per row) to
`tiered_attention` without reading its history back into two new tensors: each row's device blocks
are attended in the pool, its quantized blocks through their codec's fused kernel
(runtime.kv.attention). Every other call (prefill, a padding mask, another cache, softcapping,
sinks) is transformers' SDPA attention over K/V as the cache returns them, so results do not depend
on which path ran beyond float rounding.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from runtime.kv.attention import attend_stored

ATTENTION = "tiered"
_DEFERRED = "_tiered_layer"  # the attribute of a deferred read's key tensor naming its TieredLayer


def defer(key_states: torch.Tensor, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """What TieredLayer.update returns instead of the history: the new tokens' K/V, marked as
    standing for `layer`'s whole history ([batch, kv_heads, 1, head_dim] each)."""
    marked = key_states.detach()  # a new tensor object: the caller's own is left unmarked
    setattr(marked, _DEFERRED, layer)
    return marked, marked


def deferred_layer(key: torch.Tensor):
    """The TieredLayer a key tensor stands for, or None for plain K/V."""
    return getattr(key, _DEFERRED, None)


def tiered_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface. query: [batch, heads, q_len, head_dim]; returns the output
    [batch, q_len, heads, head_dim] and no weights."""
    layer = deferred_layer(key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    store = layer.state.store
    if (attention_mask is not None or dropout or store.device != query.device
            or any(kwargs.get(name) is not None for name in ("softcap", "s_aux"))):
        key, value = layer.read_all()  # what the fused read does not cover: the history as tensors
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    head_dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, 1.0 / math.sqrt(head_dim)):
        query = query * (scaling * math.sqrt(head_dim))  # the fused read scales by 1/sqrt(head_dim)
    positions = torch.tensor([layer.tokens - 1], device=query.device)  # [1]: the new token's
    sparse, tokens = layer.state.sparse, layer.tokens
    if sparse is not None and not sparse.reads_sparse(layer.layer_idx, tokens):
        sparse = None
    rows = []
    with torch.no_grad():
        for r, row in enumerate(layer.rows):  # each row's output: [heads, 1, head_dim]
            if sparse is None:
                rows.append(attend_stored(store, row.keys, tokens, query[r], positions))
            else:  # the pages an importance estimator picks per KV head
                rows.append(sparse.attend(r, store, layer.layer_idx, row.keys, tokens, query[r], positions))
    out = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)  # [batch, heads, 1, head_dim]
    return out.transpose(1, 2), None  # [batch, 1, heads, head_dim]


AttentionInterface.register(ATTENTION, tiered_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA gets: None when causal alone
