"""Where each part of a quantized block's payload lives: the documented size formula.

A block has keys and values of shape [H, T, D] = [kv_heads, tokens, head_dim]. With group size G
(KIVI's axes):

    key groups    H · ⌈T/G⌉ · D    per channel, over up to G consecutive tokens
    value groups  H · T · ⌈D/G⌉    per token, over up to G consecutive channels

The last group along an axis holds the remainder when G does not divide it (a partial block's
key groups span its T < G tokens). The payload is one contiguous uint8 buffer:

    [key mins][key scales][value mins][value scales]   fp16, params; mins only for "int"
    [key codes][value codes]                           each 2·⌈H·T·D·bits/16⌉ bytes, bit-packed

    nbytes = 2 · P · (H·⌈T/G⌉·D + H·T·⌈D/G⌉) + 4 · ⌈H·T·D·bits/16⌉

where P = 2 (min and scale) for the integer codecs and 1 (scale) for fp8. Key params are laid out
[H, ⌈T/G⌉, D], value params [H, T, ⌈D/G⌉]; codes are the elements of [H, T, D] in row-major order,
`8/bits` per byte, the first in the lowest bits, zero bits padding each code section to whole
16-bit words. Every section has an even size, so payloads laid end to end keep their fp16 params
2-byte aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

FP16_BYTES = 2
CODE_BITS = (2, 4, 8)
KINDS = ("int", "fp8")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class QuantFormat:
    """How a quantizing codec writes codes: `kind` "int" (asymmetric, min and scale per group)
    or "fp8" (e4m3, scale per group), `bits` per code, `group` elements per group."""

    kind: str
    bits: int
    group: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantization kind must be one of {KINDS}, got {self.kind!r}")
        if self.bits not in CODE_BITS or (self.kind == "fp8" and self.bits != 8):
            raise ValueError(f"{self.kind} codes must have bits in {CODE_BITS} (8 for fp8), got {self.bits}")
        if isinstance(self.group, bool) or not isinstance(self.group, int):
            raise TypeError(f"group size must be int, got {type(self.group).__name__}")
        if self.group < 1:
            raise ValueError(f"group size must be >= 1, got {self.group}")

    @property
    def params_per_group(self) -> int:
        return 2 if self.kind == "int" else 1

    @property
    def qmax(self) -> int:
        """Largest integer code (int kind)."""
        return (1 << self.bits) - 1

    def layout(self, kv_heads: int, tokens: int, head_dim: int) -> PayloadLayout:
        """The payload layout of a block of this shape (made once per shape)."""
        return _layout(self, kv_heads, tokens, head_dim)


@dataclass(frozen=True)
class PayloadLayout:
    """Byte offsets and sizes of one block's payload in `fmt` (see the module docstring)."""

    fmt: QuantFormat
    kv_heads: int
    tokens: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.tokens, self.head_dim)

    @property
    def key_groups(self) -> int:
        """Groups along tokens for each key channel."""
        return ceil_div(self.tokens, self.fmt.group)

    @property
    def value_groups(self) -> int:
        """Groups along channels for each value token."""
        return ceil_div(self.head_dim, self.fmt.group)

    @property
    def key_param_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.key_groups, self.head_dim)

    @property
    def value_param_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.tokens, self.value_groups)

    @cached_property
    def sections(self) -> dict[str, tuple[int, int]]:
        """Name -> (byte offset, byte length); names: key_min, key_scale, value_min, value_scale
        (the mins only for the "int" kind), key_codes, value_codes."""
        h, t, d = self.shape
        key_params = h * self.key_groups * d * FP16_BYTES
        value_params = h * t * self.value_groups * FP16_BYTES
        code_bytes = 2 * ceil_div(h * t * d * self.fmt.bits, 16)
        names = ["key_min", "key_scale", "value_min", "value_scale", "key_codes", "value_codes"]
        sizes = [key_params, key_params, value_params, value_params, code_bytes, code_bytes]
        if self.fmt.kind == "fp8":
            del names[2], sizes[2], names[0], sizes[0]
        out, offset = {}, 0
        for name, size in zip(names, sizes):
            out[name] = (offset, size)
            offset += size
        return out

    @property
    def nbytes(self) -> int:
        offset, size = self.sections["value_codes"]
        return offset + size

    def offsets(self) -> list[int]:
        """Byte offsets of key_min, key_scale, value_min, value_scale, key_codes, value_codes;
        -1 for a section the format lacks (what the fast kernels take)."""
        names = ("key_min", "key_scale", "value_min", "value_scale", "key_codes", "value_codes")
        return [self.sections[n][0] if n in self.sections else -1 for n in names]


@lru_cache(maxsize=1024)
def _layout(fmt: QuantFormat, kv_heads: int, tokens: int, head_dim: int) -> PayloadLayout:
    return PayloadLayout(fmt, kv_heads, tokens, head_dim)
