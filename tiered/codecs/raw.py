"""raw: the block's bytes unchanged, keys then values."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..block import KVBlock
from .base import Codec, Encoded, check_rows


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

    def decode_rows_into(
        self, encoded: Sequence[Encoded], keys_out: torch.Tensor, values_out: torch.Tensor, rows: Sequence[int]
    ) -> None:
        """Codec.decode_rows_into with the full blocks copied in two calls (keys, values), not two per block."""
        check_rows(encoded, keys_out, values_out, rows)
        tokens = keys_out.shape[2]
        full = [i for i, item in enumerate(encoded) if item.shape[1] == tokens]
        for i in full:
            self.check(encoded[i])
        if full:
            target = keys_out.device
            # [2, kv_heads, tokens, head_dim] per block, stacked: [blocks, 2, kv_heads, tokens, head_dim]
            both = torch.stack([encoded[i].payload.to(target).view(encoded[i].dtype).view(2, *encoded[i].shape)
                                for i in full])
            slots = torch.tensor([rows[i] for i in full], device=target)
            keys_out.index_copy_(1, slots, both[:, 0].transpose(0, 1))
            values_out.index_copy_(1, slots, both[:, 1].transpose(0, 1))
        partial = [i for i in range(len(encoded)) if encoded[i].shape[1] != tokens]
        if partial:
            super().decode_rows_into([encoded[i] for i in partial], keys_out, values_out, [rows[i] for i in partial])

    def encoded_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * kv_heads * tokens * head_dim * dtype.itemsize
