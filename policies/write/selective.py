"""write-through-selective: a block is copied down once it has been read `hit_threshold` times
in the upper tier (HiCache's `write_through_selective`, whose threshold is 2); a block evicted
before that is dropped, so blocks read once never cost a write."""

from __future__ import annotations

from dataclasses import dataclass

from .base import WritePolicy


@dataclass
class WriteThroughSelective(WritePolicy):
    hit_threshold: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.hit_threshold, int) or isinstance(self.hit_threshold, bool) or self.hit_threshold < 1:
            raise ValueError(f"WriteThroughSelective: hit_threshold must be an int >= 1, got {self.hit_threshold!r}")

    def write_now(self, hits: int) -> bool:
        return hits >= self.hit_threshold
