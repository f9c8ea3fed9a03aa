"""The write contract: when a block held by an upper tier gets a copy in the tier below it.

Names follow SGLang HiCache's write policies (`--hicache-write-policy`), which decide when a
device block is backed up to host memory (and on to storage).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class WritePolicy(ABC):
    """Decides when an upper tier's block is copied down; a pure decision, no I/O.

    Whoever holds the tiers (the store, the simulator) asks `write_now(hits)` when a block
    enters the upper tier (hits = 0) and after each read there (hits = reads so far), as long
    as the tier below has no copy; True means: write the copy now. When a block without a copy
    below leaves the upper tier, `write_on_evict` says whether it is written down (True) or
    dropped (False).
    """

    write_on_evict: ClassVar[bool] = False

    @abstractmethod
    def write_now(self, hits: int) -> bool:
        """Whether a block read `hits` times in the upper tier, with no copy below, is written now."""
