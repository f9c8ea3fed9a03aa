"""s3fifo: a small FIFO filters blocks read once, a main FIFO keeps the rest with a 2-bit clock.

S3-FIFO (Yang, Zhang, Qiu, Yue, Vinayak: "FIFO queues are all you need for cache eviction",
SOSP 2023, https://dl.acm.org/doi/10.1145/3600006.3613147), as the authors' simulator
libCacheSim implements the paper's version (S3FIFOv0):

- a new block enters the small queue S, or the main queue M if the ghost queue G remembers it;
- a read raises the block's frequency, capped at 3;
- one eviction takes from M if M holds more than its share (capacity minus the small share)
  or S is empty, else from S. From S: the oldest block moves to M (frequency reset) if it was
  read at least `move_to_main_hits` times, else it leaves and G remembers it; this repeats
  until one leaves (from M if S runs dry). From M: the oldest block with a frequency f > 0
  goes back to the tail with f - 1 (a clock), the first with f = 0 leaves;
- G is a FIFO of keys only, holding at most as many keys as M's share.

Under the eviction contract S3-FIFO's reordering moves cannot happen in `candidates()`: it
plays the eviction process forward on a private overlay and yields its victims in order. When
the store then removes the block `candidates()` named first, `on_remove` applies the moves the
process made to reach it, so the policy ends where S3-FIFO would after that eviction; removing
any other block (a promotion, a deletion) just forgets it, G included.

The capacity in blocks is `capacity_blocks`, or, when None, the most blocks the tier has held
at once (a tier evicts only when full, so that is its capacity for blocks of one size). The
small share is int(capacity * small_fraction), at least 1.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from ..stats import BlockStats
from .base import EvictionPolicy

_MAX_FREQ = 3
_END = object()


@dataclass
class S3FIFO(EvictionPolicy):
    """S3-FIFO eviction. See the module docstring for the algorithm and the contract mapping.

    small_fraction     share of the capacity for the small queue (the paper's 10%)
    move_to_main_hits  reads in the small queue that earn a block a place in the main queue
    capacity_blocks    capacity of the tier in blocks; None: the high-water mark of len(self)
    """

    small_fraction: float = 0.1
    move_to_main_hits: int = 1
    capacity_blocks: int | None = None

    _small: OrderedDict[Hashable, None] = field(init=False, repr=False, default_factory=OrderedDict)  # oldest first
    _main: OrderedDict[Hashable, None] = field(init=False, repr=False, default_factory=OrderedDict)  # oldest first
    _ghost: OrderedDict[Hashable, None] = field(init=False, repr=False, default_factory=OrderedDict)  # oldest first
    _freq: dict[Hashable, int] = field(init=False, repr=False, default_factory=dict)
    _seen: dict[Hashable, tuple[int, int]] = field(init=False, repr=False, default_factory=dict)
    _high_water: int = field(init=False, repr=False, default=0)
    _main_share: int = field(init=False, repr=False, default=0)  # capacity minus the small share

    def __post_init__(self) -> None:
        if not 0 < self.small_fraction < 1:
            raise ValueError(f"S3FIFO: small_fraction must be in (0, 1), got {self.small_fraction!r}")
        if not isinstance(self.move_to_main_hits, int) or self.move_to_main_hits < 1:
            raise ValueError(f"S3FIFO: move_to_main_hits must be an int >= 1, got {self.move_to_main_hits!r}")
        if self.capacity_blocks is not None and (not isinstance(self.capacity_blocks, int) or self.capacity_blocks < 1):
            raise ValueError(f"S3FIFO: capacity_blocks must be None or an int >= 1, got {self.capacity_blocks!r}")

    def priority(self, key: Hashable, stats: BlockStats) -> int:
        """Position of `key` in the current eviction order (0 leaves first). O(n): for inspection."""
        for position, candidate in enumerate(self.candidates()):
            if candidate == key:
                return position
        raise KeyError(f"{key} is not tracked by S3FIFO")

    def on_insert(self, key: Hashable, stats: BlockStats) -> None:
        if key in self._freq:
            raise KeyError(f"{key} is already tracked by S3FIFO")
        if self._ghost.pop(key, False) is None:
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0
        self._seen[key] = (stats.hits, stats.last_access_step)
        if len(self._freq) > self._high_water:
            self._high_water = len(self._freq)
            capacity = self.capacity_blocks or self._high_water
            self._main_share = capacity - max(1, int(capacity * self.small_fraction))
        while len(self._ghost) > self._main_share:
            self._ghost.popitem(last=False)

    def on_update(self, key: Hashable, stats: BlockStats) -> None:
        seen = self._seen.get(key)
        if seen is None:
            raise KeyError(f"{key} is not tracked by S3FIFO")
        if stats.hits > seen[0] or stats.last_access_step > seen[1]:  # a read
            self._freq[key] = min(self._freq[key] + 1, _MAX_FREQ)
        self._seen[key] = (stats.hits, stats.last_access_step)

    def on_remove(self, key: Hashable) -> None:
        if key not in self._freq:
            return
        moves: list[tuple[Hashable, int]] = []
        if next(self._evictions(moves), None) == key:  # S3-FIFO's own eviction: apply its moves
            for moved, freq in moves:
                self._small.pop(moved, None)
                self._main.pop(moved, None)
                self._main[moved] = None
                self._freq[moved] = freq
            if self._small.pop(key, False) is None:
                self._ghost[key] = None
        else:
            self._small.pop(key, None)
        self._main.pop(key, None)
        del self._freq[key], self._seen[key]

    def candidates(self) -> Iterator[Hashable]:
        """Tracked keys in the order S3-FIFO's evictions would take them; changes nothing."""
        return self._evictions(None)

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._freq

    def _evictions(self, moves: list[tuple[Hashable, int]] | None) -> Iterator[Hashable]:
        """Victims of successive evictions, played on an overlay; `moves` (if given) collects the
        (key, frequency) reinsertions into M made before the first victim."""
        main_share, threshold, own_freq = self._main_share, self.move_to_main_hits, self._freq
        small, main_tail = iter(self._small), iter(self._main)
        requeued: deque[Hashable] = deque()  # keys put back at M's tail, in order
        freq: dict[Hashable, int] = {}  # overlay over self._freq
        small_left, main_left = len(self._small), len(self._main)
        recording = moves is not None

        while small_left or main_left:
            if small_left and main_left <= main_share:
                victim = None
                while small_left:
                    key = next(small)
                    small_left -= 1
                    if own_freq[key] >= threshold:
                        freq[key] = 0
                        requeued.append(key)
                        main_left += 1
                        if recording:
                            moves.append((key, 0))
                    else:
                        victim = key
                        break
                if victim is not None:
                    recording = False
                    yield victim
                    continue
            while True:  # from M: a clock over the FIFO
                key = next(main_tail, _END)
                if key is _END:
                    key = requeued.popleft()
                f = freq[key] if key in freq else own_freq[key]
                if f == 0:
                    break
                freq[key] = f - 1
                requeued.append(key)
                if recording:
                    moves.append((key, f - 1))
            main_left -= 1
            recording = False
            yield key
