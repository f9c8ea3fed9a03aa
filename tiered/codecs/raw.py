"""raw: the block's bytes unchanged, keys then values."""

from __future__ import annotations

import torch

from ..block import KVBlock
from .base import Codec, Encoded


class RawCodec(Codec):
    """Lossless; payload = keys bytes ‖ values bytes, 2·H·T·D·itemsize bytes."""

    name = "raw"

    def encode(self, block: KVBlock) -> Encoded:
        half = block.keys.numel() * block.dtype.itemsize
        payload = torch.empty(2 * half, dtype=torch.uint8, device=block.device)  # [2·H·T·D·itemsize]
        payload[:half].view(block.dtype).view(block.keys.shape).copy_(block.keys)
        payload[half:].view(block.dtype).view(block.values.shape).copy_(block.values)
        return Encoded(self.spec, block.dtype, tuple(block.keys.shape), payload)

    def decode(self, encoded: Encoded, device: torch.device | str) -> KVBlock:
        self.check(encoded)
        payload = encoded.payload.to(device)
        half = payload.numel() // 2
        keys = payload[:half].view(encoded.dtype).view(encoded.shape)
        values = payload[half:].view(encoded.dtype).view(encoded.shape)
        return KVBlock(keys, values)

    def encoded_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * kv_heads * tokens * head_dim * dtype.itemsize
