"""Dequantized weights cached as safetensors in the user's cache directory, keyed by the source file's hash.

A GGUF file takes seconds to parse and dequantize; its cache entry loads in well under one. Entries are
written to a temporary file and renamed into place (never half-written), carry a checksum of their
tensor bytes, and are read without pickle: an entry that is corrupt or from another format is a miss.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tiered.atomic import atomic_path

from .checkpoint import Checkpoint
from .config import ModelConfig
from .tokenizer import Tokenizer

# Bump when what a loader puts in an entry changes (tensor layout, tokenizer building, config fields).
CACHE_FORMAT = 1


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/tiered, or ~/.cache/tiered."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tiered"


def entry_path(digest: str) -> Path:
    return cache_dir() / "weights" / f"{digest}-format{CACHE_FORMAT}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = xxhash.xxh3_128()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def load_cached(digest: str) -> Checkpoint | None:
    """The cached checkpoint of the source whose hash is `digest`, or None on a miss."""
    path = entry_path(digest)
    if not path.is_file():
        return None
    try:
        metadata = _metadata(path)
        tensors = load_file(str(path))
        if metadata["digest"] != digest or metadata["checksum"] != _checksum(tensors):
            raise ValueError("checksum mismatch")
        config = _config(metadata)
        tokenizer = Tokenizer.from_json(metadata["tokenizer"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        warnings.warn(f"ignoring unreadable weight cache entry {path}: {error}", stacklevel=2)
        return None
    return Checkpoint(config, tensors, tokenizer, digest)


def load_cached_header(digest: str) -> tuple[ModelConfig, Tokenizer] | None:
    """The config and tokenizer of the cached checkpoint of `digest`, without reading its tensors
    (their checksum is checked when the weights are loaded); None on a miss."""
    path = entry_path(digest)
    if not path.is_file():
        return None
    try:
        metadata = _metadata(path)
        if metadata["digest"] != digest:
            return None
        return _config(metadata), Tokenizer.from_json(metadata["tokenizer"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        return None


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as file:
        return file.metadata()


def _config(metadata: dict) -> ModelConfig:
    fields = json.loads(metadata["config"])
    return ModelConfig(**{**fields, "rope_params": tuple(tuple(pair) for pair in fields["rope_params"])})


def store_cached(checkpoint: Checkpoint) -> Path | None:
    """Write `checkpoint` to the cache atomically; returns its path, or None when the cache is not writable."""
    path = entry_path(checkpoint.digest)
    tensors = {name: tensor.contiguous() for name, tensor in checkpoint.tensors.items()}
    metadata = {
        "digest": checkpoint.digest,
        "checksum": _checksum(tensors),
        "config": json.dumps(dataclasses.asdict(checkpoint.config)),
        "tokenizer": checkpoint.tokenizer.to_json(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, mode=0o644) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
    except OSError as error:
        warnings.warn(f"could not write the weight cache {path}: {error}", stacklevel=2)
        return None
    return path
