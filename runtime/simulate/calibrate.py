"""`tiered simulate --calibrate`: a hardware profile of this machine, measured with our own code.

- hbm: the device tier's memory (CPU memory on a machine without CUDA): a large tensor copy;
- host_device: blocks promoted from the host tier to the device tier of a TieredStore;
- disk: blocks promoted from the disk tier (a directory on this machine's disk);
- network: nothing crosses a network here (the shared tier is a local directory), so the link
  costs what a memory copy does;
- prefill: our Llama decoder (the default model) prefilling through a Session, timed at two
  lengths: the slope is seconds per token, the intercept the fixed cost of a prefill.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .profile import HardwareProfile, Link

BLOCK_SHAPE = (8, 64, 128)  # [kv_heads, tokens, head_dim] of the blocks moved, in fp16


def calibrate(
    path: Path,
    progress: Callable[[str], object] = print,
    model_name: str = "smollm2-135m",
    prefill_tokens: tuple[int, int] = (128, 512),
) -> Path:
    """Measure this machine, write its profile as YAML to `path`, and return the path.
    prefill_tokens: the two prompt lengths the prefill is timed at."""
    progress("measuring memory copies ...")
    hbm = _copy_link()
    progress(f"  {hbm.bytes_per_s / 1e9:.1f} GB/s")
    progress("measuring host -> device promotions through a TieredStore ...")
    host = _store_link(disk=False)
    progress(f"  {host.bytes_per_s / 1e9:.2f} GB/s, {host.latency_s * 1e6:.0f} us per block")
    progress("measuring disk -> device promotions through a TieredStore ...")
    disk = _store_link(disk=True)
    progress(f"  {disk.bytes_per_s / 1e9:.2f} GB/s, {disk.latency_s * 1e6:.0f} us per block")
    progress(f"measuring prefill of {model_name} ...")
    kv_bytes_per_token, per_token_s, overhead_s = _prefill(model_name, *prefill_tokens)
    progress(f"  {per_token_s * 1e3:.3f} ms per token, {overhead_s * 1e3:.1f} ms per prefill")
    profile = HardwareProfile(
        name="cpu-local",
        model=model_name,
        kv_bytes_per_token=kv_bytes_per_token,
        prefill_s_per_token=per_token_s,
        prefill_overhead_s=overhead_s,
        links={"hbm": hbm, "host_device": host, "network": hbm, "disk": disk},
        description=(
            f"This machine ({torch.get_num_threads()} torch threads, no accelerator: the device tier is CPU "
            f"memory), measured by `tiered simulate --calibrate` on {time.strftime('%Y-%m-%d')}. network is a "
            "memory copy: the shared tier is a local directory."
        ),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_yaml(), encoding="utf-8")
    return path


def _copy_link(nbytes: int = 256 << 20, repeats: int = 5) -> Link:
    source = torch.ones(nbytes // 4, dtype=torch.float32)  # [n]
    target = torch.empty_like(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(repeats))
    small = torch.ones(16)
    latency_s = min(_timed(lambda: small.clone()) for _ in range(50))
    return Link(bytes_per_s=2 * nbytes / best, latency_s=latency_s)  # a copy reads and writes every byte


def _store_link(disk: bool) -> Link:
    """Promotions into the device tier from the host (or disk) tier, timed for blocks of two sizes:
    the slope over bytes is the bandwidth, the intercept the cost of one transfer."""
    _promotion_s(disk, tokens=64, blocks=8, rounds=1)  # warm up: kernels compile and pools allocate on first use
    small_bytes, small_s = _promotion_s(disk, tokens=16)
    large_bytes, large_s = _promotion_s(disk, tokens=64)
    per_byte_s = max((large_s - small_s) / (large_bytes - small_bytes), large_s / large_bytes / 8)
    return Link(bytes_per_s=1.0 / per_byte_s, latency_s=max(small_s - per_byte_s * small_bytes, 0.0))


def _promotion_s(disk: bool, tokens: int, blocks: int = 64, rounds: int = 5) -> tuple[int, float]:
    """(bytes of one block, best seconds per promotion of it) through a real TieredStore."""
    from tiered import BlockKey, KVBlock, StoreConfig, TieredStore

    kv_heads, _, head_dim = BLOCK_SHAPE
    keys = torch.randn(kv_heads, tokens, head_dim).to(torch.float16)  # [kv_heads, tokens, head_dim]
    block_bytes = 2 * keys.numel() * keys.element_size()
    with tempfile.TemporaryDirectory() as directory:
        config = StoreConfig(
            device="cpu",
            device_bytes=4 * block_bytes,
            host_bytes=4 * block_bytes if disk else 4 * blocks * block_bytes,
            disk_dir=directory if disk else None,
            disk_bytes=8 * blocks * block_bytes,
            block_tokens=tokens,
        )
        with TieredStore(config) as store:
            names = [BlockKey("calibrate", 0, i) for i in range(blocks)]
            for key in names:
                store.put(key, KVBlock(keys=keys, values=keys))
            tier = "disk" if disk else "host"
            best = float("inf")
            for _ in range(rounds):  # each promotion also demotes a block, so the next round finds them below
                below = [k for k in names if store.where(k) == tier]
                best = min(best, _timed(lambda: [store.get(k) for k in below]) / max(len(below), 1))
    return block_bytes, best


def _prefill(
    model_name: str, short_tokens: int = 128, long_tokens: int = 512, repeats: int = 3
) -> tuple[int, float, float]:
    """(KV bytes per token, seconds per prefilled token, fixed seconds per prefill) of our decoder."""
    from tiered import TieredStore

    from ..model import load_model
    from ..session import Session, model_store_config

    model = load_model(model_name)
    cfg = model.config
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(torch.float32).bits // 8
    generator = torch.Generator().manual_seed(0)
    with TieredStore(model_store_config(model, None)) as store:  # one store, allocated once

        def prefill_s(tokens: int) -> float:
            ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=generator).tolist()  # fresh: nothing reused
            with Session(model, store=store) as session:
                return _timed(lambda: session.extend(ids))

        prefill_s(64)  # warm up
        short = min(prefill_s(short_tokens) for _ in range(repeats))  # the best run: the least disturbed
        long = min(prefill_s(long_tokens) for _ in range(repeats))
    per_token_s = (long - short) / (long_tokens - short_tokens)
    overhead_s = short - per_token_s * short_tokens
    if per_token_s <= 0 or overhead_s < 0 or overhead_s > short / 2:  # too noisy to split: no fixed cost
        return kv_bytes_per_token, long / long_tokens, 0.0
    return kv_bytes_per_token, per_token_s, overhead_s


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started
