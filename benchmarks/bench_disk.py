"""The disk tier next to raw file I/O of the same bytes, and its compression ratio, in one run.

Throughput: DiskTier.put of every payload then close (which syncs), against os.write of the same
payload bytes to one file then fsync; DiskTier.get of every payload (page cache dropped first),
against pread of the same bytes from that file (page cache dropped too). Both in logical bytes:
the payload bytes before compression. One row per codec registered in tiered.codecs.CODECS: the
quantizing codecs are picked up as soon as they are registered, and the header line says which
exist. Payloads are synthetic KV with outlier key channels ([kv_heads, 64 tokens, head_dim] fp16).

Compression: the ratio of plain zstd on the whole payload, of byte-shuffle + zstd per plane (what
the tier does), and 16 bits over the order-0 entropy of the two byte planes (pooled over all blocks:
what one static code per plane could reach; zstd's per-block tables can beat it a little), on synthetic
KV and, with --model-kv, on KV the default model (SmolLM2-135M) computes for a text.

    python benchmarks/bench_disk.py               # 128 MiB per codec and shape, best of 3 runs
    python benchmarks/bench_disk.py --quick       # 32 MiB, one run
    python benchmarks/bench_disk.py --model-kv    # also the default model's KV (loads it: ~30 s)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from tiered import CODECS, BlockKey, Encoded, KVBlock, make_codec
from tiered.disk import DiskTier
from tiered.disk.compress import Packer

BLOCK_TOKENS = 64
SHAPES = [(3, 64), (8, 128)]  # (kv_heads, head_dim): SmolLM2-135M, and a Llama-8B-like layer
DISTINCT_BLOCKS = 32  # payloads cycle through this many distinct blocks


def synthetic_kv(kv_heads: int, head_dim: int, seed: int) -> KVBlock:
    """Keys with a few outlier channels (large, offset, as real keys have), values without.

    keys, values: [kv_heads, BLOCK_TOKENS, head_dim] fp16.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (kv_heads, BLOCK_TOKENS, head_dim)
    scale = torch.ones(kv_heads, 1, head_dim)  # [kv_heads, 1, head_dim]
    outliers = torch.randint(0, head_dim, (kv_heads, max(1, head_dim // 16)), generator=g)
    scale.scatter_(2, outliers.unsqueeze(1), 12.0)
    keys = torch.randn(shape, generator=g) * scale + 0.5 * (scale - 1)
    values = torch.randn(shape, generator=g) * 0.5
    return KVBlock(keys.half(), values.half())


def codecs() -> dict[str, object]:
    out = {}
    for name in sorted(CODECS):
        try:
            out[name] = make_codec(name)
        except (TypeError, ValueError) as err:  # a codec that needs arguments: say so, skip it
            print(f"# codec {name!r} skipped: {err}")
    return out


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_io(payloads: list[np.ndarray], count: int, directory: Path) -> tuple[float, float]:
    """Seconds to write `count` payloads (cycled) to one file and fsync it; to read them back cold."""
    path = directory / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.perf_counter()
    for i in range(count):
        os.write(fd, payloads[i % len(payloads)])
    os.fsync(fd)
    write_s = time.perf_counter() - start
    os.close(fd)
    drop_cache([path])
    fd = os.open(path, os.O_RDONLY)
    offset = 0
    start = time.perf_counter()
    for i in range(count):
        n = payloads[i % len(payloads)].nbytes
        data = os.pread(fd, n, offset)
        assert len(data) == n
        offset += n
    read_s = time.perf_counter() - start
    os.close(fd)
    path.unlink()
    return write_s, read_s


def tier_io(encoded: list[Encoded], count: int, directory: Path, level: int, threads: int) -> tuple[float, float, float, int]:
    """Seconds to put `count` payloads and close (sync + snapshot); to reopen; to get them all cold.

    Also the bytes of the segment files.
    """
    tier_dir = directory / "tier"
    keys = [BlockKey("bench", 0, i) for i in range(count)]
    capacity = 2 * count * (encoded[0].nbytes + 4096)
    tier = DiskTier(tier_dir, capacity, codec=encoded[0].codec, zstd_level=level, zstd_threads=threads)
    start = time.perf_counter()
    for i, key in enumerate(keys):
        tier.put(key, encoded[i % len(encoded)])
    tier.close()
    write_s = time.perf_counter() - start
    segments = sorted(tier_dir.glob("seg-*.log"))
    stored = sum(p.stat().st_size for p in segments)
    drop_cache(segments)
    start = time.perf_counter()
    tier = DiskTier(tier_dir, capacity, codec=encoded[0].codec, zstd_level=level)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    for key in keys:
        assert tier.get(key) is not None
    read_s = time.perf_counter() - start
    tier.close()
    shutil.rmtree(tier_dir)
    return write_s, open_s, read_s, stored


def entropy_bits(plane: np.ndarray) -> float:
    counts = np.bincount(plane, minlength=256).astype(np.float64)
    p = counts[counts > 0] / plane.size
    return float(-(p * np.log2(p)).sum())


def ratios(payloads: list[np.ndarray], level: int) -> tuple[float, float, float]:
    """(plain zstd, byte-shuffle + zstd per plane, 16 / order-0 entropy of the two pooled planes)."""
    cctx = zstandard.ZstdCompressor(level=level)
    packer = Packer(level)
    total = sum(p.nbytes for p in payloads)
    plain = sum(min(len(cctx.compress(p)), p.nbytes) for p in payloads)
    shuffled = sum(packer.pack(p, 2, "raw").stored_len for p in payloads)
    planes = np.concatenate(payloads).reshape(-1, 2).T  # [2, elements]
    bound_bits = sum(entropy_bits(np.ascontiguousarray(plane)) for plane in planes)
    return total / plain, total / shuffled, 16 / bound_bits


def model_kv(tokens: int) -> list[np.ndarray]:
    """Raw fp16 payloads of the KV SmolLM2-135M computes for the first `tokens` tokens of the shipped text."""
    from importlib import resources

    from runtime import load_model
    from runtime.model import DenseKV

    model = load_model()
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = torch.tensor(model.tokenizer.encode(text[: tokens * 8])[:tokens])
    cache = DenseKV.for_model(model, capacity_tokens=len(ids))
    model.forward(ids, torch.arange(len(ids)), cache)
    raw = make_codec("raw")
    out = []
    for layer in range(model.config.num_layers):
        keys, values = cache.keys(layer).half(), cache.values(layer).half()  # [kv_heads, tokens, head_dim]
        for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            block = KVBlock(keys[:, start : start + BLOCK_TOKENS].contiguous(), values[:, start : start + BLOCK_TOKENS].contiguous())
            out.append(raw.encode(block).payload.numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, default=128, help="logical MiB written per codec and shape")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is kept")
    parser.add_argument("--level", type=int, default=1, help="zstd level")
    parser.add_argument("--threads", type=int, default=0, help="zstd worker threads (planes >= 1 MiB)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--model-kv", action="store_true", help="also the ratio on SmolLM2-135M's KV")
    args = parser.parse_args()
    mib = 32 if args.quick else args.mib
    repeats = 1 if args.quick else args.repeats
    available = codecs()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, zstd level {args.level}, "
          f"threads {args.threads}; codecs registered: {sorted(CODECS)}"
          + ("" if len(CODECS) > 1 else " (the quantizing codecs are not registered yet: rows for them appear once they are)"))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        print(f"# files in {directory}; {mib} MiB per row, best of {repeats}; reads are cold (page cache dropped)")
        print(f"{'block':>10} {'codec':>10} {'KiB':>6} {'stored':>7} {'put MB/s':>9} {'raw write':>9} {'ratio':>6} "
              f"{'get MB/s':>9} {'raw read':>9} {'ratio':>6} {'open s':>7}")
        for kv_heads, head_dim in SHAPES:
            blocks = [synthetic_kv(kv_heads, head_dim, seed) for seed in range(DISTINCT_BLOCKS)]
            for name, codec in available.items():
                encoded = [codec.encode(block) for block in blocks]
                payloads = [e.payload.numpy() for e in encoded]
                nbytes = payloads[0].nbytes
                count = max(64, (mib << 20) // nbytes)
                logical = count * nbytes
                raw_runs, tier_runs = [], []
                for _ in range(repeats):  # alternate, and keep each side's best: the machine may be busy
                    raw_runs.append(raw_io(payloads, count, directory))
                    tier_runs.append(tier_io(encoded, count, directory, args.level, args.threads))
                raw_w, raw_r = min(r[0] for r in raw_runs), min(r[1] for r in raw_runs)
                put_s, open_s, get_s = (min(r[i] for r in tier_runs) for i in range(3))
                stored = tier_runs[0][3]
                mbs = lambda seconds: logical / seconds / 1e6  # noqa: E731
                print(f"{kv_heads:>3}x64x{head_dim:<4} {name:>10} {nbytes / 1024:>6.1f} {logical / stored:>7.3f} "
                      f"{mbs(put_s):>9.0f} {mbs(raw_w):>9.0f} {raw_w / put_s:>6.2f} "
                      f"{mbs(get_s):>9.0f} {mbs(raw_r):>9.0f} {raw_r / get_s:>6.2f} {open_s:>7.3f}")
    print()
    print(f"{'fp16 KV':>28} {'blocks':>7} {'plain zstd':>11} {'shuffle+zstd':>13} {'order-0 H':>10}")
    for kv_heads, head_dim in SHAPES:
        payloads = [make_codec("raw").encode(synthetic_kv(kv_heads, head_dim, 1000 + s)).payload.numpy() for s in range(64)]
        plain, shuffled, bound = ratios(payloads, args.level)
        print(f"{f'synthetic {kv_heads}x64x{head_dim}':>28} {len(payloads):>7} {plain:>11.3f} {shuffled:>13.3f} {bound:>10.3f}")
    if args.model_kv:
        payloads = model_kv(tokens=1024)
        plain, shuffled, bound = ratios(payloads, args.level)
        print(f"{'SmolLM2-135M (3x64x64)':>28} {len(payloads):>7} {plain:>11.3f} {shuffled:>13.3f} {bound:>10.3f}")


if __name__ == "__main__":
    main()
