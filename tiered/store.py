"""TieredStore: blocks in a hierarchy of tiers, moved down when a tier is full and up when read.

A block lives in exactly one tier. `put` lands in the device tier; when a tier has no room its
eviction policy names victims, which move one tier down through that tier's codec (and leave
the store from the bottom tier); `get` promotes to the device tier; `prefetch` promotes in the
background. One lock serializes every operation, so the store is safe to share between threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from policies import BlockStats, EvictionPolicy, make_eviction

from .block import BlockKey, BlockLayout, KVBlock
from .codecs import Codec, Encoded, make_codec
from .config import StoreConfig
from .counters import StoreCounters, TierCounters
from .device import DeviceTier
from .disk import DiskTier
from .host import HostTier
from .tier import Tier

DEVICE = 0  # index of the top tier


class TieredStore:
    """A KV block store over device, host and (optionally) disk tiers. See StoreConfig."""

    def __init__(self, config: StoreConfig) -> None:
        if not isinstance(config, StoreConfig):
            raise TypeError(f"TieredStore expects a StoreConfig, got {type(config).__name__}")
        self.config = config
        self.device = config.torch_device
        # Construct everything that can fail before anything holds resources.
        codecs: list[Codec | None] = [None, make_codec(config.host_codec)]
        policies = [make_eviction(config.eviction, **config.eviction_kwargs) for _ in range(3)]
        tiers: list[Tier] = [
            DeviceTier(self.device, config.device_bytes, rooms=config.layers or 1),
            HostTier(config.host_bytes, pin=self.device.type == "cuda"),
        ]
        if config.disk_dir is not None:
            codecs.append(make_codec(config.disk_codec))
            tiers.append(self._open_disk(config, codecs[-1]))
        self._tiers = tiers
        self._codecs = codecs
        self._policies: list[EvictionPolicy] = policies[: len(tiers)]
        self._stats: list[dict[BlockKey, BlockStats]] = [{} for _ in tiers]
        self._where: dict[BlockKey, int] = {}
        self._tier_counters = [TierCounters() for _ in tiers]
        self._counters = StoreCounters()
        self._step = 0
        self._lock = threading.RLock()
        self._closed = False
        self._executor = ThreadPoolExecutor(config.prefetch_threads, thread_name_prefix="tiered-prefetch")
        for t in range(1, len(tiers)):
            for key in tiers[t].keys():  # blocks a persistent tier kept from an earlier run
                held = tiers[t].held(key)
                if held is not None:
                    self._track(key, t, held[0], tokens=held[1])

    @staticmethod
    def _open_disk(config: StoreConfig, codec: Codec) -> Tier:
        return DiskTier(
            config.disk_dir,
            config.disk_bytes,
            codec=codec.spec,
            block_tokens=config.block_tokens,
            fingerprint=config.fingerprint,
            durability=config.disk_durability,
            zstd_level=config.disk_zstd_level,
            zstd_threads=config.disk_zstd_threads,
            segment_bytes=config.disk_segment_bytes,
            compact_live_fraction=config.disk_compact_live_fraction,
        )

    # -- public API ---------------------------------------------------------------------------

    @property
    def layout(self) -> BlockLayout | None:
        """The shape every block shares, fixed by the first put; None before it."""
        return self._device_tier.layout

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self._tiers]

    def put(self, key: BlockKey, block: KVBlock) -> None:
        """Store `block` under `key` in the device tier, replacing any earlier block of that key."""
        self.put_many([(key, block)])

    def put_many(self, items: Iterable[tuple[BlockKey, KVBlock]]) -> None:
        """put() each (key, block) in order, holding the lock once. Validated before any is stored."""
        items = list(items)
        for key, block in items:
            self._check_layer(key)
            if not isinstance(block, KVBlock):
                raise TypeError(f"expected a KVBlock, got {type(block).__name__}")
        with self._lock:
            self._check_open()
            layout = self._layout_for([block for _, block in items])
            if self.layout is None and layout is not None:
                self._allocate(layout)
            for key, block in items:
                self._put_locked(key, block)

    def get(self, key: BlockKey) -> KVBlock | None:
        """The block stored under `key`, on the store's device, or None. Promotes it to the device tier.

        The returned tensors belong to the caller: later store operations do not change them.
        """
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[BlockKey]) -> list[KVBlock | None]:
        """get() each key in order, holding the lock once."""
        keys = list(keys)
        for key in keys:
            _check_key(key)
        with self._lock:
            self._check_open()
            return [self._get_locked(key) for key in keys]

    def peek(self, key: BlockKey) -> KVBlock | None:
        """A copy of the block on the CPU without moving it or counting a read; None if absent."""
        _check_key(key)
        with self._lock:
            self._check_open()
            t = self._where.get(key)
            if t is None:
                return None
            item = self._tiers[t].get(key)
            if item is None:
                return None
            block = item if t == DEVICE else self._codecs[t].decode(item, "cpu")
            return KVBlock.trusted(block.keys.to("cpu", copy=True), block.values.to("cpu", copy=True))

    def write_tokens(self, key: BlockKey, offset: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write tokens into the block stored under `key`, in place on the device tier.

        keys, values: [kv_heads, n, head_dim] in the store's dtype. The block is promoted first if it
        is below the device; an absent block is created when `offset` is 0. `offset` may not leave a
        hole (it is at most the block's tokens) and offset + n may not pass block_tokens.
        """
        self._check_layer(key)
        block = KVBlock(keys, values)  # validates shapes and dtypes
        with self._lock:
            self._check_open()
            t = self._where.get(key)
            if t is None:
                if offset != 0:
                    raise ValueError(f"{key} is not stored; a new block starts at offset 0, not {offset}")
                self.put(key, block)
                return
            layout = self.layout
            layout.check(block)
            stored = self._stats[t][key].tokens
            if not 0 <= offset <= stored or offset + block.tokens > layout.block_tokens:
                raise ValueError(
                    f"cannot write {block.tokens} tokens at offset {offset} of {key}: it holds {stored} "
                    f"tokens and at most block_tokens={layout.block_tokens}"
                )
            step = self._tick()
            if t != DEVICE and not self._promote(key, t):
                raise KeyError(f"{key} could not be read back from the {self._tiers[t].name} tier")
            self._device_tier.write_tokens(key, offset, block.keys, block.values)
            stats = self._stats[DEVICE][key]
            stats.tokens = max(stored, offset + block.tokens)
            stats.last_access_step = step
            self._policies[DEVICE].on_update(key, stats)
            self._tier_counters[DEVICE].bytes_in += block.nbytes

    @contextmanager
    def reading(
        self, keys: Sequence[BlockKey], touch: bool = False, limit_tokens: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of `keys` joined along tokens, in order: two [kv_heads, tokens, head_dim]
        tensors on the store's device, valid inside the `with` block (the store's lock is held).

        Blocks in consecutive device slots (all full but the last) are read as views of the device
        pool, without a copy; otherwise the blocks are gathered into new tensors, and blocks below
        the device are decoded without being moved. Only the last block may be partial. A key that
        is not stored raises KeyError. Reads count as hits; with `touch` they also count as accesses
        for the eviction policy. `limit_tokens` cuts the result to that many tokens.
        """
        keys = list(keys)
        for key in keys:
            _check_key(key)
        with self._lock:
            self._check_open()
            keys_read, values_read = self._read_locked(keys, touch)
            if limit_tokens is not None:
                keys_read, values_read = keys_read[:, :limit_tokens], values_read[:, :limit_tokens]
            yield keys_read, values_read

    def set_score(self, key: BlockKey, score: float) -> None:
        """Set the importance score the eviction policy sees for `key` (ignored if absent)."""
        _check_key(key)
        with self._lock:
            t = self._where.get(key)
            if t is not None:
                stats = self._stats[t][key]
                stats.score = float(score)
                self._policies[t].on_update(key, stats)

    def where(self, key: BlockKey) -> str | None:
        """Name of the tier holding `key` ("device", "host", "disk"), or None."""
        _check_key(key)
        with self._lock:
            t = self._where.get(key)
            return None if t is None else self._tiers[t].name

    def remove(self, key: BlockKey) -> bool:
        """Forget `key` in whichever tier holds it; True if it was stored."""
        _check_key(key)
        with self._lock:
            self._check_open()
            if key not in self._where:
                return False
            self._discard(key)
            self._counters.removes += 1
            return True

    def prefetch(self, keys: Iterable[BlockKey]) -> Future:
        """Start moving `keys` up to the device tier in the background.

        The future resolves to the number of blocks moved. Keys not stored, or already on the
        device, are skipped; at most as many blocks as the device tier holds are moved.
        """
        keys = list(keys)
        for key in keys:
            _check_key(key)
        with self._lock:
            self._check_open()
            self._counters.prefetch_requests += len(keys)
            return self._executor.submit(self._prefetch, keys)

    def stats(self) -> dict:
        """Counters of everything the store did, plus per-tier blocks and used/capacity bytes."""
        with self._lock:
            out = self._counters.as_dict()
            out["step"] = self._step
            out["tiers"] = {}
            for t, tier in enumerate(self._tiers):
                entry = self._tier_counters[t].as_dict()
                entry.update(blocks=len(self._stats[t]), used_bytes=tier.used_bytes, capacity_bytes=tier.capacity_bytes)
                out["tiers"][tier.name] = entry
            return out

    def block_stats(self, key: BlockKey) -> BlockStats | None:
        """The statistics policies see for `key` (a live object: read it under no assumptions)."""
        _check_key(key)
        with self._lock:
            t = self._where.get(key)
            return None if t is None else self._stats[t][key]

    def keys(self) -> list[BlockKey]:
        with self._lock:
            return list(self._where)

    def __contains__(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._where

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)

    def close(self) -> None:
        """Finish or cancel background work and release every tier. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for tier in self._tiers:
                tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals (lock held) ----------------------------------------------------------------

    @property
    def _device_tier(self) -> DeviceTier:
        return self._tiers[DEVICE]

    def _check_layer(self, key: BlockKey) -> None:
        _check_key(key)
        if self.config.layers is not None and key.layer >= self.config.layers:
            raise ValueError(f"{key} has layer {key.layer}; this store has layers={self.config.layers}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    def _layout_for(self, blocks: list[KVBlock]) -> BlockLayout | None:
        """The store's layout, or the one `blocks` set; raise if any block does not fit it."""
        layout = self.layout
        if layout is None and blocks:
            first = blocks[0]
            layout = BlockLayout(first.kv_heads, self.config.block_tokens, first.head_dim, first.dtype)
            self._check_fits_tiers(layout)
        for block in blocks:
            layout.check(block)
        return layout

    def _allocate(self, layout: BlockLayout) -> None:
        self._device_tier.allocate(layout)
        shape = (layout.kv_heads, layout.block_tokens, layout.head_dim)
        self._tiers[1].allocate(self._codecs[1].encoded_nbytes(*shape, layout.dtype))

    def _check_fits_tiers(self, layout: BlockLayout) -> None:
        self._device_tier.slots_for(layout)
        shape = (layout.kv_heads, layout.block_tokens, layout.head_dim)
        for t in range(1, len(self._tiers)):
            nbytes = self._codecs[t].encoded_nbytes(*shape, layout.dtype)
            if nbytes > self._tiers[t].capacity_bytes:
                raise ValueError(
                    f"a block of {nbytes} bytes ({self._codecs[t].spec}) is larger than the "
                    f"{self._tiers[t].name} tier's capacity of {self._tiers[t].capacity_bytes} bytes"
                )

    def _read_locked(self, keys: list[BlockKey], touch: bool) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._device_tier
        layout = self.layout
        if not keys or layout is None:
            missing = keys[0] if keys else None
            if missing is not None:
                raise KeyError(f"{missing} is not stored")
            raise ValueError("reading() needs at least one key")
        tiers, slots, tokens = [], [], []
        for key in keys:
            t = self._where.get(key)
            if t is None:
                raise KeyError(f"{key} is not stored")
            tiers.append(t)
            stats = self._stats[t][key]
            tokens.append(stats.tokens)
            slots.append(device.slot_of(key)[0] if t == DEVICE else -1)
        for t in tiers:
            self._tier_counters[t].hits += 1
        if touch:
            step = self._tick()
            for key, t in zip(keys, tiers):
                self._touch(key, t, step)
        full = layout.block_tokens
        if any(n != full for n in tokens[:-1]):
            raise ValueError("only the last block read may be partial")
        total = full * (len(keys) - 1) + tokens[-1]
        first = slots[0]
        if first >= 0 and slots == list(range(first, first + len(slots))):  # one run of device slots
            # views: [kv_heads, blocks * block_tokens, head_dim], cut to the tokens stored
            heads, dim = layout.kv_heads, layout.head_dim
            keys_view = device.keys_pool[:, first : first + len(slots)].reshape(heads, -1, dim)[:, :total]
            values_view = device.values_pool[:, first : first + len(slots)].reshape(heads, -1, dim)[:, :total]
            return keys_view, values_view
        return self._gather(keys, tiers, slots, total)

    def _gather(
        self, keys: list[BlockKey], tiers: list[int], slots: list[int], total: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout, device = self.layout, self._device_tier
        shape = (layout.kv_heads, len(keys), layout.block_tokens, layout.head_dim)
        # gathered: [kv_heads, blocks, block_tokens, head_dim]
        out_keys = torch.empty(shape, dtype=layout.dtype, device=self.device)
        out_values = torch.empty(shape, dtype=layout.dtype, device=self.device)
        on_device = [i for i, t in enumerate(tiers) if t == DEVICE]
        if on_device:
            positions = torch.tensor(on_device, device=self.device)
            chosen = torch.tensor([slots[i] for i in on_device], device=self.device)
            out_keys.index_copy_(1, positions, device.keys_pool.index_select(1, chosen))
            out_values.index_copy_(1, positions, device.values_pool.index_select(1, chosen))
        for i, (key, t) in enumerate(zip(keys, tiers)):
            if t != DEVICE:
                item = self._tiers[t].get(key)
                if item is None:
                    self._forget([key], t)
                    raise KeyError(f"{key} could not be read back from the {self._tiers[t].name} tier")
                block = self._codecs[t].decode(item, self.device)
                out_keys[:, i, : block.tokens].copy_(block.keys)
                out_values[:, i, : block.tokens].copy_(block.values)
        heads, dim = layout.kv_heads, layout.head_dim
        return out_keys.view(heads, -1, dim)[:, :total], out_values.view(heads, -1, dim)[:, :total]

    def _tick(self) -> int:
        self._step += 1
        return self._step

    def _put_locked(self, key: BlockKey, block: KVBlock) -> None:
        step = self._tick()
        old = self._where.get(key)
        if old == DEVICE:
            self._discard(key)
        else:
            self._make_room(DEVICE, self._device_tier.slot_bytes, key, leaving=key)
            if key in self._where:  # an older version in a lower tier, unless room-making dropped it
                self._discard(key)
        self._device_tier.put(key, block)
        self._track(key, DEVICE, self._device_tier.slot_bytes, step, tokens=block.tokens)
        self._counters.puts += 1
        self._tier_counters[DEVICE].bytes_in += block.nbytes

    def _get_locked(self, key: BlockKey) -> KVBlock | None:
        step = self._tick()
        self._counters.gets += 1
        t = self._where.get(key)
        for above in range(DEVICE, len(self._tiers) if t is None else t):
            self._tier_counters[above].misses += 1
        if t is None:
            self._counters.misses += 1
            return None
        if t != DEVICE:
            start_s = time.perf_counter()
            promoted = self._promote(key, t)
            self._tier_counters[t].wait_s += time.perf_counter() - start_s
            if not promoted:  # the lower tier could not return it intact: a miss, never wrong data
                self._counters.misses += 1
                self._tier_counters[t].misses += 1
                return None
        self._touch(key, DEVICE, step)
        self._counters.hits += 1
        self._tier_counters[t].hits += 1
        return self._device_tier.get(key).clone()

    def _touch(self, key: BlockKey, t: int, step: int, hit: bool = True) -> None:
        stats = self._stats[t][key]
        stats.hits += hit
        stats.last_access_step = step
        self._policies[t].on_update(key, stats)

    def _prefetch(self, keys: list[BlockKey]) -> int:
        """Promote `keys` in order; the batch's blocks on the device are not evicted by the batch."""
        moved = 0
        batch: set[BlockKey] = set()
        per_room: Counter[int] = Counter()  # batch blocks on the device, per room
        device = self._device_tier
        for key in keys:
            with self._lock:
                if self._closed:
                    break
                t = self._where.get(key)
                room = device.room_of(key)
                if t is None or key in batch or (self.layout is not None and per_room[room] >= device.room_slots):
                    continue
                if t != DEVICE:
                    if not self._promote(key, t, protected=batch):
                        continue
                    self._tier_counters[t].prefetched += 1
                    moved += 1
                self._touch(key, DEVICE, self._tick(), hit=False)
                batch.add(key)
                per_room[room] += 1
        return moved

    def _promote(self, key: BlockKey, t: int, protected: Collection[BlockKey] = ()) -> bool:
        """Move `key` from tier t to the device tier; False if the tier could not return it intact."""
        tier = self._tiers[t]
        item = tier.get(key)
        if item is None:  # the tier found the record damaged and dropped it
            self._forget([key], t)
            return False
        block = self._codecs[t].decode(item, self.device)  # may view tier t's memory until discarded
        if self.layout is None:  # a store reopened over a persistent tier: the first block sets it
            self._allocate(self._layout_for([block]))
        stats = self._stats[t][key]
        self._make_room(DEVICE, self._device_tier.slot_bytes, key, leaving=key, protected=protected)
        self._device_tier.put(key, block)
        if key in self._where:  # still below, unless room-making dropped it from a self-evicting tier
            self._discard(key)
        self._tier_counters[t].promotions += 1
        self._tier_counters[t].bytes_out += item.nbytes
        self._tier_counters[DEVICE].bytes_in += block.nbytes
        self._track(key, DEVICE, self._device_tier.slot_bytes, stats=stats)
        return True

    def _make_room(
        self,
        t: int,
        nbytes: int,
        for_key: BlockKey,
        leaving: BlockKey | None = None,
        protected: Collection[BlockKey] = (),
    ) -> None:
        """Demote victims from tier t until `nbytes` fit in the room `for_key` goes to.

        `leaving` is about to leave its tier (it counts as free space there and is never chosen);
        `protected` keys are never chosen.
        """
        tier = self._tiers[t]
        if tier.evicts_itself:
            return
        room = tier.room_of(for_key)
        credit = 0
        if leaving in self._stats[t] and tier.room_of(leaving) == room:
            credit = self._stats[t][leaving].nbytes
        while tier.free_bytes_for(for_key) + credit < nbytes:
            victim = next(
                (
                    k
                    for k in self._policies[t].candidates()
                    if k != leaving and k not in protected and tier.room_of(k) == room
                ),
                None,
            )
            if victim is None:
                raise RuntimeError(f"the {tier.name} tier cannot make room for {nbytes} bytes")
            self._demote(victim, t, leaving)

    def _demote(self, key: BlockKey, t: int, leaving: BlockKey | None = None) -> None:
        """Move `key` from tier t one tier down, or out of the store from the bottom tier.

        If the lower tier fails, the block stays where it was and the error propagates.
        """
        source = self._tiers[t]
        if t == len(self._tiers) - 1:
            self._discard(key)
            self._tier_counters[t].dropped += 1
            return
        item = source.get(key)
        target = self._tiers[t + 1]
        encoded = self._encode_for(t + 1, item, t)
        nbytes = target.charge(encoded)
        self._make_room(t + 1, nbytes, key, leaving)
        dropped = target.put(key, encoded)
        stats = self._stats[t].pop(key)
        self._policies[t].on_remove(key)
        source.remove(key)
        self._track(key, t + 1, nbytes, stats=stats)
        self._tier_counters[t].evictions += 1
        self._tier_counters[t].bytes_out += item.nbytes
        self._tier_counters[t + 1].bytes_in += encoded.nbytes
        self._forget(dropped, t + 1, leaving)

    def _encode_for(self, t: int, item: KVBlock | Encoded, source: int) -> Encoded:
        """`item`, held by tier `source`, in the codec of tier t (straight into its memory if it can)."""
        codec = self._codecs[t]
        if isinstance(item, KVBlock):
            landing = getattr(self._tiers[t], "landing_buffer", None)
            buffer = None
            if landing is not None and item.device.type == "cpu":
                buffer = landing(codec.encoded_nbytes(item.kv_heads, item.tokens, item.head_dim, item.dtype))
            return codec.encode(item) if buffer is None else codec.encode_into(item, buffer)
        if item.codec == codec.spec:
            return item
        return codec.encode(self._codecs[source].decode(item, "cpu"))

    def _track(
        self,
        key: BlockKey,
        t: int,
        nbytes: int,
        step: int | None = None,
        stats: BlockStats | None = None,
        tokens: int = 0,
    ) -> BlockStats:
        """Record that `key` now lives in tier t (the tier already holds it); new stats unless given."""
        step = self._step if step is None else step
        if stats is None:
            stats = BlockStats(
                nbytes=nbytes, tier="", inserted_step=step, tier_step=step, last_access_step=step, tokens=tokens
            )
        stats.nbytes = nbytes
        stats.tier = self._tiers[t].name
        stats.tier_step = step
        self._stats[t][key] = stats
        self._policies[t].on_insert(key, stats)
        self._where[key] = t
        return stats

    def _discard(self, key: BlockKey) -> None:
        t = self._where.pop(key)
        del self._stats[t][key]
        self._policies[t].on_remove(key)
        self._tiers[t].remove(key)

    def _forget(self, keys: Iterable[BlockKey], t: int, leaving: BlockKey | None = None) -> None:
        """Keys tier t already dropped on its own: they leave the store. `leaving` is on its way up
        (its block already read out of tier t) or being replaced, so it is not counted as dropped."""
        for key in keys:
            if self._where.get(key) == t:
                del self._where[key]
                del self._stats[t][key]
                self._policies[t].on_remove(key)
                if key != leaving:
                    self._tier_counters[t].dropped += 1


def _check_key(key: object) -> None:
    if not isinstance(key, BlockKey):
        raise TypeError(f"expected a BlockKey, got {type(key).__name__}")

