"""DenseKV: the plainest AttentionBackend, a full cache per layer in one growing buffer.

The reference that tiered backends are checked against, and the cache for tests and quick runs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class DenseKV:
    """Every token's keys and values of one sequence, per layer, in a contiguous buffer that doubles
    when full (so appends are amortized O(1) and attention reads one strided view)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", capacity_tokens: int = 256) -> None:
        for name, value in (("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("capacity_tokens", capacity_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.kv_heads, self.head_dim, self.dtype, self.device = kv_heads, head_dim, dtype, torch.device(device)
        shape = (kv_heads, capacity_tokens, head_dim)
        self._keys = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]  # each [kv_heads, capacity, head_dim]
        self._values = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._lengths = [0] * num_layers
        self.scale = 1.0 / math.sqrt(head_dim)

    @classmethod
    def for_model(cls, model, capacity_tokens: int = 256) -> DenseKV:
        """An empty cache shaped for `model` (a runtime.model.Model)."""
        cfg = model.config
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device, capacity_tokens)

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    def length_tokens(self, layer: int = 0) -> int:
        """How many tokens `layer` holds."""
        return self._lengths[layer]

    def keys(self, layer: int) -> Tensor:
        """The cached keys of `layer`: [kv_heads, tokens, head_dim] (a view)."""
        return self._keys[layer][:, : self._lengths[layer]]

    def values(self, layer: int) -> Tensor:
        """The cached values of `layer`: [kv_heads, tokens, head_dim] (a view)."""
        return self._values[layer][:, : self._lengths[layer]]

    def _check(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> int:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        n = positions.numel()
        expected = (self.kv_heads, n, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k and v must be {list(expected)}, got {list(k.shape)} and {list(v.shape)}")
        if q.dim() != 3 or q.shape[1:] != (n, self.head_dim) or q.shape[0] % self.kv_heads:
            raise ValueError(f"q must be [heads, {n}, {self.head_dim}] with heads a multiple of {self.kv_heads}, got {list(q.shape)}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"k and v must be {self.dtype}, got {k.dtype} and {v.dtype}")
        start = self._lengths[layer]
        if int(positions[0]) != start:
            raise ValueError(f"positions must continue layer {layer}'s sequence at {start}, got {int(positions[0])}")
        return start

    def _reserve(self, layer: int, tokens: int) -> None:
        capacity = self._keys[layer].shape[1]
        if tokens <= capacity:
            return
        while capacity < tokens:
            capacity *= 2
        for buffers in (self._keys, self._values):
            grown = torch.empty((self.kv_heads, capacity, self.head_dim), dtype=self.dtype, device=self.device)
            grown[:, : self._lengths[layer]] = buffers[layer][:, : self._lengths[layer]]
            buffers[layer] = grown

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """See AttentionBackend.attend. q: [heads, n, head_dim]; k, v: [kv_heads, n, head_dim];
        positions: [n]. Returns [heads, n, head_dim]."""
        start = self._check(layer, q, k, v, positions)
        n = q.shape[1]
        end = start + n
        self._reserve(layer, end)
        self._keys[layer][:, start:end] = k
        self._values[layer][:, start:end] = v
        self._lengths[layer] = end
        keys, values = self._keys[layer][:, :end], self._values[layer][:, :end]  # each [kv_heads, end, head_dim]
        return causal_attention(q, keys, values, start, self.scale)


def causal_attention(q: Tensor, keys: Tensor, values: Tensor, start: int, scale: float) -> Tensor:
    """Attention of n queries at positions start..start+n-1 over keys/values of positions 0..start+n-1.

    q: [heads, n, head_dim]; keys, values: [kv_heads, start + n, head_dim]. Query head h reads kv head
    h // (heads // kv_heads) (SDPA's grouped-query mode). Returns [heads, n, head_dim]."""
    heads, n, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    if n == 1 or start == 0:  # a single query sees every key; a fresh prefill is plain causal
        return F.scaled_dot_product_attention(q[None], keys[None], values[None], is_causal=n > 1, scale=scale,
                                              enable_gqa=group > 1)[0]
    # new token i (position start + i) sees keys 0..start + i: mask [n, start + n], True = attend
    allowed = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=allowed, scale=scale,
                                          enable_gqa=group > 1)[0]
