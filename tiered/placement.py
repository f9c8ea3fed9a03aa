"""Placement: where every block lives, and the moves between tiers that keep each tier within capacity.

A block lives in exactly one tier. When a tier has no room, its eviction policy names victims,
which move one tier down through that tier's codec (and leave the store from the bottom tier);
promotion brings a block up to the device tier. Not thread-safe: TieredStore holds its lock
around every call.

Blocks under read (`reading`: a read's views and payloads are in use outside the store's lock)
never move: they are never chosen as victims, and promoting or removing one is refused.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Iterator
from itertools import islice

import torch

from policies import BlockStats

from .block import BlockKey, BlockLayout, KVBlock
from .codecs import Codec, Encoded
from .content import is_content_key
from .counters import TierCounters
from .device import DeviceTier
from .rooms import RoomPolicies
from .tier import Tier

DEVICE = 0  # index of the top tier
VICTIM_SCAN = 4096  # candidates looked through for a block no session reads before taking one that one does


class NoRoom(RuntimeError):
    """A tier cannot make room without moving a block that may not move."""


class Pins:
    """Blocks held by work in progress (reads, or sessions computing), one frozenset per holder
    with the holder's thread: holders are few and each holds many keys, so a pin costs one set
    build, not a loop over keys."""

    def __init__(self) -> None:
        self._holders: list[tuple[int, frozenset[BlockKey]]] = []  # (thread ident, keys)

    def add(self, keys: Iterable[BlockKey]) -> tuple[int, frozenset[BlockKey]]:
        """Pin `keys` for one holder in this thread; pass what this returns to `discard` when it ends."""
        pinned = (threading.get_ident(), frozenset(keys))
        self._holders.append(pinned)
        return pinned

    def discard(self, pinned: tuple[int, frozenset[BlockKey]]) -> None:
        self._holders.remove(pinned)

    def holders(self, keys: Iterable[BlockKey]) -> set[int]:
        """Threads whose pins hold any of `keys`."""
        if not self._holders:
            return set()
        keys = list(keys)
        return {thread for thread, held in self._holders if not held.isdisjoint(keys)}

    def __contains__(self, key: BlockKey) -> bool:
        return any(key in held for _, held in self._holders)

    def __bool__(self) -> bool:
        return bool(self._holders)


class Placement:
    """The tiers, top first, with each tier's codec (None for the device) and eviction policies
    (tiered.rooms: one per room of the tier).

    `persistent`: the bottom tier keeps what it holds across processes (the disk tier). Blocks
    written through to it (`write_through`) are held twice: in the tier `where` names and in
    `persisted`, so demoting them there costs nothing and promoting them leaves the copy behind.
    """

    def __init__(
        self,
        tiers: list[Tier],
        codecs: list[Codec | None],
        policies: list[RoomPolicies],
        device: torch.device,
        block_tokens: int,
        persistent: bool = False,
    ) -> None:
        self.tiers, self.codecs, self.policies = tiers, codecs, policies
        self.device, self.block_tokens = device, block_tokens
        self.stats: list[dict[BlockKey, BlockStats]] = [{} for _ in tiers]  # per tier: what policies see
        self.where: dict[BlockKey, int] = {}  # key -> index of its tier (the highest that holds it)
        self.counters = [TierCounters() for _ in tiers]
        self.step = 0  # the logical clock: one tick per operation
        # Write-through: the persistent bottom tier also holds a copy of these keys, which live above it.
        self.persistent = len(tiers) - 1 if persistent else None
        self.persisted: set[BlockKey] = set()
        self.refs: Counter[BlockKey] = Counter()  # readers (sessions) of each block; see TieredStore.retain
        self.pinned = Pins()  # blocks of sessions computing now: the last to leave (TieredStore.pinning)
        self.reading = Pins()  # blocks under read now: they do not move
        self.link_bytes: Counter[str] = Counter()  # bytes moved per tier link, e.g. "host->device"
        # prefetch precision: blocks a prefetch moved up, until read (used) or moved out unread (wasted)
        self.moved_unread: set[BlockKey] = set()
        self.prefetch_used = 0
        self.prefetch_wasted = 0
        # what tiered.gather's reads worked out about a layer's blocks, by the layer's last key
        # (read_parts' parts) or ("slots", last key) (read_pages' slot table); valid until a block
        # is tracked or untracked anywhere (then every plan is dropped)
        self.read_plans: dict[Hashable, object] = {}

    def track_kept(self) -> None:
        """Track the blocks the lower tiers hold already: what a persistent tier kept from an earlier run."""
        for t in range(1, len(self.tiers)):
            for key in self.tiers[t].keys():
                held = self.tiers[t].held(key)
                if held is not None:
                    self.track(key, t, held[0], tokens=held[1])

    @property
    def device_tier(self) -> DeviceTier:
        return self.tiers[DEVICE]

    @property
    def layout(self) -> BlockLayout | None:
        return self.device_tier.layout

    def put(self, key: BlockKey, block: KVBlock) -> None:
        """Store `block` in the device tier, replacing any earlier block of `key`."""
        step = self.tick()
        if self.where.get(key) == DEVICE:
            self.remove(key)
        else:
            self.make_room(DEVICE, self.device_tier.slot_bytes, key, leaving=key)
            if key in self.where:  # an older version in a lower tier, unless room-making dropped it
                self.remove(key)
        self.device_tier.put(key, block)
        self.track(key, DEVICE, self.device_tier.slot_bytes, step, tokens=block.tokens)
        self.counters[DEVICE].bytes_in += block.nbytes

    def put_many(self, items: list[tuple[BlockKey, KVBlock]]) -> None:
        """put() each (key, block) in order, with device room made for all of them first: their
        victims leave together, one encode_many into the tier below (see demote_many)."""
        if len(items) > 1:  # one put makes its own room
            self.make_device_room([key for key, _ in items])
        for key, block in items:
            self.put(key, block)

    def make_device_room(self, keys: list[BlockKey]) -> None:
        """Demote, in one batch, the victims that slots for the `keys` not on the device need. Older
        versions of `keys` in lower tiers go first (they are being replaced, and must not be chosen
        to make room below). Takes what the policies offer and no more: a put that still finds no
        room makes it one block at a time."""
        device = self.device_tier
        arriving: dict[int, list[BlockKey]] = {}  # room -> its keys that need a slot
        for key in dict.fromkeys(keys):
            t = self.where.get(key)
            if t == DEVICE:
                continue
            if t is not None:
                self.remove(key)
            arriving.setdefault(device.room_of(key), []).append(key)
        protected, victims = set(keys), []
        for room, room_keys in arriving.items():
            short = len(room_keys) - device.free_bytes_for(room_keys[0]) // device.slot_bytes
            if short > 0:
                victims += islice(self._candidates(DEVICE, room, protected), short)
        self.demote_many(victims, DEVICE)

    def layout_for(self, blocks: list[KVBlock]) -> BlockLayout | None:
        """The store's layout, or the one `blocks` set; raise if any block does not fit it."""
        layout = self.layout
        if layout is None and blocks:
            first = blocks[0]
            layout = BlockLayout(first.kv_heads, self.block_tokens, first.head_dim, first.dtype)
            self.check_fits_tiers(layout)
        for block in blocks:
            layout.check(block)
        return layout

    def allocate(self, layout: BlockLayout) -> None:
        """Size every tier for blocks of `layout` (once: the layout never changes)."""
        for t, tier in enumerate(self.tiers):
            tier.allocate(layout, self.item_bytes(t, layout))

    def item_bytes(self, t: int, layout: BlockLayout) -> int:
        """Bytes of a full block of `layout` as tier t stores it: its codec's payload (the block
        itself on the device)."""
        codec = self.codecs[t]
        if codec is None:
            return layout.block_nbytes
        return codec.encoded_nbytes(layout.kv_heads, layout.block_tokens, layout.head_dim, layout.dtype)

    def check_fits_tiers(self, layout: BlockLayout) -> None:
        """ValueError unless a full block of `layout` fits every tier."""
        self.device_tier.slots_for(layout)
        for t in range(1, len(self.tiers)):
            nbytes, tier = self.item_bytes(t, layout), self.tiers[t]
            if nbytes > tier.capacity_bytes:
                raise ValueError(
                    f"a block of {nbytes} bytes ({self.codecs[t].spec}) is larger than the "
                    f"{tier.name} tier's capacity of {tier.capacity_bytes} bytes"
                )

    def tick(self) -> int:
        self.step += 1
        return self.step

    def touch(self, key: BlockKey, t: int, step: int, hit: bool = True) -> None:
        """Record a read of `key` (in tier t) at `step`; `hit` counts it in the block's hits."""
        stats = self.stats[t][key]
        stats.hits += hit
        stats.last_access_step = step
        self.policies[t].on_update(key, stats)

    def touch_all(self, keys: Iterable[BlockKey], t: int, step: int) -> None:
        """touch(key, t, step) for each of `keys`, all in tier t: a read of many blocks."""
        tier_stats, on_update = self.stats[t], self.policies[t].on_update
        for key in keys:
            stats = tier_stats[key]
            stats.hits += 1
            stats.last_access_step = step
            on_update(key, stats)

    def set_score(self, key: BlockKey, t: int, score: float) -> None:
        """Set the importance score tier t's eviction policy sees for `key`."""
        stats = self.stats[t][key]
        stats.score = score
        self.policies[t].on_update(key, stats)

    def write_tokens(self, key: BlockKey, offset: int, block: KVBlock, step: int) -> None:
        """Write `block`'s tokens at `offset` of `key`'s block on the device (bounds checked by the
        caller), which then holds max(its tokens, offset + block.tokens); a write at `step`."""
        self.device_tier.write_tokens(key, offset, block.keys, block.values)
        stats = self.stats[DEVICE][key]
        stats.tokens = max(stats.tokens, offset + block.tokens)
        self.touch(key, DEVICE, step, hit=False)
        self.counters[DEVICE].bytes_in += block.nbytes

    def move_refs(self, old: BlockKey, new: BlockKey) -> None:
        """The sessions reading `old` read `new` now (a sealed block's references follow it)."""
        refs = self.refs.pop(old, 0)
        if refs:
            self.refs[new] += refs

    def note_prefetched(self, key: BlockKey, t: int) -> None:
        """Count `key`, just promoted from tier t by a prefetch, until it is read or leaves unread."""
        self.counters[t].prefetched += 1
        self.moved_unread.add(key)
        self.touch(key, DEVICE, self.tick(), hit=False)

    def note_read(self, keys: Iterable[BlockKey]) -> None:
        """Count reads of prefetched blocks (for prefetch precision); `keys` are on the device."""
        for key in keys:
            if key in self.moved_unread:
                self.moved_unread.discard(key)
                self.prefetch_used += 1

    def promote(
        self,
        key: BlockKey,
        t: int,
        protected: Collection[BlockKey] = (),
        item: Encoded | None = None,
    ) -> int:
        """Move `key` from tier t to the device tier; the bytes read out of tier t, or 0 if the tier
        could not return it intact. `protected` blocks are not evicted to make room: NoRoom
        instead. RuntimeError for a block under read. `item`: the
        block as tier t returned it already (read by the caller outside the store's lock)."""
        if key in self.reading:
            raise RuntimeError(f"{key} is being read: it cannot move now")
        tier = self.tiers[t]
        item = tier.get(key) if item is None else item
        if item is None:  # the tier found the record damaged and dropped it
            self.forget([key], t)
            return 0
        if self.layout is None:  # a store reopened over a persistent tier: the first block sets it
            self.allocate(self.layout_for([self.codecs[t].decode(item, self.device)]))
        stats = self.stats[t][key]
        slot_bytes = self.device_tier.slot_bytes
        self.make_room(DEVICE, slot_bytes, key, leaving=key, protected=protected)
        slot = self.device_tier.reserve(key, item.shape[1])
        try:  # decoded straight into the slot; tier t's copy stays until this succeeded
            self.codecs[t].decode_into(item, slot.keys, slot.values)
        except BaseException:
            self.device_tier.remove(key)
            raise
        if key in self.where:  # still below, unless room-making dropped it from a self-evicting tier
            if t == self.persistent and is_content_key(key):  # immutable: the copy stays valid
                self.untrack(key)
                self.persisted.add(key)
            else:
                self.remove(key)
        self.counters[t].promotions += 1
        self.counters[t].bytes_out += item.nbytes
        self.counters[DEVICE].bytes_in += slot.nbytes
        self.link_bytes[f"{tier.name}->{self.device_tier.name}"] += item.nbytes
        self.track(key, DEVICE, self.device_tier.slot_bytes, stats=stats)
        return item.nbytes

    def make_room(
        self,
        t: int,
        nbytes: int,
        for_key: BlockKey,
        leaving: BlockKey | None = None,
        protected: Collection[BlockKey] = (),
    ) -> None:
        """Demote victims from tier t until `nbytes` fit in the room `for_key` goes to.

        `leaving` is about to leave its tier (it counts as free space there and is never chosen);
        `protected` keys and blocks under read are never chosen. NoRoom when no victim is left.
        """
        tier = self.tiers[t]
        if tier.evicts_itself:
            return
        room = tier.room_of(for_key)
        credit = 0
        if leaving in self.stats[t] and tier.room_of(leaving) == room:
            credit = self.stats[t][leaving].nbytes
        while tier.free_bytes_for(for_key) + credit < nbytes:
            victim = self._victim(t, room, leaving, protected)
            if victim is None:
                raise NoRoom(f"the {tier.name} tier cannot make room for {nbytes} bytes")
            self.demote(victim, t, leaving)

    def _victim(
        self, t: int, room: int, leaving: BlockKey | None, protected: Collection[BlockKey]
    ) -> BlockKey | None:
        """The policy's first candidate in `room`. Out of the bottom tier (out of the store), among
        the next VICTIM_SCAN: the first that no session reads, else the first that no session is
        computing with (pinned), else the policy's first."""
        candidates = self._candidates(t, room, protected, leaving)
        if t < len(self.tiers) - 1:
            return next(candidates, None)
        fallback: list[BlockKey | None] = [None, None]  # first referenced, first pinned
        for key in islice(candidates, VICTIM_SCAN):
            if not self.refs[key]:
                return key
            rank = 1 if key in self.pinned else 0  # a session computing with it: the last to leave
            fallback[rank] = key if fallback[rank] is None else fallback[rank]
        return fallback[0] if fallback[0] is not None else fallback[1]

    def _candidates(
        self, t: int, room: int, protected: Collection[BlockKey], leaving: BlockKey | None = None
    ) -> Iterator[BlockKey]:
        """Tier t's eviction candidates in `room`, in the policy's order, without `leaving`,
        `protected` keys and blocks under read. Draw from it before demoting any (a demotion
        changes what the policy offers)."""
        reading = self.reading
        for key in self.policies[t].candidates(room):
            if key != leaving and key not in protected and key not in reading:
                yield key

    def demote_many(self, keys: list[BlockKey], t: int) -> None:
        """demote() each of `keys` from tier t, encoding together the blocks that need encoding."""
        below = t + 1
        encoded: dict[BlockKey, Encoded] = {}
        if below < len(self.tiers):
            batch = [key for key in keys if not (below == self.persistent and key in self.persisted)]
            items = [self.tiers[t].get(key) for key in batch]
            if len(batch) > 1 and all(isinstance(item, KVBlock) for item in items):
                codec, landing = self.codecs[below], self.landing_buffers(below, items)
                landed = codec.encode_many_into(items[: len(landing)], landing) if landing else []
                encoded = dict(zip(batch, landed + codec.encode_many(items[len(landing) :])))
        for key in keys:
            self.demote(key, t, encoded=encoded.get(key))

    def demote(
        self, key: BlockKey, t: int, leaving: BlockKey | None = None, encoded: Encoded | None = None
    ) -> None:
        """Move `key` from tier t one tier down, or out of the store from the bottom tier.
        `encoded`: its block in the lower tier's codec already (demote_many's batch).

        If the lower tier fails, the block stays where it was and the error propagates.
        """
        source = self.tiers[t]
        if t == len(self.tiers) - 1:
            self.remove(key)
            self.counters[t].dropped += 1
            return
        held = None
        if t + 1 == self.persistent and key in self.persisted:  # written through: the copy below may serve
            held = self.tiers[t + 1].held(key)
            self.persisted.discard(key)
        if held is not None:  # it does: this copy just goes
            stats = self.untrack(key)
            source.remove(key)
            self.track(key, t + 1, held[0], stats=stats)
            self.counters[t].evictions += 1
            return
        item = source.get(key)
        target = self.tiers[t + 1]
        encoded = self.encode_for(t + 1, item, t) if encoded is None else encoded
        nbytes = target.charge(encoded)
        self.make_room(t + 1, nbytes, key, leaving)
        dropped = target.put(key, encoded)
        stats = self.untrack(key)
        source.remove(key)
        self.track(key, t + 1, nbytes, stats=stats)
        self.counters[t].evictions += 1
        self.counters[t].bytes_out += item.nbytes
        self.counters[t + 1].bytes_in += encoded.nbytes
        self.link_bytes[f"{source.name}->{target.name}"] += encoded.nbytes
        self.forget(dropped, t + 1, leaving)

    def encode_for(self, t: int, item: KVBlock | Encoded, source: int) -> Encoded:
        """`item`, held by tier `source`, in the codec of tier t (straight into its memory if it can)."""
        codec = self.codecs[t]
        if isinstance(item, KVBlock):
            landing = self.landing_buffers(t, [item])
            return codec.encode_into(item, landing[0]) if landing else codec.encode(item)
        if item.codec == codec.spec:
            return item
        return codec.encode(self.codecs[source].decode(item, "cpu"))

    def landing_buffers(self, t: int, blocks: list[KVBlock]) -> list[torch.Tensor]:
        """Tier t's buffers for the payloads of `blocks`, in order, when the blocks are on the CPU
        (a CUDA block is encoded where it is); fewer or none when the tier has not that many."""
        if not blocks or any(block.device.type != "cpu" for block in blocks):
            return []
        codec = self.codecs[t]
        sizes = [codec.encoded_nbytes(b.kv_heads, b.tokens, b.head_dim, b.dtype) for b in blocks]
        return self.tiers[t].landing_buffers(sizes)

    def track(
        self,
        key: BlockKey,
        t: int,
        nbytes: int,
        step: int | None = None,
        stats: BlockStats | None = None,
        tokens: int = 0,
    ) -> BlockStats:
        """Record that `key` now lives in tier t (the tier already holds it); new stats unless given."""
        step = self.step if step is None else step
        if stats is None:
            stats = BlockStats(
                nbytes=nbytes, tier="", inserted_step=step, tier_step=step, last_access_step=step, tokens=tokens
            )
        stats.nbytes = nbytes
        stats.tier = self.tiers[t].name
        stats.tier_step = step
        self.stats[t][key] = stats
        self.policies[t].on_insert(key, stats)
        self.where[key] = t
        self.read_plans.clear()
        return stats

    def remove(self, key: BlockKey) -> None:
        """Remove `key` from its tier (and its written-through copy) and forget it. RuntimeError for a
        block under read (its views would change under the reader)."""
        if key in self.reading:
            raise RuntimeError(f"{key} is being read: it cannot be removed now")
        t = self.where[key]
        self.untrack(key)
        self.tiers[t].remove(key)
        if key in self.persisted:
            self.persisted.discard(key)
            self.tiers[self.persistent].remove(key)

    def untrack(self, key: BlockKey) -> BlockStats:
        """Forget where `key` lives (its tier still holds it); its statistics."""
        t = self.where.pop(key)
        self.read_plans.clear()
        self.policies[t].on_remove(key)
        if t == DEVICE and key in self.moved_unread:  # prefetched, and leaves the device unread
            self.moved_unread.discard(key)
            self.prefetch_wasted += 1
        return self.stats[t].pop(key)

    def rename(self, old: BlockKey, new: BlockKey) -> None:
        """Relabel the block of `old` as `new` (absent) where it lies, statistics and all."""
        t = self.where[old]
        dropped = self.tiers[t].rename(old, new)
        unread = old in self.moved_unread
        self.moved_unread.discard(old)
        stats = self.untrack(old)
        if unread:
            self.moved_unread.add(new)
        self.stats[t][new] = stats
        self.policies[t].on_insert(new, stats)
        self.where[new] = t
        self.forget(dropped, t)

    def write_through(self, key: BlockKey) -> int:
        """Copy `key`'s block into the persistent tier, where it stays; bytes written (0: nothing to do)."""
        t = self.where.get(key)
        if self.persistent is None or t is None or t == self.persistent or key in self.persisted:
            return 0
        encoded = self.encode_for(self.persistent, self.tiers[t].get(key), t)
        dropped = self.tiers[self.persistent].put(key, encoded)
        self.persisted.add(key)
        self.forget(dropped, self.persistent)
        self.counters[self.persistent].bytes_in += encoded.nbytes
        self.link_bytes[f"{self.tiers[t].name}->{self.tiers[self.persistent].name}"] += encoded.nbytes
        return encoded.nbytes

    def forget(self, keys: Iterable[BlockKey], t: int, leaving: BlockKey | None = None) -> None:
        """Keys tier t already dropped on its own: they leave the store. `leaving` is on its way up
        (its block already read out of tier t) or being replaced, so it is not counted as dropped."""
        for key in keys:
            if self.where.get(key) == t:
                self.untrack(key)
                if key != leaving:
                    self.counters[t].dropped += 1
            elif t == self.persistent:  # a written-through copy: the block still lives above
                self.persisted.discard(key)
