"""Reading a sequence's blocks joined along tokens: views of the device pool when the blocks sit in
consecutive slots, a gathered copy otherwise (blocks below the device decoded where they are)."""

from __future__ import annotations

import torch

from .block import BlockKey
from .placement import DEVICE, Placement


def read_joined(placement: Placement, keys: list[BlockKey], touch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `keys` joined along tokens: two [kv_heads, tokens, head_dim] tensors.

    Only the last block may be partial. A key not stored raises KeyError. Every read counts as a
    hit of its tier; with `touch`, also as an access for the eviction policy.
    """
    layout, device = placement.layout, placement.device_tier
    if not keys:
        raise ValueError("reading needs at least one key")
    views = _device_run(placement, keys, touch)
    if views is not None:
        return views
    tiers, slots, tokens = [], [], []
    for key in keys:
        t = placement.where.get(key)
        if t is None:
            raise KeyError(f"{key} is not stored")
        tiers.append(t)
        tokens.append(placement.stats[t][key].tokens)
        slots.append(device.slot_of(key)[0] if t == DEVICE else -1)
    if layout is None:  # a store reopened over its disk tier: the first promotion sets the layout
        placement.promote(keys[0], tiers[0])
        return read_joined(placement, keys, touch)
    full = layout.block_tokens
    if any(n != full for n in tokens[:-1]):
        raise ValueError("only the last block read may be partial")
    for t in tiers:
        placement.counters[t].hits += 1
    if touch:
        step = placement.tick()
        for key, t in zip(keys, tiers):
            placement.touch(key, t, step)
    total = full * (len(keys) - 1) + tokens[-1]
    return _gather(placement, keys, tiers, slots, total)


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
    placement.counters[DEVICE].hits += len(keys)
    if touch:
        step = placement.tick()
        for key in keys:
            placement.touch(key, DEVICE, step)
    total = full * (len(keys) - 1) + last[1]
    heads, dim, run = layout.kv_heads, layout.head_dim, slice(first[0], last[0] + 1)
    # views: [kv_heads, blocks * block_tokens, head_dim], cut to the tokens stored
    return (
        device.keys_pool[:, run].reshape(heads, -1, dim)[:, :total],
        device.values_pool[:, run].reshape(heads, -1, dim)[:, :total],
    )


def _gather(
    placement: Placement, keys: list[BlockKey], tiers: list[int], slots: list[int], total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    layout, device, target = placement.layout, placement.device_tier, placement.device
    heads, dim = layout.kv_heads, layout.head_dim
    if DEVICE == max(tiers):  # every block on the device: one gather, no staging copy
        chosen = torch.tensor(slots, device=target)
        gathered_keys = device.keys_pool.index_select(1, chosen)  # [kv_heads, blocks, block_tokens, head_dim]
        gathered_values = device.values_pool.index_select(1, chosen)
        return gathered_keys.view(heads, -1, dim)[:, :total], gathered_values.view(heads, -1, dim)[:, :total]
    shape = (layout.kv_heads, len(keys), layout.block_tokens, layout.head_dim)
    # gathered keys, values: [kv_heads, blocks, block_tokens, head_dim]
    out_keys = torch.empty(shape, dtype=layout.dtype, device=target)
    out_values = torch.empty(shape, dtype=layout.dtype, device=target)
    on_device = [i for i, t in enumerate(tiers) if t == DEVICE]
    if on_device:
        positions = torch.tensor(on_device, device=target)
        chosen = torch.tensor([slots[i] for i in on_device], device=target)
        out_keys.index_copy_(1, positions, device.keys_pool.index_select(1, chosen))
        out_values.index_copy_(1, positions, device.values_pool.index_select(1, chosen))
    for t in sorted(set(tiers) - {DEVICE}):  # each lower tier's blocks decoded in one batch, in place
        rows = [i for i, tier in enumerate(tiers) if tier == t]
        items = [placement.tiers[t].get(keys[i]) for i in rows]
        for i, item in zip(rows, items):
            if item is None:  # damaged below: a miss, never wrong data
                placement.forget([keys[i]], t)
                raise KeyError(f"{keys[i]} could not be read back from the {placement.tiers[t].name} tier")
        placement.codecs[t].decode_many_into(
            items,
            [out_keys[:, i, : item.shape[1]] for i, item in zip(rows, items)],
            [out_values[:, i, : item.shape[1]] for i, item in zip(rows, items)],
        )
    return out_keys.view(heads, -1, dim)[:, :total], out_values.view(heads, -1, dim)[:, :total]
