"""The directory's identity: format version and a fingerprint of what wrote it.

MANIFEST.json is written when a directory is first opened and rewritten (atomically) once, when
the first block fixes the dtype. Opening a directory under another identity raises
IdentityMismatch naming each field that differs: blocks written for another model, block size,
codec or dtype are never served.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .files import atomic_write

MANIFEST_NAME = "MANIFEST.json"
FORMAT_NAME = "tiered-disk"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 10


class IdentityMismatch(ValueError):
    """The directory was written by something else (another model, block size, codec or dtype)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """What writes a directory. dtype is None until the first block fixes it."""

    fingerprint: str  # the model's identity (architecture, weights hash); "" when none is given
    block_tokens: int
    codec: str  # spec of the codec every stored payload was written by
    dtype: str | None = None  # "float16" | "bfloat16" | "float32"

    def with_dtype(self, dtype: str) -> Identity:
        return replace(self, dtype=dtype)

    def differences(self, stored: Identity) -> list[str]:
        """'field: stored value != this value' for each field that differs (dtype only once fixed)."""
        out = []
        for name in ("fingerprint", "block_tokens", "codec", "dtype"):
            mine, theirs = getattr(self, name), getattr(stored, name)
            if name == "dtype" and (mine is None or theirs is None):
                continue
            if mine != theirs:
                out.append(f"{name}: directory has {theirs!r}, this store has {mine!r}")
        return out


def read_manifest(directory: Path) -> Identity | None:
    """The identity recorded in `directory`, or None if it has no manifest. ValueError if malformed."""
    path = directory / MANIFEST_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        doc = json.loads(data)
        if doc.get("format") != FORMAT_NAME:
            raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT_NAME!r}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r}; this code reads {FORMAT_VERSION}")
        ident = doc["identity"]
        identity = Identity(ident["fingerprint"], ident["block_tokens"], ident["codec"], ident["dtype"])
        if not (isinstance(identity.fingerprint, str) and isinstance(identity.codec, str)
                and type(identity.block_tokens) is int and (identity.dtype is None or isinstance(identity.dtype, str))):
            raise ValueError("identity fields have the wrong types")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid disk tier manifest ({err}); refusing to use {directory}") from None
    return identity


def write_manifest(directory: Path, identity: Identity) -> None:
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "identity": asdict(identity)}
    atomic_write(directory / MANIFEST_NAME, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
