"""Codecs by name: `CODECS` is the registry, `make_codec` the factory."""

from __future__ import annotations

import re

from .base import Codec, Encoded
from .cast import Bf16Codec, Fp16Codec
from .quantized import Fp8Codec, Int2Codec, Int4Codec, Int8Codec, QuantizedCodec
from .raw import RawCodec

CODECS: dict[str, type[Codec]] = {
    "raw": RawCodec,
    "fp16": Fp16Codec,
    "bf16": Bf16Codec,
    "fp8": Fp8Codec,
    "int8": Int8Codec,
    "int4": Int4Codec,
    "int2": Int2Codec,
}


def make_codec(name: str, **kwargs) -> Codec:
    """The codec registered as `name`; ValueError listing the valid names otherwise.

    `name` may be a spec as codecs write it, "int4:g32": the name, then ":g<group size>" for the
    quantizing codecs (the same as group=32). make_codec(codec.spec) rebuilds an equal codec.
    """
    if not isinstance(name, str):
        raise TypeError(f"codec name must be str, got {type(name).__name__}")
    base, *params = name.split(":")
    try:
        cls = CODECS[base]
    except KeyError:
        raise ValueError(f"unknown codec {base!r}; valid names: {sorted(CODECS)}") from None
    for param in params:
        match = re.fullmatch(r"g([1-9][0-9]*)", param)
        if match is None or not issubclass(cls, QuantizedCodec) or "group" in kwargs:
            expected = "':g<group size>' once" if issubclass(cls, QuantizedCodec) else "no parameters"
            raise ValueError(f"codec spec {name!r}: {base!r} takes {expected}, got {param!r}")
        kwargs["group"] = int(match.group(1))
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"codec {base!r}: {err}") from None


__all__ = ["CODECS", "Codec", "Encoded", "QuantizedCodec", "make_codec"]
