"""Group-wise quantizing codecs on KIVI's axes: int8, int4, int2 (asymmetric) and fp8 (e4m3).

Keys are grouped per channel over up to `group` tokens, values per token over up to `group`
channels (KIVI, https://arxiv.org/abs/2402.02750: keys have outlier channels, values do not);
each group keeps its min and scale (fp16), codes are bit-packed. layout.py gives the payload
layout and size formula, reference.py the definition of every byte.

The kernels run where the block is: the fused C kernels on the CPU (cpu_kernels.py), Triton on
CUDA (triton_kernels.py), the torch reference wherever those are not available. All three write
the same bytes. `encode_many`/`decode_many` take a whole batch in one kernel call, which is what
reaches memory bandwidth (one block at a time pays Python's overhead per block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..block import KVBlock
from . import attend_reference, cpu_kernels, reference, triton_kernels
from .base import Codec, Encoded, check_buffer, check_outputs, check_rows
from .layout import QuantFormat


def _channels_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _on_cpu(encoded: Encoded) -> Encoded:
    """`encoded` with its bytes on the host, once a pending copy into them is done."""
    return (encoded if encoded.payload.is_cpu else encoded.to("cpu")).wait()


def _batches(items: Sequence, key) -> list[list[int]]:
    """Indices of `items` grouped by key(item), in first-seen order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


class QuantizedCodec(Codec):
    """A group-wise quantizing codec; subclasses set `name`, `kind`, `bits` and `default_group`."""

    kind: ClassVar[str]
    bits: ClassVar[int]
    default_group: ClassVar[int] = 64

    def __init__(self, group: int | None = None) -> None:
        self.fmt = QuantFormat(self.kind, self.bits, self.default_group if group is None else group)
        self._spec = f"{self.name}:g{self.fmt.group}"

    @property
    def spec(self) -> str:
        return self._spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={self.fmt.group})"

    def encoded_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return self.fmt.layout(kv_heads, tokens, head_dim).nbytes

    # -- encode ---------------------------------------------------------------------------------

    def encode(self, block: KVBlock) -> Encoded:
        out = torch.empty(self.encoded_nbytes(*block.keys.shape, block.dtype), dtype=torch.uint8, device=block.device)
        self._encode_batch([block], [out])
        return Encoded(self.spec, block.dtype, tuple(block.keys.shape), out)

    def encode_into(self, block: KVBlock, out: torch.Tensor) -> Encoded:
        return self.encode_many_into([block], [out])[0]

    def encode_many(self, blocks: Sequence[KVBlock]) -> list[Encoded]:
        """Every block encoded, in order; blocks of one shape, dtype and device share a kernel call."""
        outs = [torch.empty(self.encoded_nbytes(*b.keys.shape, b.dtype), dtype=torch.uint8, device=b.device) for b in blocks]
        return self.encode_many_into(blocks, outs)

    def encode_many_into(self, blocks: Sequence[KVBlock], outs: Sequence[torch.Tensor]) -> list[Encoded]:
        """Every block encoded into its buffer, in order; blocks of one shape and dtype whose
        buffers are on their device share a kernel call. A buffer on another device (a pinned host
        slot for a CUDA block) gets the payload quantized where the block is, then copied over."""
        if len(blocks) != len(outs):
            raise ValueError(f"{len(blocks)} blocks but {len(outs)} buffers")
        if blocks and self._kernels(blocks[0].keys) is cpu_kernels and cpu_kernels.encode_alike(self.fmt, blocks, outs):
            shape, dtype = tuple(blocks[0].keys.shape), blocks[0].dtype
            return [Encoded(self.spec, dtype, shape, out) for out in outs]
        results: list[Encoded | None] = [None] * len(blocks)
        for index in _batches(blocks, lambda b: (tuple(b.keys.shape), b.dtype, b.device)):
            batch = [blocks[i] for i in index]
            shape, dtype = tuple(batch[0].keys.shape), batch[0].dtype
            if any(outs[i].device != batch[0].device for i in index):  # move the smaller payload
                for i in index:
                    results[i] = Codec.encode_into(self, blocks[i], outs[i])
                continue
            nbytes = self.encoded_nbytes(*shape, dtype)
            for i in index:
                check_buffer(outs[i], nbytes)
            self._encode_batch(batch, [outs[i] for i in index])
            for i in index:
                results[i] = Encoded(self.spec, dtype, shape, outs[i])
        return results

    def _encode_batch(self, blocks: list[KVBlock], outs: list[torch.Tensor]) -> None:
        """Payloads of blocks of one shape, dtype and device, written into outs on that device."""
        keys = [_channels_contiguous(b.keys) for b in blocks]
        values = [_channels_contiguous(b.values) for b in blocks]
        self._kernels(keys[0]).encode(self.fmt, keys, values, outs)

    # -- decode ---------------------------------------------------------------------------------

    def decode(self, encoded: Encoded, device: torch.device | str) -> KVBlock:
        Codec.check(self, encoded)
        payload = encoded.to(device).payload
        keys = torch.empty(encoded.shape, dtype=encoded.dtype, device=payload.device)
        values = torch.empty(encoded.shape, dtype=encoded.dtype, device=payload.device)
        self._decode_batch([payload], [keys], [values])
        return KVBlock.trusted(keys, values)

    def decode_into(self, encoded: Encoded, keys_out: torch.Tensor, values_out: torch.Tensor) -> None:
        Codec.check(self, encoded)
        check_outputs(encoded, keys_out, values_out)
        if keys_out.stride(-1) != 1 or values_out.stride(-1) != 1:  # the kernels need contiguous channels
            return super().decode_into(encoded, keys_out, values_out)
        self._decode_batch([encoded.to(keys_out.device).payload], [keys_out], [values_out])

    def decode_many_into(
        self, encoded: Sequence[Encoded], keys_outs: Sequence[torch.Tensor], values_outs: Sequence[torch.Tensor]
    ) -> None:
        if any(out.stride(-1) != 1 for out in (*keys_outs, *values_outs)):  # the kernels need contiguous channels
            return super().decode_many_into(encoded, keys_outs, values_outs)
        for item, keys_out, values_out in zip(encoded, keys_outs, values_outs, strict=True):
            Codec.check(self, item)
            check_outputs(item, keys_out, values_out)
        for index in _batches(encoded, lambda e: (e.shape, e.dtype)):
            device = keys_outs[index[0]].device
            payloads = [encoded[i].to(device).payload for i in index]
            self._decode_batch(payloads, [keys_outs[i] for i in index], [values_outs[i] for i in index])

    def decode_rows_into(
        self, encoded: Sequence[Encoded], keys_out: torch.Tensor, values_out: torch.Tensor, rows: Sequence[int]
    ) -> None:
        """As Codec.decode_rows_into; on the CPU, one kernel call per shape with the slots'
        addresses taken from the outputs' strides (the gather of a decode step: no view, no check
        per block beyond its size)."""
        if keys_out.device.type != "cpu" or not cpu_kernels.available() or keys_out.stride(-1) != 1 \
                or values_out.stride(-1) != 1:
            return super().decode_rows_into(encoded, keys_out, values_out, rows)
        batches = self._checked_batches(encoded)
        check_rows(encoded, keys_out, values_out, rows)
        for index in batches:
            payloads = [_on_cpu(encoded[i]).payload for i in index]
            cpu_kernels.decode_rows(self.fmt, payloads, keys_out, values_out, [rows[i] for i in index],
                                    encoded[index[0]].shape)

    def decode_many(self, encoded: Sequence[Encoded], device: torch.device | str) -> list[KVBlock]:
        """Every payload decoded on `device`, in order. ValueError (nothing decoded) if one is not
        this codec's or has the wrong size, or if its mins or scales are not finite."""
        device = torch.device(device)
        for item in encoded:
            Codec.check(self, item)
        results: list[KVBlock | None] = [None] * len(encoded)
        for index in _batches(encoded, lambda e: (e.shape, e.dtype)):
            shape, dtype = encoded[index[0]].shape, encoded[index[0]].dtype
            payloads = [encoded[i].to(device).payload for i in index]
            # keys, values: [n, kv_heads, tokens, head_dim]; block i gets views of row i
            keys = torch.empty((len(index), *shape), dtype=dtype, device=device)
            values = torch.empty((len(index), *shape), dtype=dtype, device=device)
            self._decode_batch(payloads, list(keys), list(values))
            for j, i in enumerate(index):
                results[i] = KVBlock.trusted(keys[j], values[j])
        return results

    def _decode_batch(self, payloads: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Decode payloads into blocks of one shape and dtype, all on one device."""
        self._kernels(keys[0]).decode(self.fmt, payloads, keys, values)

    # -- attention where the codes lie ------------------------------------------------------------

    def attend(
        self,
        q: torch.Tensor,
        encoded: Sequence[Encoded],
        starts: Sequence[int],
        q_positions: torch.Tensor | None = None,
        scale: float | None = None,
        memo: dict | None = None,
        visible: torch.Tensor | None = None,
        page_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q ([heads, n, head_dim]) over these blocks, read from their codes without
        dequantizing them (attend_reference.py defines it); block i's first token sits at position
        starts[i]. Returns (out [heads, n, head_dim] fp32, lse [heads, n] fp32), a partial result
        for attend_reference.merge_partials. Payloads elsewhere than q are copied to q's device
        (the compact bytes cross the bus). Fused kernels: C on the CPU and Triton on CUDA for the
        "int" kinds; the reference otherwise. `memo`: a dict the caller keeps with these same
        blocks (unchanged) and starts; the checks and the C kernel's block table are kept there.
        `visible` ([kv_heads, pages] bool, pages of `page_tokens` positions): KV head h reads only
        the pages marked in visible[h] (a sparse step's), in the C kernel only (ValueError else)."""
        if not encoded:
            raise ValueError("attend needs at least one block")
        kv_heads, _, dim = encoded[0].shape
        if q.dim() != 3 or q.shape[-1] != dim or q.shape[0] % kv_heads:
            raise ValueError(f"q must be [heads, n, {dim}] with heads a multiple of {kv_heads}, got {tuple(q.shape)}")
        scale = dim**-0.5 if scale is None else scale
        table = None if memo is None else memo.get("cpu table")
        if table is not None and q.is_cpu:
            return table.attend(q, q_positions, scale, visible, page_tokens)
        if visible is not None and not (self.fmt.kind == "int" and q.is_cpu and cpu_kernels.available()):
            raise ValueError("attention over marked pages runs in the C kernel: int codes, q on the CPU")
        self._checked_batches(encoded)
        if q.is_cpu:
            payloads = [_on_cpu(item).payload for item in encoded]
        else:
            payloads = [item.to(q.device).wait().payload for item in encoded]
        tokens, starts = [item.shape[1] for item in encoded], list(starts)
        if self.fmt.kind == "int" and q.device.type == "cuda" and triton_kernels.attend_supports(self.fmt, dim):
            return triton_kernels.attend(self.fmt, q, payloads, tokens, starts, kv_heads, q_positions, scale)
        if self.fmt.kind == "int" and q.device.type == "cpu" and cpu_kernels.available():
            table = cpu_kernels.BlockTable(self.fmt, payloads, tokens, starts, kv_heads, dim)
            if memo is not None:
                memo["cpu table"] = table
            return table.attend(q, q_positions, scale, visible, page_tokens)
        return attend_reference.attend_quantized(self.fmt, q, payloads, tokens, starts, kv_heads, q_positions, scale)

    def _checked_batches(self, encoded: Sequence[Encoded]) -> list[list[int]]:
        """Indices of `encoded` grouped by (shape, dtype), each item checked as Codec.check does,
        with the shape, dtype and size formula worked out once per group (a read of many blocks)."""
        spec, batches = self.spec, {}
        for i, item in enumerate(encoded):
            group = batches.get((item.shape, item.dtype)) if isinstance(item, Encoded) and item.codec == spec else None
            if group is None:
                Codec.check(self, item)  # raises, naming what is wrong
                group = batches[(item.shape, item.dtype)] = ([], item.nbytes)
            else:
                payload = item.payload
                if not (isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1
                        and payload.numel() == group[1]):
                    Codec.check(self, item)  # raises, naming what is wrong
            group[0].append(i)
        return [index for index, _ in batches.values()]

    def _kernels(self, like: torch.Tensor):
        """The kernels for blocks like `like`: Triton on CUDA, C on the CPU, else the reference."""
        if like.device.type == "cuda" and triton_kernels.supports(self.fmt, tuple(like.shape)):
            return triton_kernels
        if like.device.type == "cpu" and cpu_kernels.available():
            return cpu_kernels
        return reference

    def check(self, encoded: Encoded) -> None:
        """The base checks, plus: every min and scale in the payload is finite (a payload corrupted
        in its params). On CUDA this waits for the device."""
        super().check(encoded)
        payload = encoded.payload
        layout = self.fmt.layout(*encoded.shape)
        reference.check_params(
            *reference.param_views(payload, layout, "key"),
            *reference.param_views(payload, layout, "value"),
            message=f"{self.spec} payload: {reference.CORRUPT}",
        )


class Int8Codec(QuantizedCodec):
    """8-bit asymmetric codes, min and scale per group of 64: ~1.06 bytes per value at 64 tokens."""

    name = "int8"
    kind = "int"
    bits = 8


class Int4Codec(QuantizedCodec):
    """4-bit asymmetric codes, two per byte, min and scale per group of 64 (KIVI-4)."""

    name = "int4"
    kind = "int"
    bits = 4


class Int2Codec(QuantizedCodec):
    """2-bit asymmetric codes, four per byte, min and scale per group of 32 (KIVI-2)."""

    name = "int2"
    kind = "int"
    bits = 2
    default_group = 32


class Fp8Codec(QuantizedCodec):
    """fp8 e4m3 codes of value/scale, one fp16 scale per group of 64 (scale = max |x| / 448)."""

    name = "fp8"
    kind = "fp8"
    bits = 8
