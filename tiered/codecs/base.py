"""The codec contract: a block becomes one contiguous byte payload for a lower tier, and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..block import KVBlock


@dataclass(frozen=True, slots=True)
class Encoded:
    """A block as a codec wrote it: one flat uint8 payload plus what decoding needs to know.

    payload: [nbytes] uint8, on whatever device the codec or a transfer put it.
    """

    codec: str  # the codec's spec, e.g. "raw" or "int4:g64"
    dtype: torch.dtype  # dtype of the decoded block
    shape: tuple[int, int, int]  # [kv_heads, tokens, head_dim] of the decoded block
    payload: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    @property
    def device(self) -> torch.device:
        return self.payload.device

    def to(self, device: torch.device | str, pin: bool = False, non_blocking: bool = False) -> Encoded:
        """This payload on `device` (pinned host memory when `pin`); self if already there."""
        device = torch.device(device)
        if self.payload.device == device and (not pin or self.payload.is_pinned()):
            return self
        if pin and device.type == "cpu":
            out = torch.empty(self.payload.shape, dtype=torch.uint8, pin_memory=True)
            out.copy_(self.payload, non_blocking=non_blocking)
        else:
            out = self.payload.to(device, non_blocking=non_blocking)
        return Encoded(self.codec, self.dtype, self.shape, out)


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
        """encode() with the payload written into `out` ([nbytes] uint8 on the block's device).

        The default encodes then copies; a codec that can write in place overrides it.
        """
        encoded = self.encode(block)
        out.copy_(encoded.payload)
        return Encoded(encoded.codec, encoded.dtype, encoded.shape, out)

    @abstractmethod
    def decode(self, encoded: Encoded, device: torch.device | str) -> KVBlock:
        """The block on `device`. The result may share memory with `encoded.payload`."""

    @abstractmethod
    def encoded_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Payload bytes of a block of this shape: the documented size formula."""

    def check(self, encoded: Encoded) -> None:
        """Raise ValueError unless `encoded` was written by this codec and is the expected size."""
        if encoded.codec != self.spec:
            raise ValueError(f"payload was written by codec {encoded.codec!r}, not {self.spec!r}")
        expected = self.encoded_nbytes(*encoded.shape, encoded.dtype)
        if encoded.nbytes != expected:
            raise ValueError(
                f"{self.spec} payload of shape {encoded.shape} must be {expected} bytes, got {encoded.nbytes}"
            )
