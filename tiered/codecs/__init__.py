"""Codecs by name: `CODECS` is the registry, `make_codec` the factory."""

from __future__ import annotations

from .base import Codec, Encoded
from .raw import RawCodec

CODECS: dict[str, type[Codec]] = {
    "raw": RawCodec,
}


def make_codec(name: str, **kwargs) -> Codec:
    """The codec registered as `name`; ValueError listing the valid names otherwise."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; valid names: {sorted(CODECS)}") from None
    return cls(**kwargs)


__all__ = ["CODECS", "Codec", "Encoded", "make_codec"]
