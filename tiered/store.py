"""TieredStore: blocks in a hierarchy of tiers, moved down when a tier is full and up when read.

A block lives in one tier. `put` lands in the device tier; when a tier has no room its
eviction policy names victims, which move one tier down through that tier's codec (and leave
the store from the bottom tier); `get` promotes to the device tier; `prefetch` hands moves up to
the prefetch scheduler (tiered.scheduler), whose mover runs them in the background, most urgent
first. One lock serializes every change of placement, so the store is safe to share between
threads; reads (`reading`, `reading_parts`) hold it only to find and pin their blocks, so moves of
other blocks go on while attention reads. A read of a block that is queued to move waits for it.

Sessions share full blocks by content (tiered.content): `seal` relabels a filled block with its
content key (or finds that key already stored and drops the copy), `retain`/`release` count the
sessions reading a block, and with a disk tier sealed blocks are written through to it in the
background (`disk_write="through"`), so they outlive the process as soon as `flush` returns.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from policies import BlockStats, make_eviction
from policies.write import make_write

from .block import BlockKey, BlockLayout, KVBlock
from .checked import checked
from .codecs import Codec, cpu_kernels, make_codec
from .config import StoreConfig
from .content import is_content_key
from .counters import StoreCounters
from .device import DeviceTier
from .disk import DiskTier
from .gather import DenseRun, EncodedRun, PageRows, page_rows, read_joined, read_pages, read_parts
from .host import HostTier
from .placement import DEVICE, NoRoom, Placement
from .rooms import RoomPolicies
from .scheduler import MOVED, SKIPPED, UP, Priority, Scheduler
from .shared import SharedTier
from .tier import Tier

WRITE_BATCH = 64  # write-throughs per hold of the store's lock


class TieredStore:
    """A KV block store over device, host and (optionally) disk tiers. See StoreConfig."""

    @checked
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.device = config.torch_device
        # Construct everything that can fail before anything holds resources.
        codecs: list[Codec | None] = [None]  # the device tier holds blocks as they are
        tiers: list[Tier] = [DeviceTier(self.device, config.device_bytes, rooms=config.layers or 1)]
        for spec, open_tier in self._lower_tiers(config):
            codecs.append(make_codec(spec))
            tiers.append(open_tier(codecs[-1]))
        policies = [  # one per room of each tier
            RoomPolicies(lambda: make_eviction(config.eviction, **config.eviction_kwargs), tier.rooms, tier.room_of)
            for tier in tiers
        ]
        # the simulator's write decisions and the store's are one: policies.write's, by name
        persistent = config.disk_dir is not None or config.shared_dir is not None
        write_through = persistent and make_write(f"write-{config.disk_write}").write_now(hits=0)
        self._place = Placement(tiers, codecs, policies, self.device, config.block_tokens, persistent=write_through)
        self._counters = StoreCounters()
        self._lock = threading.RLock()
        self._unread = threading.Condition(self._lock)  # notified when a read ends
        self._closed = False
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tiered-write-through")
        self._pending_writes: list[BlockKey] = []
        self._write_job: Future | None = None
        self._writing = False  # a write job is queued or running
        self._place.track_kept()
        self._scheduler = Scheduler(self._move_up)  # last: its mover thread starts here

    disk_tier_type: type[DiskTier] = DiskTier  # the disk tier's class (a test's subclass may slow or fail it)

    @classmethod
    def _lower_tiers(cls, config: StoreConfig) -> list[tuple[str, Callable[[Codec], Tier]]]:
        """The tiers below the device that `config` asks for, top first, each as (its codec's spec,
        how to open it with that codec): host always; disk with a disk_dir; the cluster-wide shared
        tier, below the local ones, with a shared_dir."""
        lower: list[tuple[str, Callable[[Codec], Tier]]] = [
            (config.host_codec, lambda codec: HostTier(config.host_bytes, pin=config.torch_device.type == "cuda"))
        ]
        if config.disk_dir is not None:
            lower.append((config.disk_codec, lambda codec: cls._open_disk(config, codec)))
        if config.shared_dir is not None:
            lower.append(
                (config.disk_codec, lambda codec: SharedTier(config.shared_dir, config.shared_bytes, codec=codec.spec))
            )
        return lower

    @classmethod
    def _open_disk(cls, config: StoreConfig, codec: Codec) -> Tier:
        return cls.disk_tier_type(
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
        return self._place.layout

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self._place.tiers]

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
            self._wait_unread([key for key, _ in items])
            layout = self._place.layout_for([block for _, block in items])
            if self.layout is None and layout is not None:
                self._place.allocate(layout)
            self._place.put_many(items)
            self._counters.puts += len(items)

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
        self._scheduler.wait_for(keys)
        with self._lock:
            self._check_open()
            return [self._get_locked(key) for key in keys]

    def peek(self, key: BlockKey) -> KVBlock | None:
        """A copy of the block on the CPU without moving it or counting a read; None if absent."""
        _check_key(key)
        with self._lock:
            self._check_open()
            t = self._place.where.get(key)
            if t is None:
                return None
            item = self._place.tiers[t].get(key)
            if item is None:
                return None
            block = item if t == DEVICE else self._place.codecs[t].decode(item, "cpu")
            return KVBlock.trusted(block.keys.to("cpu", copy=True), block.values.to("cpu", copy=True))

    def write_tokens(self, key: BlockKey, offset: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write tokens into the block stored under `key`, in place on the device tier.

        keys, values: [kv_heads, n, head_dim] in the store's dtype. The block is promoted first if it
        is below the device; an absent block is created when `offset` is 0. `offset` may not leave a
        hole (it is at most the block's tokens) and offset + n may not pass block_tokens.
        """
        self._check_layer(key)
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be int, got {type(offset).__name__}")
        if is_content_key(key):
            raise ValueError(f"{key} is content-addressed, so immutable: write to the session's own block")
        block = KVBlock(keys, values)  # validates shapes and dtypes
        with self._lock:
            self._check_open()
            self._wait_unread([key])
            place = self._place
            t = place.where.get(key)
            if t is None:
                if offset != 0:
                    raise ValueError(f"{key} is not stored; a new block starts at offset 0, not {offset}")
                self.put(key, block)
                return
            layout = self.layout
            layout.check(block)
            stored = place.stats[t][key].tokens
            if not 0 <= offset <= stored or offset + block.tokens > layout.block_tokens:
                raise ValueError(
                    f"cannot write {block.tokens} tokens at offset {offset} of {key}: it holds {stored} "
                    f"tokens and at most block_tokens={layout.block_tokens}"
                )
            step = place.tick()
            if t != DEVICE and not place.promote(key, t):
                raise KeyError(f"{key} could not be read back from the {place.tiers[t].name} tier")
            place.write_tokens(key, offset, block, step)

    @contextmanager
    def reading(
        self, keys: Sequence[BlockKey], touch: bool = False, limit_tokens: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of `keys` joined along tokens, in order: two [kv_heads, tokens, head_dim]
        tensors on the store's device, valid inside the `with` block (the blocks are held in place:
        they do not move or leave until it ends; the store's lock is not held meanwhile).

        Blocks in consecutive device slots (all full but the last) are read as views of the device
        pool, without a copy; otherwise the blocks are gathered into new tensors, and blocks below
        the device are decoded without being moved. Only the last block may be partial. A key that
        is not stored raises KeyError. Reads count as hits; with `touch` they also count as accesses
        for the eviction policy. `limit_tokens` cuts the result to that many tokens.
        """
        keys = _checked_keys(keys)
        self._scheduler.wait_for(keys)
        with self._lock:
            self._check_open()
            keys_read, values_read = read_joined(self._place, keys, touch)
            pinned = self._place.reading.add(keys)
        try:
            if limit_tokens is not None:
                keys_read, values_read = keys_read[:, :limit_tokens], values_read[:, :limit_tokens]
            yield keys_read, values_read
        finally:
            self._end_read(pinned)

    def read_pages(
        self, keys: Sequence[BlockKey], pages: torch.Tensor, page_tokens: int, tokens: int, touch: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen pages of one sequence's blocks of a layer, `keys` in order, per KV head: keys and
        values [kv_heads, read, head_dim], new tensors on the store's device (a sparse step's read).

        A page is `page_tokens` consecutive tokens (dividing block_tokens); pages [kv_heads, kept]
        int64 are the pages each KV head reads, `tokens` the sequence's length. A partial newest
        page must be every head's last, and is cut (read = kept · page_tokens less what it lacks).
        Pages on the device are copied straight out of the pool, others decoded where they lie;
        only the blocks the pages lie in are read (waited for, counted as hits, with `touch` as
        accesses). KeyError for a block not stored; ValueError for pages outside the sequence."""
        keys, pages, blocks = self._checked_pages(keys, pages, page_tokens, tokens)
        self._scheduler.wait_for([keys[i] for i in blocks])
        with self._lock:
            self._check_open()
            return read_pages(self._place, keys, blocks, pages, page_tokens, tokens, touch)

    @contextmanager
    def reading_page_rows(
        self, keys: Sequence[BlockKey], pages: torch.Tensor, page_tokens: int, tokens: int, touch: bool = False
    ) -> Iterator[PageRows | None]:
        """The pages read_pages would copy (same arguments, checks and counts), where they lie, for
        attention that reads them in place (tiered.gather.PageRows): spans of rows of the device
        pools (tiered.codecs.cpu_kernels.attend_rows) and the quantized blocks below the device with
        each head's pages marked (the codec's attend with `visible`). Valid inside the `with` block,
        where the pages' blocks are held in place. None, with nothing read or counted, unless the
        device is the CPU and every chosen block is on it or in an int-quantized lower tier: then
        read_pages reads them."""
        keys, pages, blocks = self._checked_pages(keys, pages, page_tokens, tokens)
        chosen = [keys[i] for i in blocks]
        # on a CPU device, a block read where it lies costs less than its move up (a decode and an
        # eviction's encode, on the cores attention uses): queued moves of the pages' blocks go
        self._scheduler.wait_for(chosen, take_queued=self.device.type == "cpu")
        with self._lock:
            self._check_open()
            rows = page_rows(self._place, keys, blocks, pages, page_tokens, tokens, touch)
            pinned = None if rows is None else self._place.reading.add(chosen)
        try:
            yield rows
        finally:
            if pinned is not None:
                self._end_read(pinned)

    def _end_read(self, pinned) -> None:
        """Let go of the blocks a read held in place (what Pins.add returned for it)."""
        with self._lock:
            self._place.reading.discard(pinned)
            self._unread.notify_all()

    def _checked_pages(
        self, keys: Sequence[BlockKey], pages: torch.Tensor, page_tokens: int, tokens: int
    ) -> tuple[list[BlockKey], torch.Tensor, list[int]]:
        """read_pages' arguments checked: the keys, the pages on the store's device, and the blocks
        the pages lie in (ascending)."""
        keys = _checked_keys(keys)
        if isinstance(page_tokens, bool) or not isinstance(page_tokens, int) or page_tokens <= 0 \
                or self.config.block_tokens % page_tokens:
            raise ValueError(f"page_tokens must divide block_tokens={self.config.block_tokens}, got {page_tokens!r}")
        if not isinstance(pages, torch.Tensor):
            raise TypeError(f"pages must be a tensor, got {type(pages).__name__}")
        held = -(-tokens // page_tokens)
        if not 0 < tokens <= len(keys) * self.config.block_tokens:
            raise ValueError(f"{len(keys)} blocks cannot hold a sequence of {tokens} tokens")
        if pages.dim() != 2 or pages.dtype != torch.int64 or pages.numel() == 0:
            raise ValueError(f"pages must be a non-empty [kv_heads, kept] int64 tensor, got {pages.dtype} {tuple(pages.shape)}")
        per_block = self.config.block_tokens // page_tokens
        blocks = cpu_kernels.page_blocks(pages, held, per_block, bool(tokens % page_tokens)) if pages.is_cpu else None
        if blocks is None:  # the same checks in torch
            if int(pages.min()) < 0 or int(pages.max()) >= held:
                raise ValueError(f"pages must lie in 0..{held - 1}, the pages of {tokens} tokens")
            if tokens % page_tokens and not bool((pages[:, -1] == held - 1).all()):
                raise ValueError("the partial newest page must be the last page of every head")
            blocks = torch.unique(pages // per_block).tolist()  # ascending
        return keys, pages.to(self.device), blocks

    @contextmanager
    def reading_parts(
        self, keys: Sequence[BlockKey], touch: bool = False, limit_tokens: int | None = None
    ) -> Iterator[list[DenseRun | EncodedRun]]:
        """`keys` (one sequence's blocks of a layer, in order) as parts for attention that reads
        quantized blocks where they lie (tiered.gather.read_parts): full-precision runs of the device
        pool, and each quantizing lower tier's payloads as stored. Valid inside the `with` block
        (the blocks are held in place, as for `reading`). Counts, KeyError and `limit_tokens` as
        for `reading`."""
        keys = _checked_keys(keys)
        self._scheduler.wait_for(keys)
        with self._lock:
            self._check_open()
            parts = read_parts(self._place, keys, touch, limit_tokens)
            pinned = self._place.reading.add(keys)
        try:
            yield parts
        finally:
            self._end_read(pinned)

    def set_score(self, key: BlockKey, score: float) -> None:
        """Set the importance score the eviction policy sees for `key` (ignored if absent)."""
        _check_key(key)
        with self._lock:
            t = self._place.where.get(key)
            if t is not None:
                self._place.set_score(key, t, float(score))

    def seal(self, key: BlockKey, content_key: BlockKey) -> bool:
        """Relabel the full block `key` as `content_key`, the address of what it holds (tiered.content).

        True if the block now lives under `content_key`; False if `content_key` was stored already:
        then `key` is removed and the stored block (same tokens, same model) serves instead. With
        write-through, the sealed block is queued for the disk tier. References move with it.
        """
        self._check_layer(key)
        self._check_layer(content_key)
        if key.layer != content_key.layer:
            raise ValueError(f"a block keeps its layer when sealed: {key} -> {content_key}")
        with self._lock:
            self._check_open()
            self._wait_unread([key, content_key])
            place = self._place
            if key not in place.where:
                raise KeyError(f"{key} is not stored")
            full = place.stats[place.where[key]][key].tokens
            if full != self.config.block_tokens:
                raise ValueError(f"only full blocks are sealed; {key} holds {full} of {self.config.block_tokens} tokens")
            place.move_refs(key, content_key)
            if content_key in place.where:
                place.remove(key)
                self._counters.seal_hits += 1
                return False
            place.rename(key, content_key)
            self._counters.sealed += 1
            if place.persistent is not None:
                self._queue_write(content_key)
            return True

    def retain(self, keys: Iterable[BlockKey]) -> None:
        """Count one more reader of each key. Blocks with readers leave the store last."""
        with self._lock:
            self._place.refs.update(keys)

    def release(self, keys: Iterable[BlockKey]) -> None:
        """Count one reader less of each key (a retain's undo)."""
        with self._lock:
            _count_down(self._place.refs, keys)

    @contextmanager
    def pinning(self, keys: Iterable[BlockKey]) -> Iterator[None]:
        """Inside the `with`, blocks of `keys` are the last to leave the store: a computation that
        reads them (a session's forward) does not push out what it is about to read."""
        with self._lock:
            pinned = self._place.pinned.add(keys)
        try:
            yield
        finally:
            with self._lock:
                self._place.pinned.discard(pinned)

    def references(self, key: BlockKey) -> int:
        """Readers of `key` (retains not yet released)."""
        with self._lock:
            return self._place.refs[key]

    def holding(self, keys: Iterable[BlockKey]) -> list[bool]:
        """For each key, whether some tier holds it (one lock for all)."""
        with self._lock:
            where = self._place.where
            return [key in where for key in keys]

    def discover(self, keys: Iterable[BlockKey]) -> int:
        """Track the blocks of `keys` that no tier of this store knows but the shared tier holds
        (another store wrote them); returns how many. A no-op without a shared tier."""
        with self._lock:
            self._check_open()
            place = self._place
            bottom = len(place.tiers) - 1
            shared = place.tiers[bottom]
            if not isinstance(shared, SharedTier):
                return 0
            found = 0
            for key in keys:
                _check_key(key)
                if key in place.where:
                    continue
                held = shared.held(key)
                if held is not None:
                    place.track(key, bottom, held[0], tokens=held[1])
                    found += 1
            return found

    def flush(self) -> None:
        """Wait until every queued write-through is on disk and durable (a no-op without one)."""
        with self._lock:
            self._check_open()
            job = self._write_job
        if job is not None:
            job.result()
        with self._lock:
            if self._place.persistent is not None:
                self._place.tiers[self._place.persistent].sync()

    def capacity_blocks(self, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """How many full blocks of that shape the tiers hold together (disk: uncompressed, a lower bound)."""
        layout = BlockLayout(kv_heads, self.config.block_tokens, head_dim, dtype)
        place = self._place
        total = place.device_tier.slots_for(layout) * place.device_tier.rooms
        for t in range(1, len(place.tiers)):
            nbytes = place.codecs[t].encoded_nbytes(kv_heads, layout.block_tokens, head_dim, dtype)
            total += place.tiers[t].capacity_bytes // place.tiers[t].charge_for(nbytes)
        return total

    def where(self, key: BlockKey) -> str | None:
        """Name of the tier holding `key` ("device", "host", "disk"), or None."""
        _check_key(key)
        with self._lock:
            t = self._place.where.get(key)
            return None if t is None else self._place.tiers[t].name

    def remove(self, key: BlockKey) -> bool:
        """Forget `key` in whichever tier holds it; True if it was stored."""
        _check_key(key)
        with self._lock:
            self._check_open()
            self._wait_unread([key])
            if key not in self._place.where:
                return False
            self._place.remove(key)
            self._counters.removes += 1
            return True

    def prefetch(
        self,
        keys: Iterable[BlockKey],
        layers_ahead: int | Sequence[int] = 1,
        scores: Sequence[float] | None = None,
        plan: Hashable | None = None,
    ) -> Future:
        """Ask the prefetch scheduler to move `keys` (most urgent first) up to the device tier.

        layers_ahead  per key (or one for all): layer computations until attention reads it
                      (1: the next layer; `layers`: this layer at the next step); sooner runs first
        scores        per key: the importance estimate, higher first among equally soon blocks
        plan          whose plan this is, e.g. (sequence, layer that planned): it supersedes that
                      name's live plan, whose queued moves not asked for again are cancelled;
                      None supersedes nothing

        The Future resolves to the number of blocks moved for this plan, or to the first error
        of its moves (the block then stays where it lay). Keys not stored are skipped. The plan's
        moves never evict a block it has moved up or found up, or one under read, and evict pinned
        blocks (a computing session's, `pinning`) last; they stop when the device has no other room.
        """
        keys = list(keys)
        for key in keys:
            _check_key(key)
        ahead = [layers_ahead] * len(keys) if isinstance(layers_ahead, int) else list(layers_ahead)
        weights = [0.0] * len(keys) if scores is None else list(scores)
        if len(ahead) != len(keys) or len(weights) != len(keys):
            raise ValueError(f"prefetch of {len(keys)} keys got {len(ahead)} layers_ahead and {len(weights)} scores")
        priorities = [Priority(a, s) for a, s in zip(ahead, weights)]  # validates them
        with self._lock:
            self._check_open()
            self._counters.prefetch_requests += len(keys)
            where = self._place.where
            requests = [(key, priority) for key, priority in zip(keys, priorities) if key in where]
            return self._scheduler.submit(requests, plan=plan)

    def stats(self) -> dict:
        """Counters of everything the store did, plus per-tier blocks and used/capacity bytes.

        stall_s     time reads waited for blocks that were requested but not yet up
        prefetch    the scheduler's counters (tiered.counters.SchedulerCounters), the moves queued
                    and reads waiting now, and precision: moved blocks read before they left the
                    device (used_blocks) over moved blocks (None before any moved)
        link_bytes  bytes moved per tier link, e.g. {"host->device": ...}, by every move
        blocks      blocks stored, each once (a tier's `blocks` also counts copies written through
                    to the disk tier)
        """
        with self._lock:
            place = self._place
            out = self._counters.as_dict()
            prefetch = self._scheduler.counters_now()
            out["stall_s"] = prefetch.pop("stall_s")
            moved = prefetch["moved_blocks"]
            prefetch.update(
                used_blocks=place.prefetch_used,  # moved blocks read before they left the device
                wasted_blocks=place.prefetch_wasted,  # moved blocks that left the device unread
                precision=place.prefetch_used / moved if moved else None,
            )
            out["prefetch"] = prefetch
            out["link_bytes"] = dict(place.link_bytes)
            out["step"] = place.step
            out["blocks"] = len(place.where)  # each counted once, in the tier it is read from
            out["persisted_blocks"] = len(place.persisted)
            out["referenced_blocks"] = len(place.refs)
            out["tiers"] = {}
            for t, tier in enumerate(place.tiers):
                entry = place.counters[t].as_dict()
                entry.update(blocks=len(tier), used_bytes=tier.used_bytes, capacity_bytes=tier.capacity_bytes)
                out["tiers"][tier.name] = entry
            return out

    def block_stats(self, key: BlockKey) -> BlockStats | None:
        """The statistics policies see for `key` (a live object: read it under no assumptions)."""
        _check_key(key)
        with self._lock:
            t = self._place.where.get(key)
            return None if t is None else self._place.stats[t][key]

    def keys(self) -> list[BlockKey]:
        with self._lock:
            return list(self._place.where)

    def __contains__(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._place.where

    def __len__(self) -> int:
        with self._lock:
            return len(self._place.where)

    def close(self) -> None:
        """Finish or cancel background work and release every tier. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._scheduler.close()  # queued moves cancelled, the running one finishes
        self._writer.shutdown(wait=True)  # queued write-throughs finish: sealed blocks reach the disk
        with self._lock:
            for tier in self._place.tiers:
                tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals (lock held) ----------------------------------------------------------------

    @property
    def _device_tier(self) -> DeviceTier:
        return self._place.device_tier

    def _check_layer(self, key: BlockKey) -> None:
        _check_key(key)
        if self.config.layers is not None and key.layer >= self.config.layers:
            raise ValueError(f"{key} has layer {key.layer}; this store has layers={self.config.layers}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    def _wait_unread(self, keys: list[BlockKey]) -> None:
        """Wait until no other thread's read holds any of `keys` (a change of a block under read
        waits for the read to end; the lock is released meanwhile). A read of this thread's own
        cannot end while it waits: RuntimeError."""
        while holders := self._place.reading.holders(keys):
            if threading.get_ident() in holders:
                raise RuntimeError(f"one of {keys[:4]} is being read by this thread: change it after the read")
            self._unread.wait()
            self._check_open()

    def _get_locked(self, key: BlockKey) -> KVBlock | None:
        place = self._place
        step = place.tick()
        self._counters.gets += 1
        t = place.where.get(key)
        for above in range(DEVICE, len(place.tiers) if t is None else t):
            place.counters[above].misses += 1
        if t is None:
            self._counters.misses += 1
            return None
        if t != DEVICE and key in place.reading:  # under read elsewhere, so it stays: a copy from where it lies
            item = place.tiers[t].get(key)
            if item is None:
                self._counters.misses += 1
                return None
            self._counters.hits += 1
            place.counters[t].hits += 1
            block = place.codecs[t].decode(item, self.device)  # may be a view of the tier's memory
            return KVBlock.trusted(block.keys.clone(), block.values.clone())
        if t != DEVICE:
            start_s = time.perf_counter()
            promoted = place.promote(key, t)
            place.counters[t].wait_s += time.perf_counter() - start_s
            if not promoted:  # the lower tier could not return it intact: a miss, never wrong data
                self._counters.misses += 1
                place.counters[t].misses += 1
                return None
        place.touch(key, DEVICE, step)
        place.note_read([key])
        self._counters.hits += 1
        place.counters[t].hits += 1
        return place.device_tier.get(key).clone()

    def _queue_write(self, key: BlockKey) -> None:
        self._pending_writes.append(key)
        if not self._writing:  # the writer's loop clears it, under the lock, as it finds nothing left
            self._writing = True
            self._write_job = self._writer.submit(self._write_pending)

    def _write_pending(self) -> None:
        """Write queued sealed blocks through to disk, a batch per hold of the lock, until none is left."""
        while True:
            with self._lock:
                if self._closed and not self._pending_writes:
                    self._writing = False
                    return
                batch, self._pending_writes = self._pending_writes[:WRITE_BATCH], self._pending_writes[WRITE_BATCH:]
                if not batch:
                    self._writing = False
                    return
                for key in batch:
                    try:
                        nbytes = self._place.write_through(key)
                    except OSError as error:  # a full or failing disk: the block stays where it is, counted
                        self._counters.write_through_errors += 1
                        self._counters.last_write_error = str(error)
                        continue
                    self._counters.write_through_blocks += nbytes > 0
                    self._counters.write_through_bytes += nbytes

    def _move_up(self, key: BlockKey, protected: set[BlockKey]) -> str:
        """The scheduler's move: bring `key` up to the device (tiered.scheduler's MOVED), or find it
        there (UP: it counts as an access), or SKIPPED when gone, under read, or without room but by
        evicting a `protected` block or one under read (pinned ones leave last). A lower tier's error propagates (the block stays
        where it lay); a damaged block is dropped as get drops it, and KeyError says so.

        The disk tier is thread-safe on its own (tiered.disk), so a block is read from it (file
        I/O, decompression) without the store's lock; the move then happens under the lock if the
        block is still the one read (same statistics object: not removed and stored again)."""
        item = None
        with self._lock:
            place = self._place
            t = place.where.get(key)
            if t is None or key in place.reading:  # (the tiers stay open until the mover has stopped)
                return SKIPPED
            if t == DEVICE:
                place.touch(key, DEVICE, place.tick(), hit=False)
                return UP
            tier, stats = place.tiers[t], place.stats[t][key]
        if tier.reads_unlocked:
            item = tier.get(key)  # outside the lock; an OSError leaves the block where it lies
        with self._lock:
            if place.where.get(key) != t or place.stats[t].get(key) is not stats or key in place.reading:
                return SKIPPED  # changed while it was read
            if item is None and tier.reads_unlocked:  # damaged: the tier dropped it
                place.forget([key], t)
                raise KeyError(f"{key} could not be read back from the {tier.name} tier")
            try:
                moved_bytes = place.promote(key, t, protected=protected, item=item)
            except NoRoom:
                return SKIPPED
            if not moved_bytes:
                raise KeyError(f"{key} could not be read back from the {place.tiers[t].name} tier")
            place.note_prefetched(key, t)
            return MOVED

def _checked_keys(keys: Iterable[BlockKey]) -> list[BlockKey]:
    keys = list(keys)
    for key in keys:
        if type(key) is not BlockKey:  # the common case skips the full check
            _check_key(key)
    return keys


def _check_key(key: object) -> None:
    if not isinstance(key, BlockKey):
        raise TypeError(f"expected a BlockKey, got {type(key).__name__}")


def _count_down(counts: Counter, keys: Iterable[BlockKey]) -> None:
    """One less of each key in `counts`; a key that reaches zero leaves it."""
    for key in keys:
        if counts[key] <= 1:
            counts.pop(key, None)
        else:
            counts[key] -= 1
