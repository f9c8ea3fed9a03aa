"""BlockStats: what policies see of a block. The store keeps one per block and updates it in place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BlockStats:
    """Statistics of one stored block.

    Steps are ticks of the store's logical clock, which advances once per operation.
    """

    nbytes: int  # bytes of capacity the block takes in its tier
    tier: str  # "device" | "host" | "disk"
    inserted_step: int  # when the block was first put
    tier_step: int  # when the block arrived in its current tier
    last_access_step: int  # when the block was last read (get or prefetch) or put
    tokens: int = 0  # tokens the block holds (a sequence's last block may be partial)
    hits: int = 0  # reads since it was put
    score: float = 0.0  # importance, higher is more valuable

    @property
    def last_used_step(self) -> int:
        """Last read, or arrival in the current tier, whichever came later."""
        return max(self.last_access_step, self.tier_step)
