"""The reference kernels, in plain torch: the definition of every quantized code.

The fast paths (cpu_kernels.c, triton_kernels.py) must reproduce these bytes exactly, so each step
below is a single IEEE fp32 operation with one rounding, written the same way there:

int (asymmetric, `bits`-bit codes, q = 2^bits - 1), per group of x (x in fp32, exact from fp16/bf16):
    min   = fp16(min(x) + 0)                      (+0 turns -0 into +0)
    span  = max(x) - float(min);  span = span > 0 ? span : 0
    scale = fp16(span / q)
    inv   = scale > 0 ? 1 / float(scale) : 0
    code  = trunc(clamp((x - float(min)) * inv, 0, q) + 0.5)          (rounds half up)
    x'    = float(min) + code * float(scale)      (the product is exact, so fusing it cannot differ)

fp8 (e4m3fn, symmetric), per group:
    scale = fp16(max(|x|) / 448);  inv = scale > 0 ? 1 / float(scale) : 0
    code  = e4m3(clamp(x * inv, -448, 448))       (round to nearest even, torch's conversion)
    x'    = float(code) * float(scale)            (exact)

The decoded block is x' rounded to the block's dtype (nearest even). A group whose min or scale
does not fit fp16, or that holds NaN or inf, cannot be encoded: ValueError.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .layout import PayloadLayout, QuantFormat

FP8_MAX = 448.0


def group_reduce(x: torch.Tensor, group: int, reduce: Callable) -> torch.Tensor:
    """reduce(x, dim=-1) over consecutive groups of the last axis; the last group may be shorter.

    x: [..., L] -> [..., ⌈L/group⌉]
    """
    length = x.shape[-1]
    full = length // group * group
    parts = []
    if full:
        parts.append(reduce(x[..., :full].unflatten(-1, (full // group, group)), dim=-1))
    if full < length:
        parts.append(reduce(x[..., full:], dim=-1, keepdim=True))
    return torch.cat(parts, dim=-1)


def expand_groups(params: torch.Tensor, group: int, length: int) -> torch.Tensor:
    """Each group's parameter repeated over its elements. params: [..., ng] -> [..., length]"""
    return params.repeat_interleave(group, dim=-1)[..., :length]


def reciprocal_or_zero(scales: torch.Tensor) -> torch.Tensor:
    """1 / scale in fp32 (IEEE division), 0 where scale is 0."""
    scales = scales.float()
    return torch.where(scales > 0, torch.ones_like(scales) / scales, torch.zeros_like(scales))


UNENCODABLE = (
    "cannot quantize this block: it holds NaN or inf, or a group's min or scale does not fit fp16 "
    "(|value| > 65504)"
)


CORRUPT = "corrupt payload: its mins or scales are not finite"


def check_params(*params: torch.Tensor, message: str = UNENCODABLE) -> None:
    """ValueError(message) unless every param is finite."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise ValueError(message)


def quantize(fmt: QuantFormat, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Codes and fp16 params ([mins, scales] for "int", [scales] for "fp8") of x, grouped along
    its last axis. x: [..., L] fp32 -> params [..., ⌈L/G⌉] each, codes [..., L] uint8."""
    length, group = x.shape[-1], fmt.group
    if fmt.kind == "int":
        mins = (group_reduce(x, group, torch.amin) + 0.0).to(torch.float16)
        min32 = mins.float()
        span = group_reduce(x, group, torch.amax) - min32
        span = torch.where(span > 0, span, torch.zeros_like(span))
        scales = (span / fmt.qmax).to(torch.float16)
        check_params(mins, scales)
        y = (x - expand_groups(min32, group, length)) * expand_groups(reciprocal_or_zero(scales), group, length)
        codes = (y.clamp(0, fmt.qmax) + 0.5).to(torch.uint8)  # float -> uint8 truncates
        return [mins, scales], codes
    scales = (group_reduce(x.abs(), group, torch.amax) / FP8_MAX).to(torch.float16)
    check_params(scales)
    y = (x * expand_groups(reciprocal_or_zero(scales), group, length)).clamp(-FP8_MAX, FP8_MAX)
    return [scales], y.to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize(fmt: QuantFormat, params: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of codes [..., L] with params [..., ⌈L/G⌉] (the inverse of quantize)."""
    length, group = codes.shape[-1], fmt.group
    scales = expand_groups(params[-1].float(), group, length)
    if fmt.kind == "int":
        return expand_groups(params[0].float(), group, length) + codes.float() * scales
    return codes.view(torch.float8_e4m3fn).float() * scales


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`8/bits` codes per byte, the first in the lowest bits. codes: [n] uint8 -> [⌈n·bits/8⌉]"""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    pad = (-codes.numel()) % per_byte
    codes = torch.cat([codes, codes.new_zeros(pad)]).view(-1, per_byte)  # [bytes, per_byte]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == or


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of packed bytes. packed: [m] uint8 -> [count] uint8"""
    if bits == 8:
        return packed[:count]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)  # [m, 8/bits]
    return codes.flatten()[:count]


def section(payload: torch.Tensor, layout: PayloadLayout, name: str) -> torch.Tensor:
    offset, size = layout.sections[name]
    return payload[offset : offset + size]


def param_views(payload: torch.Tensor, layout: PayloadLayout, tensor: str) -> list[torch.Tensor]:
    """fp16 views of the params of "key" or "value" in payload, in quantize's order."""
    shape = layout.key_param_shape if tensor == "key" else layout.value_param_shape
    names = ("min", "scale") if layout.fmt.kind == "int" else ("scale",)
    return [section(payload, layout, f"{tensor}_{n}").view(torch.float16).view(shape) for n in names]


def encode_block(fmt: QuantFormat, keys: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    """Write the payload of one block into out. keys, values: [H, T, D]; out: [nbytes] uint8."""
    layout = fmt.layout(*keys.shape)
    # keys are grouped per channel over tokens: tokens go last, [H, D, T]
    key_params, key_codes = quantize(fmt, keys.float().transpose(1, 2))
    value_params, value_codes = quantize(fmt, values.float())
    for view, param in zip(param_views(out, layout, "key"), key_params):
        view.copy_(param.transpose(1, 2))
    for view, param in zip(param_views(out, layout, "value"), value_params):
        view.copy_(param)
    for name, codes in (("key_codes", key_codes.transpose(1, 2)), ("value_codes", value_codes)):
        packed = pack(codes.contiguous().flatten(), fmt.bits)
        target = section(out, layout, name)
        target[: packed.numel()].copy_(packed)
        target[packed.numel() :].zero_()


def decode_block(
    fmt: QuantFormat, payload: torch.Tensor, keys_out: torch.Tensor, values_out: torch.Tensor
) -> None:
    """Decode one payload into keys_out and values_out ([H, T, D], the block's dtype)."""
    layout = fmt.layout(*keys_out.shape)
    check_params(*param_views(payload, layout, "key"), *param_views(payload, layout, "value"), message=CORRUPT)
    count = keys_out.numel()
    key_codes = unpack(section(payload, layout, "key_codes"), fmt.bits, count).view(layout.shape)
    value_codes = unpack(section(payload, layout, "value_codes"), fmt.bits, count).view(layout.shape)
    key_params = [p.transpose(1, 2) for p in param_views(payload, layout, "key")]
    keys = dequantize(fmt, key_params, key_codes.transpose(1, 2)).transpose(1, 2)
    values = dequantize(fmt, param_views(payload, layout, "value"), value_codes)
    keys_out.copy_(keys)
    values_out.copy_(values)


def encode(fmt: QuantFormat, keys: list[torch.Tensor], values: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """encode_block for each block: the batch interface the fast kernels share."""
    for k, v, out in zip(keys, values, outs):
        encode_block(fmt, k, v, out)


def decode(fmt: QuantFormat, payloads: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """decode_block for each payload: the batch interface the fast kernels share."""
    for payload, k, v in zip(payloads, keys, values):
        decode_block(fmt, payload, k, v)
