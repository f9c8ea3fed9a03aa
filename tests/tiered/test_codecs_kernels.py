"""The fast kernels write the reference's bytes, bit for bit: the fused CPU path, its portable
build, and the Triton kernels (through Triton's interpreter here, on the device when CUDA is there)."""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiered import KVBlock, StoreConfig, TieredStore, BlockKey, make_codec
from tiered.codecs import cpu_kernels, reference, triton_kernels
from tiered.codecs.layout import QuantFormat

from ..conftest import cuda
from .codec_helpers import outlier_block

ROOT = Path(__file__).resolve().parents[2]
FORMATS = [  # every code width and kind; default, small, ragged and larger-than-axis groups
    QuantFormat("int", 8, 64), QuantFormat("int", 4, 64), QuantFormat("int", 2, 32), QuantFormat("fp8", 8, 64),
    QuantFormat("int", 4, 5), QuantFormat("int", 2, 128), QuantFormat("int", 8, 16), QuantFormat("fp8", 8, 7),
]
SHAPES = [(3, 64, 64), (8, 64, 128), (1, 1, 64), (2, 63, 64), (2, 7, 80), (1, 33, 3), (4, 2, 1), (2, 64, 17)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def special_values(shape: tuple[int, int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian values in channels scaled over orders of magnitude, with what breaks kernels mixed
    in: zeros of both signs, ones, constant runs, fp16 subnormals, values near fp16's largest.
    [kv_heads, tokens, head_dim]"""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape[2], generator=generator) * 2)
    flat = x.view(-1)
    picks = torch.randint(0, flat.numel(), (5, max(1, flat.numel() // 16)), generator=generator)
    flat[picks[0]] = 0.0
    flat[picks[1]] = -0.0
    flat[picks[2]] = 3e-7 * torch.randn(picks.shape[1], generator=generator)  # fp16 subnormal
    flat[picks[3]] = 6.0e4 * torch.sign(torch.randn(picks.shape[1], generator=generator))
    flat[picks[4]] = 1.0
    if shape[1] > 2:
        x[:, 1:3] = 0.25  # two constant tokens: constant groups along channels
    return x.to(dtype)


def reference_and_fast(fmt, keys, values):
    nbytes = fmt.layout(*keys[0].shape).nbytes
    expected = [torch.zeros(nbytes, dtype=torch.uint8) for _ in keys]
    got = [torch.full((nbytes,), 0xA5, dtype=torch.uint8) for _ in keys]  # every byte must be written
    reference.encode(fmt, keys, values, expected)
    cpu_kernels.encode(fmt, keys, values, got)
    return expected, got


def decoded_both_ways(fmt, payloads, shape, dtype):
    out = [[torch.full(shape, 7.0, dtype=dtype) for _ in payloads] for _ in range(4)]
    reference.decode(fmt, payloads, out[0], out[1])
    cpu_kernels.decode(fmt, payloads, out[2], out[3])
    return out[0] + out[1], out[2] + out[3]


def test_the_cpu_kernels_build_here():
    assert cpu_kernels.available(), cpu_kernels.build_error()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernels_equal_the_reference_bit_for_bit(fmt, dtype):
    for seed, shape in enumerate(SHAPES):
        keys = [special_values(shape, dtype, seed), outlier_block(*shape, dtype=dtype, outliers=1, seed=seed).keys]
        values = [special_values(shape, dtype, seed + 100), torch.randn(shape).to(dtype)]
        expected, got = reference_and_fast(fmt, keys, values)
        for e, g in zip(expected, got):
            assert torch.equal(e, g), (shape, (e != g).nonzero().flatten()[:8])
        want, have = decoded_both_ways(fmt, expected, shape, dtype)
        for w, h in zip(want, have):
            assert torch.equal(w, h), (shape, (w != h).sum())


def test_cpu_kernels_take_strided_views_and_large_batches():
    fmt = QuantFormat("int", 4, 64)
    slots = 12
    # a head-major pool: [kv_heads, slots, tokens, head_dim]; blocks are views of its slots
    pool = special_values((4, slots * 64, 128), torch.float16, 1).view(4, slots, 64, 128)
    keys = [pool[:, s] for s in range(0, slots, 2)]
    values = [pool[:, s] for s in range(1, slots, 2)]
    assert not keys[0].is_contiguous()
    assert 2 * sum(k.nbytes for k in keys) >= cpu_kernels.PARALLEL_MIN_BYTES  # split over threads
    expected, got = reference_and_fast(fmt, keys, values)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    # decoding into strided views of a pool writes only those views
    out_pool = torch.zeros(4, slots + 1, 64, 128, dtype=torch.float16)
    cpu_kernels.decode(fmt, expected, [out_pool[:, s] for s in range(0, slots, 2)], [out_pool[:, s] for s in range(1, slots, 2)])
    want = [torch.empty(4, 64, 128, dtype=torch.float16) for _ in range(slots)]
    reference.decode(fmt, expected, want[0::2], want[1::2])
    assert all(torch.equal(out_pool[:, s], want[s]) for s in range(slots))
    assert (out_pool[:, slots] == 0).all()


@pytest.mark.parametrize("name", ["int8", "int4", "int2", "fp8", "raw", "fp16"])
def test_decoding_into_block_slots_equals_decoding_each_block(name):
    """decode_rows_into (the gather of a decode step) writes block i into slot rows[i] exactly as
    decode_into writes it, a partial block into its slot's first tokens, and nothing else."""
    codec = make_codec(name)
    full = [KVBlock(special_values((3, 64, 64), torch.float32, s), special_values((3, 64, 64), torch.float32, s + 50))
            for s in range(6)]
    partial = KVBlock(full[0].keys[:, :13].clone(), full[0].values[:, :13].clone())
    encoded = codec.encode_many([*full, partial])
    rows = [5, 0, 7, 2, 3, 6, 1]  # out of order; slot 4 is left alone
    keys_out = torch.full((3, 8, 64, 64), 7.0)  # [kv_heads, slots, block_tokens, head_dim]
    values_out = torch.full((3, 8, 64, 64), 7.0)
    codec.decode_rows_into(encoded, keys_out, values_out, rows)
    for item, row in zip(encoded, rows):
        want = codec.decode(item, "cpu")
        tokens = item.shape[1]
        assert torch.equal(keys_out[:, row, :tokens], want.keys) and torch.equal(values_out[:, row, :tokens], want.values)
        assert (keys_out[:, row, tokens:] == 7.0).all()
    assert (keys_out[:, 4] == 7.0).all() and (values_out[:, 4] == 7.0).all()


def test_decoding_into_block_slots_refuses_what_does_not_fit():
    codec = make_codec("int8")
    encoded = codec.encode_many([KVBlock(torch.randn(3, 64, 64), torch.randn(3, 64, 64)) for _ in range(2)])
    out = torch.zeros(3, 4, 64, 64)
    for rows, words in (([0, 0], "distinct"), ([0, 4], r"in \[0, 4\)"), ([1], "2 payloads for 1 rows")):
        with pytest.raises(ValueError, match=words):
            codec.decode_rows_into(encoded, out, out.clone(), rows)
    with pytest.raises(ValueError, match="does not fit a slot"):
        codec.decode_rows_into(encoded, torch.zeros(3, 4, 32, 64), torch.zeros(3, 4, 32, 64), [0, 1])
    with pytest.raises(ValueError, match="does not fit a slot"):
        codec.decode_rows_into(encoded, out.half(), out.half(), [0, 1])
    with pytest.raises(ValueError, match="written by codec"):
        make_codec("int4").decode_rows_into(encoded, out, out.clone(), [0, 1])
    damaged = encoded[1].payload.clone()
    layout = codec.fmt.layout(3, 64, 64)
    reference.param_views(damaged, layout, "key")[1].fill_(float("nan"))  # a scale no encoder writes
    corrupt = type(encoded[1])(encoded[1].codec, encoded[1].dtype, encoded[1].shape, damaged)
    with pytest.raises(ValueError, match="payload 1 of this batch"):
        codec.decode_rows_into([encoded[0], corrupt], out, out.clone(), [0, 1])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips_every_code_value(bits):
    levels = 1 << bits
    # every code in every position of a byte, and every byte value
    codes = torch.tensor(list(itertools.product(range(levels), repeat=8 // bits)), dtype=torch.uint8).flatten()
    packed = reference.pack(codes, bits)
    assert packed.numel() == codes.numel() * bits // 8
    assert torch.equal(reference.unpack(packed, bits, codes.numel()), codes)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(reference.pack(reference.unpack(every_byte, bits, 256 * 8 // bits), bits), every_byte)
    assert torch.equal(reference.pack(codes[:5], bits), reference.pack(torch.cat([codes[:5], codes.new_zeros(3)]), bits)[: (5 * bits + 7) // 8])


@pytest.mark.parametrize("name", ["int8", "int4", "int2", "fp8"])
def test_every_code_value_survives_encode_and_decode_exactly(name):
    """Values on the code grid come back bit for bit, with every code in the payload: int codes
    0..q at step 0.25 from 0; fp8 every finite e4m3 value (max |x| = 448 makes the scale 1)."""
    fmt = make_codec(name).fmt
    if fmt.kind == "int":
        grid = torch.arange(fmt.qmax + 1, dtype=torch.float32) * 0.25
        expected_codes = torch.arange(fmt.qmax + 1, dtype=torch.int32).to(torch.uint8)
    else:
        expected_codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        expected_codes = expected_codes[(expected_codes & 0x7F) != 0x7F]  # all but the two NaNs
        grid = expected_codes.view(torch.float8_e4m3fn).float()
    levels = grid.numel()
    codec = make_codec(f"{name}:g{levels}")  # one group spans the grid on both axes
    # keys vary along tokens (grouped per channel), values along channels (grouped per token)
    block = KVBlock(grid[None, :, None].expand(2, levels, levels).half(), grid[None, None, :].expand(2, levels, levels).half())
    for kernels in (reference, cpu_kernels):
        payload = torch.empty(codec.encoded_nbytes(2, levels, levels, torch.float16), dtype=torch.uint8)
        kernels.encode(codec.fmt, [block.keys], [block.values], [payload])
        layout = codec.fmt.layout(2, levels, levels)
        count = 2 * levels * levels
        value_codes = reference.unpack(reference.section(payload, layout, "value_codes"), fmt.bits, count)
        key_codes = reference.unpack(reference.section(payload, layout, "key_codes"), fmt.bits, count)
        assert torch.equal(value_codes.view(2, levels, levels), expected_codes.expand(2, levels, levels))
        assert torch.equal(key_codes.view(2, levels, levels), expected_codes[None, :, None].expand(2, levels, levels))
        keys, values = torch.empty_like(block.keys), torch.empty_like(block.values)
        kernels.decode(codec.fmt, [payload], [keys], [values])
        assert torch.equal(keys, block.keys) and torch.equal(values, block.values)


def test_fp8_conversion_matches_torch_on_every_rounding_case():
    """The kernels' e4m3 conversion, on every e4m3 value, the midpoints between them (ties go to
    even) and a million random values across the whole range, equals torch's float8_e4m3fn."""
    grid = torch.arange(128, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()[:127]  # +0..448
    mids = (grid[:-1] + grid[1:]) / 2
    nudged = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 2)])
    rand = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * torch.exp2(torch.randint(-12, 9, (1 << 20,)).float())
    x = torch.cat([grid, nudged, rand.clamp(-448, 448)])
    x = torch.cat([x, -x])
    # scale 1: a group whose max |x| is 448, so codes are e4m3(x) itself
    block = torch.cat([x, torch.full(((-x.numel()) % 64,), 448.0)]).view(1, -1, 64)  # [1, rows, 64]
    block[:, :, 0] = 448.0
    fmt = QuantFormat("fp8", 8, 64)
    nbytes = fmt.layout(*block.shape).nbytes
    got, want = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    cpu_kernels.encode(fmt, [block], [block], [got])
    reference.encode(fmt, [block], [block], [want])
    assert torch.equal(got, want)
    codes = reference.section(got, fmt.layout(*block.shape), "value_codes")
    assert torch.equal(codes, block.flatten().to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("cflags", ["-DTIERED_PORTABLE", "-march=x86-64-v3"], ids=["portable", "avx2-f16c"])
def test_other_builds_equal_the_reference(tmp_path, cflags):
    """The kernels as other CPUs build them, in a child: without x86 intrinsics (ARM and the
    rest), and with AVX2 + F16C but no AVX-512. Codes equal the reference bit for bit; attention
    over them (all pages, or each head's marked pages), Quest's scores and choice, and attention
    over pool rows equal the torch code's within float tolerance."""
    if cflags.startswith("-march=x86") and platform.machine() != "x86_64":
        pytest.skip("an x86 build")
    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from tiered.codecs import cpu_kernels, reference\n"
        "from tiered.codecs.layout import QuantFormat\n"
        "assert cpu_kernels.available(), cpu_kernels.build_error()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for fmt in [QuantFormat('int', 8, 64), QuantFormat('int', 4, 64), QuantFormat('int', 2, 32), QuantFormat('fp8', 8, 64)]:\n"
        "    for dtype in (torch.float16, torch.bfloat16, torch.float32):\n"
        "        for shape in ((2, 64, 64), (1, 7, 80)):\n"
        "            k = [(torch.randn(shape, generator=g) * 30).to(dtype)]; v = [torch.randn(shape, generator=g).to(dtype)]\n"
        "            k[0].view(-1)[::97] = 3e-7\n"
        "            n = fmt.layout(*shape).nbytes\n"
        "            a, b = [torch.zeros(n, dtype=torch.uint8)], [torch.ones(n, dtype=torch.uint8)]\n"
        "            reference.encode(fmt, k, v, a); cpu_kernels.encode(fmt, k, v, b)\n"
        "            assert torch.equal(a[0], b[0]), (fmt, dtype, shape)\n"
        "            o = [[torch.empty(shape, dtype=dtype)] for _ in range(4)]\n"
        "            reference.decode(fmt, a, o[0], o[1]); cpu_kernels.decode(fmt, a, o[2], o[3])\n"
        "            assert torch.equal(o[0][0], o[2][0]) and torch.equal(o[1][0], o[3][0]), (fmt, dtype, shape)\n"
        "from tiered.codecs import attend_reference\n"
        "for fmt in [QuantFormat('int', 8, 64), QuantFormat('int', 4, 64), QuantFormat('int', 2, 32)]:\n"
        "    for shape, n in (((3, 64, 64), 1), ((1, 7, 80), 3)):\n"
        "        pays = []\n"
        "        for _ in range(3):\n"
        "            k = [torch.randn(shape, generator=g)]; v = [torch.randn(shape, generator=g)]\n"
        "            pays.append(torch.zeros(fmt.layout(*shape).nbytes, dtype=torch.uint8))\n"
        "            reference.encode(fmt, k, v, pays[-1:])\n"
        "        q = torch.randn(shape[0] * 3, n, shape[2], generator=g)\n"
        "        t, st = [shape[1]] * 3, [0, shape[1], 2 * shape[1]]\n"
        "        qpos = torch.arange(3 * shape[1] - n, 3 * shape[1]) - 5 if n > 1 else None\n"
        "        a = cpu_kernels.attend(fmt, q, pays, t, st, shape[0], qpos, 0.125)\n"
        "        b = attend_reference.attend_quantized(fmt, q, pays, t, st, shape[0], qpos, 0.125)\n"
        "        assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4), (fmt, shape)\n"
        "        if n == 1:  # pages of 16 marked: block 0's four only, as if it were alone\n"
        "            vis = torch.zeros(3, 12, dtype=torch.bool); vis[:, :4] = True\n"
        "            m = cpu_kernels.BlockTable(fmt, pays, t, st, 3, 64).attend(q, None, 0.125, visible=vis, page_tokens=16)\n"
        "            o = cpu_kernels.attend(fmt, q, pays[:1], t[:1], st[:1], 3, None, 0.125)\n"
        "            assert torch.allclose(m[0], o[0], atol=1e-5) and torch.allclose(m[1], o[1], atol=1e-5), fmt\n"
        "from policies.importance import Quest, select_per_head\n"
        "for P, H, G in ((5, 2, 3), (37, 3, 2)):\n"
        "    a, b = torch.randn(P, H, 64, generator=g), torch.randn(P, H, 64, generator=g)\n"
        "    lo, hi = torch.minimum(a, b), torch.maximum(a, b)\n"
        "    q = torch.randn(H * G, 64, generator=g)\n"
        "    s, kept = cpu_kernels.quest_select(q, lo, hi, budget_pages=4, sink_pages=1, window_pages=1)\n"
        "    assert torch.allclose(s, Quest().score(q, lo, hi), atol=1e-5), P\n"
        "    assert torch.equal(kept, select_per_head(s, budget_blocks=4, sink_blocks=1, window_blocks=1)), P\n"
        "kp, vp = torch.randn(2, 6, 16, 64, generator=g), torch.randn(2, 6, 16, 64, generator=g)\n"
        "q = torch.randn(4, 1, 64, generator=g)\n"
        "spans = [[(3, 5), (40, 17), (90, 6)], [(0, 8), (50, 13), (80, 16)]]\n"
        "first = [h * 96 + f for h, head in enumerate(spans) for f, _ in head]\n"
        "o, _ = cpu_kernels.attend_rows(q, kp, vp, first, [c for head in spans for _, c in head], 0.125)\n"
        "for h, head in enumerate(spans):\n"
        "    i = torch.cat([torch.arange(f, f + c) for f, c in head])\n"
        "    w = torch.softmax(q[2 * h:2 * h + 2, 0] @ kp[h].reshape(-1, 64)[i].T * 0.125, -1)\n"
        "    assert torch.allclose(o[2 * h:2 * h + 2, 0], w @ vp[h].reshape(-1, 64)[i], atol=1e-5), h\n"
        "print('portable ok')\n"
    )
    env = dict(os.environ, TIERED_CFLAGS=cflags, TIERED_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "portable ok" in result.stdout
    assert list(tmp_path.glob("cpu_kernels-*.so")), "the library was built in the given cache"


def test_triton_kernels_equal_the_reference_in_the_interpreter():
    """Triton's interpreter runs the CUDA kernels on the CPU, bit for bit against the reference."""
    pytest.importorskip("triton")  # in the test extra; only platforms without wheels lack it
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "tests.tiered.triton_interpret_check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("bytes equal, decoded equal") == 7, result.stdout


# -- on a CUDA device ---------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels_on_cuda_equal_the_reference(fmt, dtype):
    for seed, shape in enumerate(SHAPES):
        if not triton_kernels.supports(fmt, shape):
            continue
        keys = [special_values(shape, dtype, seed).cuda(), outlier_block(*shape, dtype=dtype, seed=seed).keys.cuda()]
        values = [special_values(shape, dtype, seed + 100).cuda(), torch.randn(shape).to(dtype).cuda()]
        nbytes = fmt.layout(*shape).nbytes
        expected = [torch.zeros(nbytes, dtype=torch.uint8) for _ in keys]
        reference.encode(fmt, [k.cpu() for k in keys], [v.cpu() for v in values], expected)
        got = [torch.full((nbytes,), 0xA5, dtype=torch.uint8, device="cuda") for _ in keys]
        triton_kernels.encode(fmt, keys, values, got)
        assert all(torch.equal(e, g.cpu()) for e, g in zip(expected, got)), (fmt, dtype, shape)
        want = [[torch.empty(shape, dtype=dtype) for _ in keys] for _ in range(2)]
        reference.decode(fmt, expected, want[0], want[1])
        have = [[torch.empty(shape, dtype=dtype, device="cuda") for _ in keys] for _ in range(2)]
        triton_kernels.decode(fmt, [e.cuda() for e in expected], have[0], have[1])
        assert all(torch.equal(w, h.cpu()) for w, h in zip(want[0] + want[1], have[0] + have[1])), (fmt, dtype, shape)


@cuda
@pytest.mark.parametrize("name", ["int8", "int4", "int2", "fp8", "fp16", "raw"])
def test_cuda_store_round_trips_through_pinned_host_memory(name):
    """Blocks spill from the device through the codec into pinned host slots (asynchronously, on
    the transfer stream) and come back equal to the CPU codec's decoding of the same block."""
    codec = make_codec(name)
    blocks = [outlier_block(3, 64, 64, seed=s) for s in range(12)] + [outlier_block(3, 9, 64, seed=12)]
    config = StoreConfig(device="cuda", device_bytes=4 * 3 * 64 * 64 * 2 * 2, host_bytes=64 << 20, host_codec=name)
    with TieredStore(config) as store:
        for i, block in enumerate(blocks):
            store.put(BlockKey("s", 0, i), KVBlock(block.keys.cuda(), block.values.cuda()))
        assert sum(store.where(BlockKey("s", 0, i)) == "host" for i in range(len(blocks))) >= 8
        for i, block in enumerate(blocks):
            got = store.get(BlockKey("s", 0, i))
            assert got.device.type == "cuda"
            assert got.to("cpu").equal(codec.decode(codec.encode(block), "cpu")) or got.to("cpu").equal(block)
