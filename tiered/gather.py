"""Reading a sequence's blocks joined along tokens: views of the device pool when the blocks sit in
consecutive slots, a gathered copy otherwise (blocks below the device decoded where they are).

`read_parts` reads the same blocks without joining them, for attention that reads quantized
blocks where they lie: full-precision runs (views of the device pool where slots are consecutive)
and, per lower tier with a quantizing codec, the stored payloads themselves.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .block import BlockKey
from .codecs import Codec, Encoded, QuantizedCodec, cpu_kernels
from .placement import DEVICE, Placement

VIEW_RUNS = 4  # device blocks in more runs of consecutive slots than this are gathered into one copy


@dataclass(frozen=True, slots=True)
class DenseRun:
    """Full-precision keys and values, [kv_heads, tokens, head_dim] each, on the store's device.
    Token j sits at position start + j, or at positions[j] ([tokens] int64) when positions is set.
    `pool_row`: for views of the device tier's pools ([kv_heads, slots, block_tokens, head_dim]),
    the row of the run's first token in KV head 0 when a pool is seen as rows [-1, head_dim] (the
    pools are then keys._base and values._base); else None."""

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    positions: torch.Tensor | None = None
    pool_row: int | None = None


@dataclass(frozen=True, slots=True)
class EncodedRun:
    """Blocks of one lower tier as that tier stores them: `items[i]` (in `codec`) holds the tokens
    from position starts[i] on. Valid while the read holds its blocks (they do not move meanwhile).
    `memo` keeps what the codec's attention works out once about these blocks (its checks, a
    kernel's block table): a later read of the same blocks, unmoved, gets this same run."""

    codec: Codec
    items: list[Encoded]
    starts: list[int]
    memo: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class PageRows:
    """A sparse step's pages where they lie. On the device: the pools (keys_pool, values_pool) seen
    as rows [-1, head_dim], KV head h's page j being rows first[h, j] .. + count[h, j] (both
    [kv_heads, kept] int64; count 0 for a page below the device). Below it: each lower tier's
    blocks of the pages as stored (`below`), of which KV head h reads only the pages marked in
    visible[h] ([kv_heads, pages] bool, pages of the read's page_tokens; None when none is below)."""

    keys_pool: torch.Tensor
    values_pool: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    below: list[EncodedRun]
    visible: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class _ReadPlan:
    """A layer's parts as read_parts built them, for the next read of the same keys while no block
    has moved (Placement.read_plans is emptied when one does). Only the device run `tail`, which
    holds the last block (a decode step adds a token to it), is made again: from its slots
    first_slot..last_slot. `hits`: (tier, blocks read from it) per read."""

    keys: list[BlockKey]
    parts: list[DenseRun | EncodedRun]
    tail: int
    first_slot: int
    last_slot: int
    hits: list[tuple[int, int]]


def read_joined(placement: Placement, keys: list[BlockKey], touch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `keys` joined along tokens: two [kv_heads, tokens, head_dim] tensors.

    Only the last block may be partial. A key not stored raises KeyError. Every read counts as a
    hit of its tier; with `touch`, also as an access for the eviction policy.
    """
    if not keys:
        raise ValueError("reading needs at least one key")
    views = _device_run(placement, keys, touch)
    if views is not None:
        return views
    tiers, slots, _, total = _locate(placement, keys, touch)
    return _gather(placement, keys, tiers, slots, total)


def read_pages(
    placement: Placement, keys: list[BlockKey], blocks: list[int], pages: torch.Tensor, page_tokens: int, tokens: int,
    touch: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen pages of a sequence's blocks `keys` (block i holds its tokens from i · block_tokens
    on; a page is `page_tokens` of them), per KV head: keys and values [kv_heads, read, head_dim],
    new tensors, page after page in the order `pages` lists them.

    pages: [kv_heads, kept] int64, the pages each KV head reads; `blocks` the blocks they lie in,
    ascending; `tokens` the sequence's length: a partial newest page must come last for every
    head, and is cut (read = kept · page_tokens less what that page lacks). When every one of
    `blocks` is on the device the pages are copied straight out of the pool (the slot of each of
    `keys` kept while no block moves, when they all are); otherwise `blocks` are gathered as
    read_joined gathers them (lower tiers decoded, nothing moved) and the pages taken from that.
    Hits and touches are counted for `blocks` alone."""
    chosen = [keys[i] for i in blocks]
    block_rows = _device_slots(placement, keys)  # where each block of `keys` is in the source read
    if block_rows is not None:
        _count_device_read(placement, chosen, touch)
        in_pool = True
    else:  # where the chosen blocks are: in the pool too, or gathered (decoded) into a copy
        tiers, chosen_slots, _, _ = _locate(placement, chosen, touch)
        in_pool = max(tiers) == DEVICE
        block_rows = torch.zeros(len(keys), dtype=torch.int64)
        block_rows[blocks] = torch.tensor(chosen_slots) if in_pool else torch.arange(len(blocks))
    if in_pool:  # [kv_heads, slots, block_tokens, head_dim] each
        source_keys, source_values = placement.device_tier.keys_pool, placement.device_tier.values_pool
    else:  # [kv_heads, blocks, block_tokens, head_dim] each
        source_keys, source_values = _gather_blocks(placement, chosen, tiers, chosen_slots)
    block_rows = block_rows.to(pages.device)
    per_block = placement.layout.block_tokens // page_tokens
    heads, sources, _, dim = source_keys.shape
    # the row of each chosen page in a source seen as [kv_heads · sources · per_block, page_tokens, head_dim]
    head_rows = torch.arange(heads, device=pages.device)[:, None] * (sources * per_block)  # [kv_heads, 1]
    rows = (head_rows + block_rows[pages // per_block] * per_block + pages % per_block).view(-1)  # [kv_heads · kept]
    read = pages.shape[1] * page_tokens - (-tokens % page_tokens)
    keys_out, values_out = (
        source.view(-1, page_tokens, dim).index_select(0, rows).view(heads, -1, dim)[:, :read]
        for source in (source_keys, source_values)
    )
    return keys_out, values_out


def page_rows(
    placement: Placement, keys: list[BlockKey], blocks: list[int], pages: torch.Tensor, page_tokens: int, tokens: int,
    touch: bool,
) -> PageRows | None:
    """The pages read_pages would copy (same arguments), left where they lie (see PageRows). None,
    with nothing counted, unless the pool is in CPU memory (where tiered.codecs.cpu_kernels reads
    it) and every block of `blocks` lies on the device or in a lower tier whose codec's kernel
    reads int codes where they lie; else hits and touches are counted for `blocks` alone."""
    if not pages.is_cpu or not cpu_kernels.available() or placement.layout is None:
        return None
    device = placement.device_tier
    full, pool_slots = placement.layout.block_tokens, device.keys_pool.shape[1]
    short_by = -tokens % page_tokens  # a partial newest page: every head's last, cut
    block_slots = _device_slots(placement, keys)
    if block_slots is not None:  # the whole layer on the device: the fast path of a step
        _count_device_read(placement, [keys[i] for i in blocks], touch)
        first, count = cpu_kernels.page_rows(pages, block_slots, full // page_tokens, page_tokens, full,
                                             pool_slots * full, short_by)
        return PageRows(device.keys_pool, device.values_pool, first, count, [], None)
    chosen = [keys[i] for i in blocks]
    for key in chosen:
        t = placement.where.get(key)
        if t is not None and t != DEVICE and not _reads_in_place(placement.codecs[t]):
            return None
    tiers, slots, _, _ = _locate(placement, chosen, touch)
    slot_of_block, on_device = [0] * len(keys), [False] * len(keys)
    for i, t, slot in zip(blocks, tiers, slots):
        if t == DEVICE:
            slot_of_block[i], on_device[i] = slot, True
    per_block = full // page_tokens
    first, count = cpu_kernels.page_rows(pages, torch.tensor(slot_of_block), per_block, page_tokens, full,
                                         pool_slots * full, short_by)
    here = torch.tensor(on_device)[pages // per_block]  # [kv_heads, kept]: the page's block is on the device
    visible = torch.zeros(pages.shape[0], -(-tokens // page_tokens), dtype=torch.bool)  # [kv_heads, pages]
    visible.scatter_(1, pages, ~here)
    below = []
    for t in sorted(set(tiers) - {DEVICE}):
        start_s = time.perf_counter()
        rows = [j for j, tier in enumerate(tiers) if tier == t]
        items = _items(placement, t, [chosen[j] for j in rows])
        below.append(EncodedRun(placement.codecs[t], items, [blocks[j] * full for j in rows]))
        placement.counters[t].read_s += time.perf_counter() - start_s
    return PageRows(device.keys_pool, device.values_pool, first * here, count * here, below, visible if below else None)


def _reads_in_place(codec: Codec) -> bool:
    """Whether attention reads this lower tier's blocks from their codes (the fused kernels' int kinds)."""
    return isinstance(codec, QuantizedCodec) and codec.fmt.kind == "int"


def _device_slots(placement: Placement, keys: list[BlockKey]) -> torch.Tensor | None:
    """The device slot of each of `keys` ([blocks] int64), when every one is on the device and full
    but the last; else None. Either answer is kept in Placement.read_plans while no block moves."""
    memo = placement.read_plans.get(("slots", keys[-1]))
    if memo is not None and memo[0] == keys:
        return memo[1]
    if placement.layout is None:
        return None
    lookup, full = placement.device_tier.slot_table.get, placement.layout.block_tokens
    entries = [lookup(key) for key in keys]
    slots = None
    if all(entry is not None for entry in entries) and all(entry[1] == full for entry in entries[:-1]):
        slots = torch.tensor([entry[0] for entry in entries], dtype=torch.int64)
    placement.read_plans[("slots", keys[-1])] = (list(keys), slots)
    return slots


def _count_device_read(placement: Placement, keys: list[BlockKey], touch: bool) -> None:
    """Count a read of `keys`, all on the device: hits, prefetched blocks read, and with `touch` an access."""
    placement.counters[DEVICE].hits += len(keys)
    if placement.moved_unread:
        placement.note_read(keys)
    if touch:
        placement.touch_all(keys, DEVICE, placement.tick())


def _locate(placement: Placement, keys: list[BlockKey], touch: bool) -> tuple[list[int], list[int], list[int], int]:
    """Where `keys` are: (tier of each, device slot of each or -1, tokens of each, tokens in all).
    Counts each read as a hit of its tier and, with `touch`, as an access. KeyError for a key not
    stored; ValueError when a block but the last is partial. A store reopened over its disk tier
    has no layout yet: the first block is promoted to set it, then the keys are located again."""
    tiers, slots, tokens = [], [], []
    where, stats, slot_of = placement.where.get, placement.stats, placement.device_tier.slot_of
    for key in keys:
        t = where(key)
        if t is None:
            raise KeyError(f"{key} is not stored")
        tiers.append(t)
        tokens.append(stats[t][key].tokens)
        slots.append(slot_of(key)[0] if t == DEVICE else -1)
    if placement.layout is None:
        placement.promote(keys[0], tiers[0])
        return _locate(placement, keys, touch)
    full = placement.layout.block_tokens
    if any(n != full for n in tokens[:-1]):
        raise ValueError("only the last block read may be partial")
    for t in tiers:
        placement.counters[t].hits += 1
    if placement.moved_unread:
        placement.note_read(key for key, t in zip(keys, tiers) if t == DEVICE)
    if touch:
        step = placement.tick()
        for key, t in zip(keys, tiers):
            placement.touch(key, t, step)
    return tiers, slots, tokens, full * (len(keys) - 1) + tokens[-1]


def _device_run(placement: Placement, keys: list[BlockKey], touch: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Views of the pool when every block is on the device, in consecutive slots, full but the last;
    else None. The fast path of a decode step: one dictionary lookup per block."""
    device, layout = placement.device_tier, placement.layout
    if layout is None:
        return None
    lookup = device.slot_table.get  # key -> (slot, tokens)
    first = lookup(keys[0])
    last = lookup(keys[-1])
    if first is None or last is None or last[0] - first[0] != len(keys) - 1:
        return None
    full = layout.block_tokens
    for offset, key in enumerate(keys[:-1]):
        entry = lookup(key)
        if entry is None or entry[0] != first[0] + offset or entry[1] != full:
            return None
    _count_device_read(placement, keys, touch)
    run = _pool_run(placement, first[0], last[0], full * (len(keys) - 1) + last[1], 0)
    return run.keys, run.values


def _pool_run(placement: Placement, first_slot: int, last_slot: int, tokens: int, start: int) -> DenseRun:
    """Views of device slots first_slot..last_slot joined along tokens, cut to `tokens`: the run of
    blocks from position `start` on. keys, values: [kv_heads, tokens, head_dim]."""
    layout, device = placement.layout, placement.device_tier
    heads, dim, chosen = layout.kv_heads, layout.head_dim, slice(first_slot, last_slot + 1)
    return DenseRun(device.keys_pool[:, chosen].reshape(heads, -1, dim)[:, :tokens],
                    device.values_pool[:, chosen].reshape(heads, -1, dim)[:, :tokens], start,
                    pool_row=first_slot * layout.block_tokens)


def _gather(
    placement: Placement, keys: list[BlockKey], tiers: list[int], slots: list[int], total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`keys` (at `tiers`, device `slots`) gathered into new tensors joined along tokens and cut
    to `total`: [kv_heads, total, head_dim] each."""
    heads, dim = placement.layout.kv_heads, placement.layout.head_dim
    gathered_keys, gathered_values = _gather_blocks(placement, keys, tiers, slots)
    return gathered_keys.view(heads, -1, dim)[:, :total], gathered_values.view(heads, -1, dim)[:, :total]


def _gather_blocks(
    placement: Placement, keys: list[BlockKey], tiers: list[int], slots: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`keys` gathered whole into new tensors, [kv_heads, blocks, block_tokens, head_dim] each:
    device blocks copied out of the pool, lower tiers' decoded in place (a block's unheld tokens
    are left as they are)."""
    layout, device, target = placement.layout, placement.device_tier, placement.device
    if DEVICE == max(tiers):  # every block on the device: one gather, no staging copy
        chosen = torch.tensor(slots, device=target)
        return device.keys_pool.index_select(1, chosen), device.values_pool.index_select(1, chosen)
    shape = (layout.kv_heads, len(keys), layout.block_tokens, layout.head_dim)
    # gathered keys, values: [kv_heads, blocks, block_tokens, head_dim]
    out_keys = torch.empty(shape, dtype=layout.dtype, device=target)
    out_values = torch.empty(shape, dtype=layout.dtype, device=target)
    on_device = [i for i, t in enumerate(tiers) if t == DEVICE]
    runs = _slot_runs(on_device, slots)
    if len(runs) <= VIEW_RUNS:  # a copy per run of consecutive slots, straight into its place
        for run in runs:
            first, last = slots[run[0]], slots[run[-1]] + 1
            out_keys[:, run[0] : run[-1] + 1].copy_(device.keys_pool[:, first:last])
            out_values[:, run[0] : run[-1] + 1].copy_(device.values_pool[:, first:last])
    else:
        positions = torch.tensor(on_device, device=target)
        chosen = torch.tensor([slots[i] for i in on_device], device=target)
        out_keys.index_copy_(1, positions, device.keys_pool.index_select(1, chosen))
        out_values.index_copy_(1, positions, device.values_pool.index_select(1, chosen))
    for t in sorted(set(tiers) - {DEVICE}):  # each lower tier's blocks decoded in one batch, in place
        start_s = time.perf_counter()
        rows = [i for i, tier in enumerate(tiers) if tier == t]
        placement.codecs[t].decode_rows_into(_items(placement, t, [keys[i] for i in rows]), out_keys, out_values, rows)
        placement.counters[t].read_s += time.perf_counter() - start_s
    return out_keys, out_values


def read_parts(
    placement: Placement, keys: list[BlockKey], touch: bool, limit_tokens: int | None = None
) -> list[DenseRun | EncodedRun]:
    """The blocks `keys` (a sequence's, in order: block i holds the tokens from i · block_tokens)
    as parts that attention can read one by one and merge: DenseRun for blocks on the device (one
    view per run of consecutive slots, or one gathered copy when they are scattered) and for lower
    tiers whose codec does not quantize (decoded); EncodedRun per lower tier with a quantizing
    codec, its payloads untouched. With blocks below the device but none quantized, one DenseRun
    joined as read_joined joins it. Tokens from `limit_tokens` on are left out (a stored block cut
    by the limit is decoded). Counts hits and touches as read_joined does; KeyError as it does.
    """
    if not keys:
        raise ValueError("reading needs at least one key")
    views = _device_run(placement, keys, touch)
    if views is not None:
        limit = views[0].shape[1] if limit_tokens is None else min(limit_tokens, views[0].shape[1])
        return [DenseRun(views[0][:, :limit], views[1][:, :limit], 0)]
    if not touch and not placement.moved_unread:  # nothing per block to record: a plan may serve
        parts = _planned(placement, keys, limit_tokens)
        if parts is not None:
            return parts
    tiers, slots, tokens, total = _locate(placement, keys, touch)
    full = placement.layout.block_tokens
    limit = total if limit_tokens is None else min(limit_tokens, total)
    kept = [min(n, limit - i * full) for i, n in enumerate(tokens)]  # tokens of each block read
    rows = [i for i in range(len(keys)) if kept[i] > 0]
    if max(tiers) == DEVICE:  # all on the device, in a few runs (a shared prefix, then the sequence's own)
        parts = _device_parts(placement, rows, slots, kept)
        if not touch and limit == total:
            _keep_plan(placement, keys, parts, tiers, slots, total)
        return parts
    if not any(isinstance(placement.codecs[t], QuantizedCodec) for t in tiers if t != DEVICE):
        joined_keys, joined_values = _gather(placement, keys, tiers, slots, total)  # as read_joined does
        return [DenseRun(joined_keys[:, :limit], joined_values[:, :limit], 0)]
    parts = _device_parts(placement, [i for i in rows if tiers[i] == DEVICE], slots, kept)
    for t in sorted({tiers[i] for i in rows} - {DEVICE}):
        start_s = time.perf_counter()
        here = [i for i in rows if tiers[i] == t]
        items = _items(placement, t, [keys[i] for i in here])
        codec = placement.codecs[t]
        whole = [j for j, i in enumerate(here) if kept[i] == items[j].shape[1]]
        if isinstance(codec, QuantizedCodec) and whole:
            parts.append(EncodedRun(codec, [items[j] for j in whole], [here[j] * full for j in whole]))
            kept_whole = set(whole)
            cut = [j for j in range(len(here)) if j not in kept_whole]
        else:
            cut = list(range(len(here)))
        if cut:
            parts.append(_decoded_part(placement, codec, [items[j] for j in cut], [here[j] for j in cut], kept))
        placement.counters[t].read_s += time.perf_counter() - start_s
    if not touch and limit == total:
        _keep_plan(placement, keys, parts, tiers, slots, total)
    return parts


def _keep_plan(placement: Placement, keys: list[BlockKey], parts: list, tiers: list[int], slots: list[int],
               total: int) -> None:
    """Keep `parts` (read_parts' result for all of `keys`, `total` tokens) for the next read of
    `keys`, when the last block ends a device run that views the pool, nothing was decoded into
    a copy, and no part holds a copy read out of storage (Tier.get_copies: kept, it would hold
    the disk's blocks in memory beside the host tier's budget)."""
    if tiers[-1] != DEVICE or any(isinstance(part, DenseRun) and part.positions is not None for part in parts):
        return
    if any(placement.tiers[t].get_copies for t in set(tiers)):
        return
    ends = [i for i, part in enumerate(parts) if isinstance(part, DenseRun) and part.start + part.keys.shape[1] == total]
    if len(ends) != 1:
        return
    first_slot = slots[parts[ends[0]].start // placement.layout.block_tokens]
    hits = sorted(Counter(tiers).items())
    placement.read_plans[keys[-1]] = _ReadPlan(list(keys), parts, ends[0], first_slot, slots[-1], hits)


def _planned(placement: Placement, keys: list[BlockKey], limit_tokens: int | None) -> list | None:
    """read_parts' result from a kept plan (see _keep_plan), or None when none serves."""
    plan = placement.read_plans.get(keys[-1])
    if plan is None or plan.keys != keys:
        return None
    total = placement.layout.block_tokens * (len(keys) - 1) + placement.device_tier.slot_table[keys[-1]][1]
    if limit_tokens is not None and limit_tokens < total:
        return None
    for t, count in plan.hits:
        placement.counters[t].hits += count
    start = plan.parts[plan.tail].start
    parts = list(plan.parts)
    parts[plan.tail] = _pool_run(placement, plan.first_slot, plan.last_slot, total - start, start)
    return parts


def _items(placement: Placement, t: int, keys: list[BlockKey]) -> list[Encoded]:
    """The blocks `keys` as tier t stores them. A damaged one is dropped and raises KeyError: a miss,
    never wrong data."""
    items = [placement.tiers[t].get(key) for key in keys]
    for key, item in zip(keys, items):
        if item is None:
            placement.forget([key], t)
            raise KeyError(f"{key} could not be read back from the {placement.tiers[t].name} tier")
    return items


def _slot_runs(rows: list[int], slots: list[int], full=lambda i: True) -> list[list[int]]:
    """`rows` (indices into a sequence, ascending) split into runs of consecutive indices held in
    consecutive device slots; a block that is not `full` ends its run."""
    runs: list[list[int]] = []
    for i in rows:
        if runs and i == runs[-1][-1] + 1 and slots[i] == slots[runs[-1][-1]] + 1 and full(runs[-1][-1]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _device_parts(placement: Placement, rows: list[int], slots: list[int], kept: list[int]) -> list[DenseRun]:
    """Device blocks `rows` (indices into the sequence): a view of the pool per run of blocks in
    consecutive slots, or one gathered copy when there are more than VIEW_RUNS runs."""
    if not rows:
        return []
    layout, device = placement.layout, placement.device_tier
    heads, dim, full = layout.kv_heads, layout.head_dim, layout.block_tokens
    runs = _slot_runs(rows, slots, lambda i: kept[i] == full)
    if len(runs) <= VIEW_RUNS:
        return [_pool_run(placement, slots[run[0]], slots[run[-1]], full * (len(run) - 1) + kept[run[-1]], run[0] * full)
                for run in runs]
    chosen = torch.tensor([slots[i] for i in rows], device=placement.device)
    gathered_keys = device.keys_pool.index_select(1, chosen).view(heads, -1, dim)  # [kv_heads, blocks · block_tokens, head_dim]
    gathered_values = device.values_pool.index_select(1, chosen).view(heads, -1, dim)
    return [_cut(gathered_keys, gathered_values, rows, kept, full, placement.device)]


def _decoded_part(placement: Placement, codec: Codec, items: list[Encoded], rows: list[int], kept: list[int]) -> DenseRun:
    """Blocks of a lower tier decoded into one full-precision run (blocks `rows` of the sequence)."""
    layout = placement.layout
    full = layout.block_tokens
    shape = (layout.kv_heads, len(rows), full, layout.head_dim)
    # out keys, values: [kv_heads, blocks, block_tokens, head_dim]
    out_keys = torch.zeros(shape, dtype=layout.dtype, device=placement.device)
    out_values = torch.zeros(shape, dtype=layout.dtype, device=placement.device)
    codec.decode_rows_into(items, out_keys, out_values, range(len(items)))
    flat = (layout.kv_heads, -1, layout.head_dim)
    return _cut(out_keys.view(flat), out_values.view(flat), rows, kept, full, placement.device)


def _cut(keys: torch.Tensor, values: torch.Tensor, rows: list[int], kept: list[int], full: int, device) -> DenseRun:
    """A run of whole block slots (keys, values: [kv_heads, len(rows) · full, head_dim]) with each
    block's unread tokens left out, and the positions of those kept."""
    if all(kept[i] == full for i in rows[:-1]):  # only the last block is cut: a view of the first tokens
        count = full * (len(rows) - 1) + kept[rows[-1]]
        first = torch.tensor(rows, device=device)[:, None] * full  # [blocks, 1]
        positions = (first + torch.arange(full, device=device)).view(-1)[:count]  # [tokens]
        return DenseRun(keys[:, :count], values[:, :count], rows[0] * full, positions)
    index = torch.cat([torch.arange(j * full, j * full + kept[i]) for j, i in enumerate(rows)])  # [tokens]
    positions = torch.cat([torch.arange(i * full, i * full + kept[i]) for i in rows]).to(device)  # [tokens]
    index = index.to(device)
    return DenseRun(keys.index_select(1, index), values.index_select(1, index), rows[0] * full, positions)
