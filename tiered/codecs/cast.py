"""fp16 and bf16: the block cast to a 16-bit float, keys then values; decoded back to its dtype."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..block import KVBlock
from .base import Codec, Encoded


class CastCodec(Codec):
    """payload = keys.to(target) ‖ values.to(target): 2·H·T·D·2 bytes. Exact for blocks already in
    `target`; otherwise the decoded block equals a cast there and back."""

    target: ClassVar[torch.dtype]

    def encode(self, block: KVBlock) -> Encoded:
        half = block.keys.numel() * self.target.itemsize
        payload = torch.empty(2 * half, dtype=torch.uint8, device=block.device)  # [2·H·T·D·2]
        payload[:half].view(self.target).view(block.keys.shape).copy_(block.keys)
        payload[half:].view(self.target).view(block.values.shape).copy_(block.values)
        return Encoded(self.spec, block.dtype, tuple(block.keys.shape), payload)

    def decode(self, encoded: Encoded, device: torch.device | str) -> KVBlock:
        self.check(encoded)
        payload = encoded.to(device).payload
        half = payload.numel() // 2
        keys = payload[:half].view(self.target).view(encoded.shape).to(encoded.dtype)
        values = payload[half:].view(self.target).view(encoded.shape).to(encoded.dtype)
        return KVBlock(keys, values)

    def encoded_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * kv_heads * tokens * head_dim * self.target.itemsize


class Fp16Codec(CastCodec):
    name = "fp16"
    target = torch.float16


class Bf16Codec(CastCodec):
    name = "bf16"
    target = torch.bfloat16
