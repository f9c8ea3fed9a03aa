"""The codec contract: a block becomes one contiguous byte payload for a lower tier, and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..block import FLOAT_DTYPES, KVBlock
from ..transfer import can_pin, copy_into


@dataclass(frozen=True, slots=True)
class Encoded:
    """A block as a codec wrote it: one flat uint8 payload plus what decoding needs to know.

    payload: [nbytes] uint8, on whatever device the codec or a transfer put it.
    ready: while an asynchronous copy is still filling `payload` (device -> pinned host memory),
    the event that completes with it; wait() before reading the bytes on the host.
    """

    codec: str  # the codec's spec, e.g. "raw" or "int4:g64"
    dtype: torch.dtype  # dtype of the decoded block
    shape: tuple[int, int, int]  # [kv_heads, tokens, head_dim] of the decoded block
    payload: torch.Tensor
    ready: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    @property
    def device(self) -> torch.device:
        return self.payload.device

    def wait(self) -> Encoded:
        """Self, once the payload's bytes are in place."""
        if self.ready is not None:
            self.ready.synchronize()
        return self

    def to(self, device: torch.device | str, pin: bool = False, non_blocking: bool = False) -> Encoded:
        """This payload on `device` (pinned host memory when `pin` and CUDA is present); self if
        already there. Copies to and from CUDA run on the transfer stream (tiered.transfer); with
        `non_blocking`, a copy into pinned host memory returns before it is done (see `ready`)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        pin = pin and device.type == "cpu" and can_pin()
        if self.payload.device == device and (not pin or self.payload.is_pinned()):
            return self
        out = torch.empty(self.payload.shape, dtype=torch.uint8, device=device, pin_memory=pin)
        if self.payload.device.type == "cpu" and device.type == "cpu":
            self.wait()  # a host copy does not queue behind a pending transfer
        ready = copy_into(self.payload, out, non_blocking)
        return Encoded(self.codec, self.dtype, self.shape, out, ready)


class Codec(ABC):
    """Turns a KVBlock into an Encoded payload and back.

    encode runs on the block's device (so a quantized payload is what crosses the bus);
    decode returns a block on `device`. Blocks may be partial (fewer tokens than a full block).
    """

    name: ClassVar[str]

    @property
    def spec(self) -> str:
        """Name plus every parameter that changes the bytes; recorded with stored payloads."""
        return self.name

    @abstractmethod
    def encode(self, block: KVBlock) -> Encoded:
        """The block as one payload on the block's device."""

    def encode_into(self, block: KVBlock, out: torch.Tensor) -> Encoded:
        """encode() with the payload written into `out` ([nbytes] uint8).

        `out` may be on another device than the block (a pinned host slot for a CUDA block): the
        block is encoded where it is and the payload copied over on the transfer stream; the
        result's `ready` then says when it has landed. The default encodes then copies; a codec
        that can write in place overrides it.
        """
        encoded = self.encode(block)
        ready = copy_into(encoded.payload, out)
        return Encoded(encoded.codec, encoded.dtype, encoded.shape, out, ready)

    def encode_many_into(self, blocks: Sequence[KVBlock], outs: Sequence[torch.Tensor]) -> list[Encoded]:
        """encode_into() of every block into its buffer, in order (overridden by codecs with batched
        kernels: one call for many blocks)."""
        return [self.encode_into(block, out) for block, out in zip(blocks, outs, strict=True)]

    def encode_many(self, blocks: Sequence[KVBlock]) -> list[Encoded]:
        """encode() of every block, in order. A codec with batched kernels overrides it: one call
        for many blocks is what reaches memory bandwidth."""
        return [self.encode(block) for block in blocks]

    @abstractmethod
    def decode(self, encoded: Encoded, device: torch.device | str) -> KVBlock:
        """The block on `device`. The result may share memory with `encoded.payload`."""

    def decode_into(self, encoded: Encoded, keys_out: torch.Tensor, values_out: torch.Tensor) -> None:
        """decode() into keys_out and values_out ([kv_heads, tokens, head_dim] of the block's dtype,
        on one device; they may be views, e.g. of a device pool's slot). The default decodes then
        copies; a codec that can write in place overrides it."""
        check_outputs(encoded, keys_out, values_out)
        block = self.decode(encoded, keys_out.device)
        keys_out.copy_(block.keys)
        values_out.copy_(block.values)

    def decode_many_into(
        self, encoded: Sequence[Encoded], keys_outs: Sequence[torch.Tensor], values_outs: Sequence[torch.Tensor]
    ) -> None:
        """decode_into() of every payload into its pair of outputs (overridden by codecs with batched
        kernels: one call for many blocks)."""
        for item, keys_out, values_out in zip(encoded, keys_outs, values_outs, strict=True):
            self.decode_into(item, keys_out, values_out)

    def decode_many(self, encoded: Sequence[Encoded], device: torch.device | str) -> list[KVBlock]:
        """decode() of every payload, in order (overridden by codecs with batched kernels)."""
        return [self.decode(item, device) for item in encoded]

    def decode_rows_into(
        self, encoded: Sequence[Encoded], keys_out: torch.Tensor, values_out: torch.Tensor, rows: Sequence[int]
    ) -> None:
        """Decode payload i into block slot rows[i] of keys_out and values_out (each [kv_heads,
        blocks, block_tokens, head_dim]; a block of fewer tokens fills the slot's first ones):
        decode_many_into without a view per block (overridden by codecs whose kernels take the
        slots' addresses)."""
        check_rows(encoded, keys_out, values_out, rows)
        self.decode_many_into(
            encoded,
            [keys_out[:, r, : item.shape[1]] for r, item in zip(rows, encoded)],
            [values_out[:, r, : item.shape[1]] for r, item in zip(rows, encoded)],
        )

    @abstractmethod
    def encoded_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Payload bytes of a block of this shape: the documented size formula."""

    def check(self, encoded: Encoded) -> None:
        """Raise ValueError/TypeError unless `encoded` was written by this codec and is the expected size."""
        if not isinstance(encoded, Encoded):
            raise TypeError(f"expected an Encoded, got {type(encoded).__name__}")
        if encoded.codec != self.spec:
            raise ValueError(f"payload was written by codec {encoded.codec!r}, not {self.spec!r}")
        shape = encoded.shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
            raise ValueError(f"an encoded block's shape must be [kv_heads, tokens, head_dim] > 0, got {shape!r}")
        if encoded.dtype not in FLOAT_DTYPES:
            raise TypeError(f"an encoded block's dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {encoded.dtype}")
        payload = encoded.payload
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"a payload must be a 1-D uint8 tensor, got {getattr(payload, 'dtype', type(payload))}")
        expected = self.encoded_nbytes(*shape, encoded.dtype)
        if encoded.nbytes != expected:
            raise ValueError(
                f"{self.spec} payload of shape {shape} must be {expected} bytes, got {encoded.nbytes}"
            )


def check_rows(encoded: Sequence[Encoded], keys_out: torch.Tensor, values_out: torch.Tensor,
               rows: Sequence[int]) -> None:
    """ValueError unless block slot rows[i] of keys_out and values_out ([kv_heads, blocks,
    block_tokens, head_dim], one dtype and device) can hold encoded[i], and no slot is named twice."""
    if len(encoded) != len(rows):
        raise ValueError(f"got {len(encoded)} payloads for {len(rows)} rows")
    if keys_out.dim() != 4 or keys_out.shape != values_out.shape or keys_out.dtype != values_out.dtype \
            or keys_out.device != values_out.device:
        raise ValueError(f"decode_rows_into needs two [kv_heads, blocks, block_tokens, head_dim] tensors of one "
                         f"shape, dtype and device, got {tuple(keys_out.shape)} and {tuple(values_out.shape)}")
    heads, blocks, tokens, dim = keys_out.shape
    if len(set(rows)) != len(rows) or any(not 0 <= r < blocks for r in rows):
        raise ValueError(f"rows must be distinct slots in [0, {blocks}), got {list(rows)}")
    for item in encoded:
        h, t, d = item.shape
        if (h, d) != (heads, dim) or t > tokens or item.dtype != keys_out.dtype:
            raise ValueError(f"a {item.dtype} block of shape {item.shape} does not fit a slot of "
                             f"{keys_out.dtype} [{heads}, {tokens}, {dim}]")


def check_buffer(out: torch.Tensor, nbytes: int) -> None:
    """ValueError unless `out` is a contiguous [nbytes] uint8 tensor, a payload's buffer."""
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != nbytes or not out.is_contiguous():
        raise ValueError(f"encode_into needs a contiguous [{nbytes}] uint8 tensor, got {out.dtype} {tuple(out.shape)}")


def check_outputs(encoded: Encoded, keys_out: torch.Tensor, values_out: torch.Tensor) -> None:
    """ValueError unless keys_out and values_out can hold the decoded block."""
    for out in (keys_out, values_out):
        if tuple(out.shape) != encoded.shape or out.dtype != encoded.dtype or out.device != keys_out.device:
            raise ValueError(
                f"decode_into needs two {encoded.dtype} tensors of shape {encoded.shape} on one device, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
