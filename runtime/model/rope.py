"""Rotary position embeddings in Hugging Face's rotate-half layout, as cos/sin tables per position."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> Tensor:
    """Rotation speed of each pair of channels, after the config's rope scaling. Returns [head_dim // 2] fp32."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    params = config.rope
    if config.rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif config.rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < old_context / high) * ~(wavelength > old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin for every position the model accepts: each [max_position_embeddings, head_dim].

    sin is stored with its first half negated, so that rotate_half(x) * sin == swap_halves(x) * signed_sin."""
    positions = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()
    angles = torch.outer(positions, inverse_frequencies(config))  # [positions, head_dim // 2]
    angles = torch.cat((angles, angles), dim=-1)  # [positions, head_dim]
    cos, sin = angles.cos(), angles.sin()
    half = config.head_dim // 2
    sin[:, :half] = -sin[:, :half]
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x: [n, heads, head_dim]; cos, signed_sin: [n, 1, head_dim]. Returns x rotated, [n, heads, head_dim]."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (second half, first half)
    # Two products and a sum, not addcmul: a fused multiply-add rounds differently from transformers.
    return x * cos + swapped * signed_sin
