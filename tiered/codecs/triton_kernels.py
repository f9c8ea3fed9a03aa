"""Triton kernels of the quantizing codecs on CUDA: quantize + pack on the device before a block
leaves it, unpack + dequantize after it arrives. They write the bytes reference.py defines: every
step is the same IEEE fp32 operation (divisions correctly rounded with div_rn, conversions
round-to-nearest-even, no fused multiply-add where it could change a rounding).

A batch is n blocks of one shape [H, T, D] and dtype, passed as device arrays of addresses and
strides, so blocks need not be stacked. The kernels need D and the group size to be multiples of
the codes per byte (`supports`); other shapes use the reference. With TRITON_INTERPRET=1 set before
import, they run on CPU tensors through Triton's interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import os

import torch

from .layout import QuantFormat, ceil_div
from .reference import UNENCODABLE

triton = None
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":  # else there is nothing to run them on
    try:
        import triton
        import triton.language as tl
    except ImportError:  # no Triton: the codecs use the reference kernels on CUDA
        triton = None

TL_DTYPES = {} if triton is None else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
KIND_IDS = {"int": 0, "fp8": 1}
ROWS = 16  # value rows per program


def available() -> bool:
    """True if Triton is installed and there is a CUDA device (or its interpreter) to run on."""
    return triton is not None


def supports(fmt: QuantFormat, shape: tuple[int, int, int]) -> bool:
    """True if the kernels handle blocks of `shape` in `fmt` (codes of a group fill whole bytes)."""
    per_byte = 8 // fmt.bits
    return triton is not None and shape[2] % per_byte == 0 and fmt.group % per_byte == 0


if triton is not None:

    @triton.jit
    def _params(lo, hi, KIND: tl.constexpr, QMAX: tl.constexpr):
        """fp16 min and scale of groups from their min and max (max |x| for fp8), and the fp32
        min and 1/scale the codes use."""
        if KIND == 0:
            min16 = tl.where(lo == 0.0, 0.0, lo).to(tl.float16, fp_downcast_rounding="rtne")  # -0 -> +0
            min32 = min16.to(tl.float32)
            span = hi - min32
            span = tl.where(span > 0.0, span, 0.0)
            scale16 = tl.math.div_rn(span, tl.full(span.shape, QMAX, tl.float32))
            scale16 = scale16.to(tl.float16, fp_downcast_rounding="rtne")
        else:
            min16 = tl.zeros(hi.shape, tl.float16)
            min32 = tl.zeros(hi.shape, tl.float32)
            scale16 = tl.math.div_rn(hi, tl.full(hi.shape, 448.0, tl.float32))
            scale16 = scale16.to(tl.float16, fp_downcast_rounding="rtne")
        scale32 = scale16.to(tl.float32)
        positive = scale32 > 0.0
        inv = tl.math.div_rn(tl.full(scale32.shape, 1.0, tl.float32), tl.where(positive, scale32, 1.0))
        inv = tl.where(positive, inv, 0.0)
        bad = (min32 != min32) | (tl.abs(min32) == float("inf")) | (scale32 != scale32) | (scale32 == float("inf"))
        return min16, scale16, min32, inv, bad

    @triton.jit
    def _to_e4m3(y):
        """fp32 (|y| <= 448) -> e4m3fn bits, nearest even (see cpu_kernels.c)."""
        u = y.to(tl.uint32, bitcast=True)
        sign = (u >> 24) & 0x80
        u = u & 0x7FFFFFFF
        normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - 960  # rebias: (127 - 7) << 3
        tiny = (u.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
        return (sign | tl.where(u >= 0x3C800000, normal, tiny)).to(tl.int32)

    @triton.jit
    def _from_e4m3(c):
        e = (c >> 3) & 15
        m = c & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * (1.0 / 512.0), normal)
        mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
        return tl.where((c & 0x80) != 0, -mag, mag)

    @triton.jit
    def _codes(x, min32, inv, KIND: tl.constexpr, QMAX: tl.constexpr):
        if KIND == 0:
            y = tl.minimum(tl.maximum((x - min32) * inv, 0.0), QMAX)
            codes = (y + 0.5).to(tl.int32)  # truncates: rounds half up
        else:
            codes = _to_e4m3(tl.maximum(tl.minimum(x * inv, 448.0), -448.0))
        return codes

    @triton.jit
    def _values_of(codes, min32, scale32, KIND: tl.constexpr):
        if KIND == 0:
            y = min32 + codes.to(tl.float32) * scale32  # the product is exact: fusing cannot differ
        else:
            y = _from_e4m3(codes) * scale32
        return y

    @triton.jit
    def _store_codes(base, first, codes, mask2, ROWS_: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
        """codes [ROWS_, COLS] (int32) at code index first[row] + col, packed 8/BITS per byte."""
        if BITS == 8:
            cols = tl.arange(0, COLS)
            tl.store(base + first[:, None] + cols[None, :], codes.to(tl.uint8), mask=mask2)
        else:
            shifts = tl.arange(0, 8 // BITS) * BITS
            packed = tl.sum(tl.reshape(codes, (ROWS_, COLS // (8 // BITS), 8 // BITS)) << shifts[None, None, :], axis=2)
            cols = tl.arange(0, COLS // (8 // BITS))
            bytemask = tl.max(tl.reshape(mask2.to(tl.int32), (ROWS_, COLS // (8 // BITS), 8 // BITS)), axis=2) > 0
            tl.store(base + first[:, None] // (8 // BITS) + cols[None, :], packed.to(tl.uint8), mask=bytemask)

    @triton.jit
    def _load_codes(base, first, mask2, ROWS_: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
        if BITS == 8:
            cols = tl.arange(0, COLS)
            codes = tl.load(base + first[:, None] + cols[None, :], mask=mask2, other=0).to(tl.int32)
        else:
            shifts = tl.arange(0, 8 // BITS) * BITS
            cols = tl.arange(0, COLS // (8 // BITS))
            bytemask = tl.max(tl.reshape(mask2.to(tl.int32), (ROWS_, COLS // (8 // BITS), 8 // BITS)), axis=2) > 0
            packed = tl.load(base + first[:, None] // (8 // BITS) + cols[None, :], mask=bytemask, other=0).to(tl.int32)
            codes = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (ROWS_, COLS))
        return codes

    @triton.jit
    def _store_values(dst, y, mask2):
        if dst.dtype.element_ty == tl.float32:
            tl.store(dst, y, mask=mask2)
        elif dst.dtype.element_ty == tl.float16:
            tl.store(dst, y.to(tl.float16, fp_downcast_rounding="rtne"), mask=mask2)
        else:  # bf16, nearest even in integer arithmetic (what torch does; the same on every backend)
            u = y.to(tl.uint32, bitcast=True)
            bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
            tl.store(dst, bits.to(tl.bfloat16, bitcast=True), mask=mask2)

    @triton.jit
    def _tile(table, H, T, D, G: tl.constexpr, KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of one block. Keys: [BLOCK_R tokens of group pid1, BLOCK_C channels],
        grouped over tokens; values: [BLOCK_R tokens, BLOCK_C channels of group pid2], grouped over
        channels. table[n] = (key addr, value addr, payload addr, key head and token strides, value
        head and token strides). Returns the tensor's address, the payload's, the tile's element
        offsets and mask [BLOCK_R, BLOCK_C], its groups' param indices and mask, and the code index
        of each row's first element."""
        nh = tl.program_id(0)
        n = nh // H
        h = nh % H
        payload = tl.load(table + 7 * n + 2).to(tl.pointer_type(tl.uint8))
        if KEYS:
            addr = tl.load(table + 7 * n)
            sh = tl.load(table + 7 * n + 3)
            st = tl.load(table + 7 * n + 4)
            g = tl.program_id(1)
            t = g * G + tl.arange(0, BLOCK_R)
            c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask2 = ((tl.arange(0, BLOCK_R) < G) & (t < T))[:, None] & (c < D)[None, :]
            p = (h * tl.cdiv(T, G) + g) * D + c  # [BLOCK_C] into key params [H, ⌈T/G⌉, D]
            pmask = c < D
            first = (h * T + t) * D + tl.program_id(2) * BLOCK_C
        else:
            addr = tl.load(table + 7 * n + 1)
            sh = tl.load(table + 7 * n + 5)
            st = tl.load(table + 7 * n + 6)
            g = tl.program_id(2)
            t = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
            c = g * G + tl.arange(0, BLOCK_C)
            mask2 = (t < T)[:, None] & ((tl.arange(0, BLOCK_C) < G) & (c < D))[None, :]
            p = (h * T + t) * tl.cdiv(D, G) + g  # [BLOCK_R] into value params [H, T, ⌈D/G⌉]
            pmask = t < T
            first = (h * T + t) * D + g * G
        return addr, payload, h * sh + t[:, None] * st + c[None, :], mask2, p, pmask, first

    @triton.jit
    def _encode_kernel(
        table, flag, H, T, D, min_at, scale_at, code_at, pad_at,
        IN: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, G: tl.constexpr,
        KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Quantize one tile (see _tile) into its payload's sections at byte offsets min_at,
        scale_at, code_at; flag[0] becomes 1 if the tile cannot be encoded."""
        addr, out, offsets, mask2, p, pmask, first = _tile(table, H, T, D, G, KEYS, BLOCK_R, BLOCK_C)
        x = tl.load(addr.to(tl.pointer_type(IN)) + offsets, mask=mask2, other=0.0).to(tl.float32)
        nonfinite = ((x != x) | (tl.abs(x) == float("inf"))) & mask2
        bad_values = tl.max(tl.max(nonfinite.to(tl.int32), axis=1), axis=0)
        if KIND == 0:
            magnitude = x
        else:
            magnitude = tl.abs(x)
        if KEYS:
            lo = tl.min(tl.where(mask2, x, float("inf")), axis=0)
            hi = tl.max(tl.where(mask2, magnitude, -float("inf")), axis=0)
            min16, scale16, min32, inv, bad_params = _params(lo, hi, KIND, QMAX)
            codes = _codes(x, min32[None, :], inv[None, :], KIND, QMAX)
        else:
            lo = tl.min(tl.where(mask2, x, float("inf")), axis=1)
            hi = tl.max(tl.where(mask2, magnitude, -float("inf")), axis=1)
            min16, scale16, min32, inv, bad_params = _params(lo, hi, KIND, QMAX)
            codes = _codes(x, min32[:, None], inv[:, None], KIND, QMAX)
        if KIND == 0:
            tl.store((out + min_at).to(tl.pointer_type(tl.float16)) + p, min16, mask=pmask)
        tl.store((out + scale_at).to(tl.pointer_type(tl.float16)) + p, scale16, mask=pmask)
        _store_codes(out + code_at, first, codes, mask2, BLOCK_R, BLOCK_C, BITS)
        if pad_at >= 0:  # the code section ends in a zero padding byte
            if (tl.program_id(0) % H == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
                tl.store(out + code_at + pad_at, 0)
        bad = tl.maximum(bad_values, tl.max((bad_params & pmask).to(tl.int32), axis=0))
        tl.atomic_max(flag, bad)

    @triton.jit
    def _decode_kernel(
        table, H, T, D, min_at, scale_at, code_at,
        OUT: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
        KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Dequantize one tile (see _tile) from its payload into the block's tensor."""
        addr, payload, offsets, mask2, p, pmask, first = _tile(table, H, T, D, G, KEYS, BLOCK_R, BLOCK_C)
        scale32 = tl.load((payload + scale_at).to(tl.pointer_type(tl.float16)) + p, mask=pmask, other=0.0).to(tl.float32)
        if KIND == 0:
            min32 = tl.load((payload + min_at).to(tl.pointer_type(tl.float16)) + p, mask=pmask, other=0.0).to(tl.float32)
        else:
            min32 = tl.zeros(scale32.shape, tl.float32)
        codes = _load_codes(payload + code_at, first, mask2, BLOCK_R, BLOCK_C, BITS)
        if KEYS:
            y = _values_of(codes, min32[None, :], scale32[None, :], KIND)
        else:
            y = _values_of(codes, min32[:, None], scale32[:, None], KIND)
        _store_values(addr.to(tl.pointer_type(OUT)) + offsets, y, mask2)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tiles(fmt: QuantFormat, shape: tuple[int, int, int], keys: bool) -> tuple[tuple[int, int, int], int, int]:
    """(grid without the block axis, BLOCK_R, BLOCK_C) of the key or value tiles."""
    h, t, d = shape
    per_byte = 8 // fmt.bits
    if keys:
        block_r, block_c = _pow2(min(fmt.group, t)), max(per_byte, min(64, _pow2(d)))
        return (h, ceil_div(t, fmt.group), ceil_div(d, block_c)), block_r, block_c
    block_c = max(per_byte, _pow2(min(fmt.group, d)))
    return (h, ceil_div(t, ROWS), ceil_div(d, fmt.group)), ROWS, block_c


def _table(keys: list[torch.Tensor], values: list[torch.Tensor], payloads: list[torch.Tensor]) -> torch.Tensor:
    """[n, 7] int64 on the blocks' device: key, value and payload addresses, then the key and value
    head and token strides (in elements)."""
    rows = [
        (k.data_ptr(), v.data_ptr(), p.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        for k, v, p in zip(keys, values, payloads)
    ]
    return torch.tensor(rows, dtype=torch.int64).to(keys[0].device)


def _sections(fmt: QuantFormat, shape: tuple[int, int, int], keys: bool) -> tuple[int, int, int]:
    """Byte offsets of the (min, scale, codes) sections of keys or values (-1: no mins)."""
    offsets = fmt.layout(*shape).offsets()
    return (offsets[0], offsets[1], offsets[4]) if keys else (offsets[2], offsets[3], offsets[5])


def encode(fmt: QuantFormat, keys: list[torch.Tensor], values: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """Payloads of blocks of one shape and dtype (channels contiguous) into outs ([nbytes] uint8
    on the same device). ValueError if a block cannot be quantized (this waits for the device)."""
    shape, device = tuple(keys[0].shape), keys[0].device
    count_bytes = shape[0] * shape[1] * shape[2] * fmt.bits // 8
    pad_at = count_bytes if fmt.layout(*shape).sections["key_codes"][1] > count_bytes else -1
    table = _table(keys, values, outs)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    for is_keys in (True, False):
        grid, block_r, block_c = _tiles(fmt, shape, is_keys)
        _encode_kernel[(len(keys) * grid[0], grid[1], grid[2])](
            table, flag, *shape, *_sections(fmt, shape, is_keys), pad_at,
            IN=TL_DTYPES[keys[0].dtype], KIND=KIND_IDS[fmt.kind], BITS=fmt.bits, QMAX=float(fmt.qmax),
            G=fmt.group, KEYS=is_keys, BLOCK_R=block_r, BLOCK_C=block_c,
        )
    if int(flag.item()):
        raise ValueError(UNENCODABLE)


def decode(fmt: QuantFormat, payloads: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Decode payloads into keys[i], values[i] ([H, T, D], channels contiguous, on the payloads'
    device). Unlike the CPU kernels, does not check that params are finite (that would wait for
    the device); Codec.check does."""
    shape = tuple(keys[0].shape)
    table = _table(keys, values, payloads)
    for is_keys in (True, False):
        grid, block_r, block_c = _tiles(fmt, shape, is_keys)
        _decode_kernel[(len(keys) * grid[0], grid[1], grid[2])](
            table, *shape, *_sections(fmt, shape, is_keys),
            OUT=TL_DTYPES[keys[0].dtype], KIND=KIND_IDS[fmt.kind], BITS=fmt.bits, G=fmt.group,
            KEYS=is_keys, BLOCK_R=block_r, BLOCK_C=block_c,
        )


# -- attention over quantized blocks (attend_reference.py) ---------------------------------------


def attend_supports(fmt: QuantFormat, head_dim: int) -> bool:
    """True if `attend` reads blocks of this head_dim in `fmt` ("int" kinds; codes of a row fill
    whole bytes)."""
    return triton is not None and fmt.kind == "int" and head_dim % (8 // fmt.bits) == 0


if triton is not None:

    @triton.jit
    def _attend_kernel(
        q, qpos, table, out, lse, H, R, n, D,
        BITS: tl.constexpr, G: tl.constexpr, HAS_POS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One KV head (program 0) of one block (program 1): the partial output and log-sum-exp of
        its R query rows. Scores are (q ⊙ scale) · codes + q · min per key group; the weighted sum
        takes each token's value scale and min into its weight. q: [H, R, D] fp32, scaled; table:
        [blocks, 9] (payload address, tokens, first position, 6 section offsets); out: [blocks, H,
        R, D], lse: [blocks, H, R]."""
        h = tl.program_id(0)
        b = tl.program_id(1)
        row = table + 9 * b
        payload = tl.load(row).to(tl.pointer_type(tl.uint8))
        T = tl.load(row + 1)
        start = tl.load(row + 2)
        r = tl.arange(0, BLOCK_R)
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        rmask, tmask, dmask = r < R, t < T, d < D
        qtile = tl.load(q + (h * R + r)[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        mask2 = tmask[:, None] & dmask[None, :]  # [BLOCK_T, BLOCK_D]
        first = (h * T + t) * D  # code index of each token's first channel
        # keys: params [H, ⌈T/G⌉, D] at the token's group
        kp = (h * tl.cdiv(T, G) + t // G)[:, None] * D + d[None, :]
        kmin = tl.load((payload + tl.load(row + 3)).to(tl.pointer_type(tl.float16)) + kp, mask=mask2, other=0.0)
        kscale = tl.load((payload + tl.load(row + 4)).to(tl.pointer_type(tl.float16)) + kp, mask=mask2, other=0.0)
        kcodes = _load_codes(payload + tl.load(row + 7), first, mask2, BLOCK_T, BLOCK_D, BITS).to(tl.float32)
        scores = tl.dot(qtile, tl.trans(kscale.to(tl.float32) * kcodes), input_precision="ieee")
        scores += tl.dot(qtile, tl.trans(kmin.to(tl.float32)), input_precision="ieee")  # [BLOCK_R, BLOCK_T]
        seen = rmask[:, None] & tmask[None, :]
        if HAS_POS:
            positions = tl.load(qpos + r % n, mask=rmask, other=0)
            seen = seen & ((start + t)[None, :] <= positions[:, None])
        scores = tl.where(seen, scores, -float("inf"))
        top = tl.max(scores, axis=1)
        top = tl.where(top == -float("inf"), 0.0, top)
        p = tl.exp(scores - top[:, None])  # 0 where unseen
        total = tl.sum(p, axis=1)
        # values: params [H, T, ⌈D/G⌉] at the channel's group
        vp = (h * T + t)[:, None] * tl.cdiv(D, G) + (d // G)[None, :]
        vmin = tl.load((payload + tl.load(row + 5)).to(tl.pointer_type(tl.float16)) + vp, mask=mask2, other=0.0)
        vscale = tl.load((payload + tl.load(row + 6)).to(tl.pointer_type(tl.float16)) + vp, mask=mask2, other=0.0)
        vcodes = _load_codes(payload + tl.load(row + 8), first, mask2, BLOCK_T, BLOCK_D, BITS).to(tl.float32)
        acc = tl.dot(p, vscale.to(tl.float32) * vcodes, input_precision="ieee")
        acc += tl.dot(p, vmin.to(tl.float32), input_precision="ieee")  # [BLOCK_R, BLOCK_D]
        has = total > 0.0
        result = tl.where(has[:, None], acc / tl.where(has, total, 1.0)[:, None], 0.0)
        tl.store(out + ((b * H + h) * R + r)[:, None] * D + d[None, :], result, mask=rmask[:, None] & dmask[None, :])
        tl.store(lse + (b * H + h) * R + r, tl.where(has, top + tl.log(tl.where(has, total, 1.0)), -float("inf")),
                 mask=rmask)


def attend(
    fmt: QuantFormat,
    q: torch.Tensor,
    payloads: list[torch.Tensor],
    tokens: list[int],
    starts: list[int],
    kv_heads: int,
    q_positions: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_reference.attend_quantized (scale given) on the payloads' device: one program per KV
    head and block, then the per-block partials merged by log-sum-exp. (out [heads, n, head_dim]
    fp32, lse [heads, n] fp32)."""
    heads, n, dim = q.shape
    rows, device = heads // kv_heads * n, q.device
    grouped = (q.float().reshape(kv_heads, rows, dim) * scale).contiguous()  # [H, R, D]
    table = torch.tensor(
        [[p.data_ptr(), count, first, *fmt.layout(kv_heads, count, dim).offsets()]
         for p, count, first in zip(payloads, tokens, starts)],
        dtype=torch.int64,
    ).to(device)  # [blocks, 9]
    blocks = len(payloads)
    out = torch.empty(blocks, kv_heads, rows, dim, dtype=torch.float32, device=device)
    lse = torch.empty(blocks, kv_heads, rows, dtype=torch.float32, device=device)
    positions = grouped if q_positions is None else q_positions.to(device=device, dtype=torch.int64).contiguous()
    _attend_kernel[(kv_heads, blocks)](
        grouped, positions, table, out, lse, kv_heads, rows, n, dim,
        BITS=fmt.bits, G=fmt.group, HAS_POS=q_positions is not None,
        BLOCK_R=max(16, _pow2(rows)), BLOCK_T=max(16, _pow2(max(tokens))), BLOCK_D=max(16, _pow2(dim)),
    )
    total = torch.logsumexp(lse, dim=0)  # [H, R]
    weights = torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0))  # [blocks, H, R]
    merged = (weights[..., None] * out).sum(dim=0)  # [H, R, D]
    return merged.view(heads, n, dim), total.view(heads, n)
