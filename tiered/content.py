"""Content addresses of full blocks: a hash chained over the token ids of every block up to this one.

Identical prefixes get identical addresses in every process and on every machine (blake2b over
fixed-width little-endian token ids; nothing depends on Python's `hash` or PYTHONHASHSEED), so
sessions share prefix blocks by reference and a later process finds them on disk, as vLLM,
SGLang and LMCache key their prefix blocks. The chain starts from a salt that names everything
else the keys and values depend on: the model fingerprint, block_tokens, and optionally a tenant's
`cache_salt`. A key without the model in its salt could return another model's KV.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .block import BlockKey

CONTENT_PREFIX = "c:"  # namespaces of content-addressed blocks; session namespaces never start so
DIGEST_BYTES = 16
_MAX_TOKEN_ID = (1 << 32) - 1


def chain_root(fingerprint: str, block_tokens: int, salt: str = "") -> bytes:
    """The chain's starting digest for one model, block size and tenant salt."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError("content addresses need the model's fingerprint (a non-empty str)")
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens <= 0:
        raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
    if not isinstance(salt, str):
        raise TypeError(f"salt must be str, got {type(salt).__name__}")
    text = f"tiered-content-v1\0{fingerprint}\0{block_tokens}\0{salt}"
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def chain_hashes(root: bytes, token_ids: Sequence[int], block_tokens: int, parent: bytes | None = None) -> list[bytes]:
    """Digests of each full block of `token_ids` (a trailing partial block gets none).

    parent: the digest of the block before token_ids[0] (None: token_ids starts the sequence,
    whose chain starts at `root`). Block i's digest hashes block i-1's digest and its own ids.
    """
    digests = []
    previous = root if parent is None else parent
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        ids = token_ids[start : start + block_tokens]
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= _MAX_TOKEN_ID for i in ids):
            raise ValueError(f"token ids must be ints in [0, 2**32), got one of {list(ids)[:8]}...")
        payload = b"".join(i.to_bytes(4, "little") for i in ids)
        previous = hashlib.blake2b(previous + payload, digest_size=DIGEST_BYTES).digest()
        digests.append(previous)
    return digests


def content_key(digest: bytes, layer: int, index: int) -> BlockKey:
    """The BlockKey of block `index` (its position in the sequence) of `layer` with content `digest`."""
    return BlockKey(CONTENT_PREFIX + digest.hex(), layer, index)


def is_content_key(key: BlockKey) -> bool:
    return key.namespace.startswith(CONTENT_PREFIX)
