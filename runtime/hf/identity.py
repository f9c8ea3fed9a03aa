"""What ties a store to one transformers model: its fingerprint, and the checks that a store fits."""

from __future__ import annotations

import hashlib
import json

from tiered import BlockLayout, StoreConfig

FINGERPRINT_PREFIX = "hf:"
_UNSTABLE_FIELDS = ("transformers_version", "_name_or_path", "_commit_hash")


def model_fingerprint(config) -> str:
    """A stable name for the model `config` describes: a hash of its decoder config (dtype included,
    the transformers version left out) and its `name_or_path`. Content keys are salted with it, so two
    models never share blocks. It does not hash the weights: two checkpoints saved under one
    `name_or_path` with one config must be told apart by the store's own fingerprint or a salt."""
    text = config.get_text_config(decoder=True)
    fields = {k: v for k, v in text.to_dict().items() if k not in _UNSTABLE_FIELDS}
    identity = {
        "name_or_path": getattr(config, "name_or_path", "") or "",
        "dtype": str(getattr(text, "dtype", None) or getattr(config, "dtype", None)),
        "config": fields,
    }
    payload = json.dumps(identity, sort_keys=True, default=str).encode()
    return FINGERPRINT_PREFIX + hashlib.blake2b(payload, digest_size=16).hexdigest()


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the decoder `config` describes."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def check_store_fits(store_config: StoreConfig, layout: BlockLayout | None, config) -> None:
    """Raise ValueError unless a store of `store_config` whose blocks have `layout` (None: none yet) can
    hold this model's KV: its per-layer rooms, fingerprint and block shape match the model."""
    layers, kv_heads, head_dim = kv_shape(config)
    if store_config.layers is not None and store_config.layers != layers:
        raise ValueError(
            f"the store is split into rooms for {store_config.layers} layers, the model has {layers}: "
            f"use StoreConfig(layers={layers}) (or layers=None)"
        )
    fingerprint = store_config.fingerprint
    if fingerprint and fingerprint != model_fingerprint(config):
        raise ValueError(
            f"the store belongs to the model {fingerprint!r}, not to this one ({model_fingerprint(config)!r}): "
            "content keys must never mix models; give this model its own store (or disk_dir)"
        )
    if layout is not None and (layout.kv_heads, layout.head_dim) != (kv_heads, head_dim):
        raise ValueError(
            f"the store holds blocks of kv_heads={layout.kv_heads}, head_dim={layout.head_dim}; "
            f"the model needs kv_heads={kv_heads}, head_dim={head_dim}"
        )
