"""write-back: a block is copied down only when it is evicted from the upper tier (HiCache's
`write_back`): fewest bytes written, and no copy below until eviction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import WritePolicy


@dataclass
class WriteBack(WritePolicy):
    write_on_evict: ClassVar[bool] = True

    def write_now(self, hits: int) -> bool:
        return False
