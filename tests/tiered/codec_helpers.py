"""KV with the structure real models show, and the error each codec is allowed on it."""

from __future__ import annotations

import math

import torch

from tiered import KVBlock
from tiered.codecs import QuantizedCodec

# Relative error ‖x' - x‖ / ‖x‖ allowed on outlier_block(8, 64, 128) (measured: fp8 0.025,
# int8 0.005, int4 0.087, int2 0.39); lossless and cast codecs are tested exactly.
MAX_RELATIVE_ERROR = {"fp8": 0.035, "int8": 0.008, "int4": 0.12, "int2": 0.5}


def outlier_block(
    kv_heads: int = 8,
    tokens: int = 64,
    head_dim: int = 128,
    dtype: torch.dtype = torch.float16,
    outliers: int = 6,
    seed: int = 0,
) -> KVBlock:
    """Gaussian keys whose `outliers` channels are 10-50x larger than the rest (as real models'
    keys are), gaussian values. keys, values: [kv_heads, tokens, head_dim]."""
    generator = torch.Generator().manual_seed(seed)
    channel_scale = torch.ones(head_dim)
    chosen = torch.randperm(head_dim, generator=generator)[:outliers]
    channel_scale[chosen] = 10 + 40 * torch.rand(len(chosen), generator=generator)
    keys = torch.randn(kv_heads, tokens, head_dim, generator=generator) * channel_scale
    values = torch.randn(kv_heads, tokens, head_dim, generator=generator)
    return KVBlock(keys.to(dtype), values.to(dtype))


def relative_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return float((decoded.float() - original.float()).norm() / original.float().norm())


def group_extent(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of the group of each element, grouped along the last axis. x: [..., L]"""
    length = x.shape[-1]
    pad = (-length) % group
    padded = torch.cat([x, x[..., :1].expand(*x.shape[:-1], pad)], dim=-1)  # repeats an element
    groups = padded.unflatten(-1, (-1, group))  # [..., L/group, group]
    lo = groups.amin(-1, keepdim=True).expand_as(groups).flatten(-2)[..., :length]
    hi = groups.amax(-1, keepdim=True).expand_as(groups).flatten(-2)[..., :length]
    return lo, hi


def error_bound(codec: QuantizedCodec, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest |x - x'| each element may see, grouped along the last axis of x (fp32).

    int: half a step of the group's scale, plus what rounding the scale to fp16 can push the top
    code (q·scale·2^-10), plus rounding the result to `dtype`. fp8: e4m3's half ulp (2^-4
    relative), its subnormal step (2^-10 of the scale), the scale's fp16 rounding at the clamp.
    """
    fmt = codec.fmt
    lo, hi = group_extent(x, fmt.group)
    out_rounding = x.abs() * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-10)
    if fmt.kind == "int":
        step = (hi - lo) / fmt.qmax
        return step * (0.5 + fmt.qmax * 2.0**-10) + out_rounding + 1e-6
    scale = torch.maximum(hi.abs(), lo.abs()) / 448
    return x.abs() * 2.0**-4 + scale * (2.0**-10 + 448 * 2.0**-10) + out_rounding + 1e-6


def formula_nbytes(name: str, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype, group: int = 0) -> int:
    """The documented payload size (tiered/codecs/layout.py), written out independently."""
    elements = kv_heads * tokens * head_dim
    if name == "raw":
        return 2 * elements * dtype.itemsize
    if name in ("fp16", "bf16"):
        return 2 * elements * 2
    bits = {"fp8": 8, "int8": 8, "int4": 4, "int2": 2}[name]
    params_per_group = 1 if name == "fp8" else 2
    groups = kv_heads * math.ceil(tokens / group) * head_dim + kv_heads * tokens * math.ceil(head_dim / group)
    return 2 * params_per_group * groups + 4 * math.ceil(elements * bits / 16)
