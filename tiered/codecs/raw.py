"""raw: the block's bytes unchanged, keys then values."""

from __future__ import annotations

import torch

from ..block import KVBlock
from .base import Codec, Encoded


class RawCodec(Codec):
    """Lossless; payload = keys bytes ‖ values bytes, 2·H·T·D·itemsize bytes."""

    name = "raw"

    def encode(self, block: KVBlock) -> Encoded:
        # [2, kv_heads, tokens, head_dim] in the block's dtype, seen as 2·H·T·D·itemsize bytes
        payload = torch.stack((block.keys, block.values)).view(torch.uint8).view(-1)
        return Encoded(self.spec, block.dtype, tuple(block.keys.shape), payload)

    def encode_into(self, block: KVBlock, out: torch.Tensor) -> Encoded:
        torch.stack((block.keys, block.values), out=out.view(block.dtype).view(2, *block.keys.shape))
        return Encoded(self.spec, block.dtype, tuple(block.keys.shape), out)

    def decode(self, encoded: Encoded, device: torch.device | str) -> KVBlock:
        self.check(encoded)
        both = encoded.to(device).payload.view(encoded.dtype).view(2, *encoded.shape)
        return KVBlock.trusted(both[0], both[1])  # indexing, not unpacking: unbind costs far more

    def encoded_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * kv_heads * tokens * head_dim * dtype.itemsize
