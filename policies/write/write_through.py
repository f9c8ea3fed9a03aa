"""write-through: every block is copied down as soon as it enters the upper tier (HiCache's
`write_through`); an evicted block is dropped, its copy below already exists."""

from __future__ import annotations

from dataclasses import dataclass

from .base import WritePolicy


@dataclass
class WriteThrough(WritePolicy):
    def write_now(self, hits: int) -> bool:
        return True
