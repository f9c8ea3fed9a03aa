"""Blocks, tiers, codecs and the store that moves blocks between tiers."""

from .block import BlockKey, BlockLayout, KVBlock
from .codecs import CODECS, Codec, Encoded, make_codec
from .config import StoreConfig
from .store import TieredStore
from .tier import Tier

__all__ = [
    "CODECS",
    "BlockKey",
    "BlockLayout",
    "Codec",
    "Encoded",
    "KVBlock",
    "StoreConfig",
    "Tier",
    "TieredStore",
    "make_codec",
]
