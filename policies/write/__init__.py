"""Write policies by name: `WRITE` is the registry, `make_write` the factory."""

from __future__ import annotations

from ..registry import build
from .base import WritePolicy
from .selective import WriteThroughSelective
from .write_back import WriteBack
from .write_through import WriteThrough

WRITE: dict[str, type[WritePolicy]] = {
    "write-through": WriteThrough,
    "write-back": WriteBack,
    "write-through-selective": WriteThroughSelective,
}


def make_write(name: str, **kwargs) -> WritePolicy:
    """A new policy registered as `name`; ValueError listing the valid names otherwise."""
    return build(WRITE, "write policy", name, **kwargs)


__all__ = ["WRITE", "WritePolicy", "make_write"]
