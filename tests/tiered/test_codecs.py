"""The codec contract, run over every codec in the registry."""

from __future__ import annotations

import pytest
import torch

from tiered import CODECS, Encoded, KVBlock, make_codec
from tiered.codecs import QuantizedCodec

from .codec_helpers import MAX_RELATIVE_ERROR, error_bound, formula_nbytes, outlier_block, relative_error

SHAPES = [(3, 64, 64), (8, 64, 128), (2, 1, 64), (3, 17, 64), (1, 63, 80), (2, 5, 3)]  # incl. partial blocks
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def group_of(codec) -> int:
    return codec.fmt.group if isinstance(codec, QuantizedCodec) else 0


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_shape_dtype_and_size(name, dtype):
    codec = make_codec(name)
    for seed, shape in enumerate(SHAPES):
        block = outlier_block(*shape, dtype=dtype, outliers=min(2, shape[2]), seed=seed)
        encoded = codec.encode(block)
        assert encoded.codec == codec.spec and encoded.dtype == dtype and encoded.shape == shape
        assert encoded.payload.dtype == torch.uint8 and encoded.payload.dim() == 1
        expected = formula_nbytes(name, *shape, dtype, group_of(codec))
        assert encoded.nbytes == codec.encoded_nbytes(*shape, dtype) == expected
        decoded = codec.decode(encoded, "cpu")
        assert decoded.keys.shape == decoded.values.shape == shape
        assert decoded.dtype == dtype
        codec.check(encoded)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_spec_rebuilds_an_equal_codec(name):
    codec = make_codec(name)
    again = make_codec(codec.spec)
    assert type(again) is type(codec) and again.spec == codec.spec
    block = outlier_block(2, 64, 64, seed=1)
    assert torch.equal(again.encode(block).payload, codec.encode(block).payload)


def test_raw_is_exact():
    codec = make_codec("raw")
    for dtype in DTYPES:
        block = outlier_block(3, 17, 64, dtype=dtype)
        assert codec.decode(codec.encode(block), "cpu").equal(block)


@pytest.mark.parametrize("name, target", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cast_codecs_equal_a_cast(name, target, dtype):
    codec = make_codec(name)
    block = outlier_block(3, 17, 64, dtype=dtype, seed=2)
    decoded = codec.decode(codec.encode(block), "cpu")
    assert decoded.dtype == dtype
    assert torch.equal(decoded.keys, block.keys.to(target).to(dtype))
    assert torch.equal(decoded.values, block.values.to(target).to(dtype))
    if dtype == target:
        assert decoded.equal(block)


@pytest.mark.parametrize("name", sorted(MAX_RELATIVE_ERROR))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_error_within_bounds_on_outlier_keys(name, dtype):
    codec = make_codec(name)
    block = outlier_block(8, 64, 128, dtype=dtype)
    decoded = codec.decode(codec.encode(block), "cpu")
    assert relative_error(decoded.keys, block.keys) < MAX_RELATIVE_ERROR[name]
    assert relative_error(decoded.values, block.values) < MAX_RELATIVE_ERROR[name]
    # every element within its group's bound: keys grouped per channel over tokens, values per token
    keys, values = block.keys.float(), block.values.float()
    key_error = (decoded.keys.float() - keys).abs().transpose(1, 2)
    assert (key_error <= error_bound(codec, keys.transpose(1, 2), dtype)).all()
    assert ((decoded.values.float() - values).abs() <= error_bound(codec, values, dtype)).all()


@pytest.mark.parametrize("name, margin", [("int8", 1.5), ("int4", 1.5), ("int2", 1.1)])  # measured 2.0, 1.95, 1.2
def test_per_channel_key_groups_beat_per_token_groups_on_outlier_keys(name, margin):
    """KIVI's finding: keys' outliers sit in channels, so grouping keys per channel loses less.
    The same outlier tensor as keys (per channel) and as values (per token) of one block."""
    codec = make_codec(name)
    keys = outlier_block(8, 64, 128, seed=3).keys
    decoded = codec.decode(codec.encode(KVBlock(keys, keys.clone())), "cpu")
    per_channel, per_token = relative_error(decoded.keys, keys), relative_error(decoded.values, keys)
    assert per_channel * margin < per_token, (per_channel, per_token)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encode_many_and_decode_many_equal_one_at_a_time(name):
    codec = make_codec(name)
    blocks = [outlier_block(3, tokens, 64, seed=tokens) for tokens in (64, 64, 7, 64, 1)]  # mixed shapes
    many = codec.encode_many(blocks)
    for block, encoded in zip(blocks, many):
        assert torch.equal(encoded.payload, codec.encode(block).payload)
    for decoded, encoded in zip(codec.decode_many(many, "cpu"), many):
        assert decoded.equal(codec.decode(encoded, "cpu"))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encode_into_writes_the_payload_in_place(name):
    codec = make_codec(name)
    block = outlier_block(3, 20, 64, seed=4)
    out = torch.full((codec.encoded_nbytes(3, 20, 64, block.dtype) + 8,), 0xAB, dtype=torch.uint8)
    encoded = codec.encode_into(block, out[:-8])
    assert encoded.payload.data_ptr() == out.data_ptr()
    assert torch.equal(out[:-8], codec.encode(block).payload)
    assert (out[-8:] == 0xAB).all()  # nothing written past the payload


@pytest.mark.parametrize("name", ["int8", "int4", "int2", "fp8"])
def test_encode_many_into_sorts_unlike_blocks_and_writes_nothing_for_a_bad_buffer(name):
    codec = make_codec(name)
    blocks = [outlier_block(3, 64, 64, seed=1), outlier_block(3, 64, 64, seed=2)]
    # channels not contiguous: [heads, dim, tokens] tensors seen as [heads, tokens, dim]
    keys, values = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (blocks[1].keys, blocks[1].values))
    assert keys.stride(-1) != 1
    blocks += [KVBlock(keys, values), outlier_block(3, 64, 64, dtype=torch.float32, seed=3)]
    sizes = [codec.encoded_nbytes(*b.keys.shape, b.dtype) for b in blocks]
    outs = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    for encoded, block, out in zip(codec.encode_many_into(blocks, outs), blocks, outs, strict=True):
        assert encoded.payload.data_ptr() == out.data_ptr()
        assert torch.equal(out, codec.encode(block).payload)
    for bad in (torch.zeros(sizes[1] - 1, dtype=torch.uint8), torch.zeros(sizes[1], dtype=torch.int8)):
        fresh = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
        fresh[1] = bad
        with pytest.raises(ValueError, match="encode_into needs a contiguous"):
            codec.encode_many_into(blocks[:2], fresh[:2])  # alike blocks: one kernel call
        with pytest.raises(ValueError, match="encode_into needs a contiguous"):
            codec.encode_many_into(blocks, fresh)
        assert not fresh[0].any()  # nothing written before the error


@pytest.mark.parametrize("name", sorted(CODECS))
def test_decode_into_writes_only_the_given_views(name):
    codec = make_codec(name)
    block = outlier_block(4, 40, 64, seed=10)
    encoded = codec.encode(block)
    # a head-major pool of 3 slots of 64 tokens: [kv_heads, slots, tokens, head_dim]
    keys_pool = torch.zeros(4, 3, 64, 64, dtype=torch.float16)
    values_pool = torch.zeros(4, 3, 64, 64, dtype=torch.float16)
    codec.decode_into(encoded, keys_pool[:, 1, :40], values_pool[:, 1, :40])
    want = codec.decode(encoded, "cpu")
    assert torch.equal(keys_pool[:, 1, :40], want.keys) and torch.equal(values_pool[:, 1, :40], want.values)
    keys_pool[:, 1, :40] = 0
    values_pool[:, 1, :40] = 0
    assert not keys_pool.any() and not values_pool.any()  # nothing else was written
    with pytest.raises(ValueError):
        codec.decode_into(encoded, keys_pool[:, 1, :39], values_pool[:, 1, :39])


@pytest.mark.parametrize("name", sorted(CODECS))
def test_strided_blocks_encode_like_contiguous_ones(name):
    codec = make_codec(name)
    # slots of a head-major pool, as the device tier holds them: [kv_heads, slots, block_tokens, head_dim]
    pool = outlier_block(4, 3 * 64, 64, seed=5)
    keys = pool.keys.view(4, 3, 64, 64)[:, 1, :40]
    values = pool.values.view(4, 3, 64, 64)[:, 1, :40]
    strided = KVBlock(keys, values)
    assert not keys.is_contiguous()
    contiguous = KVBlock(keys.contiguous(), values.contiguous())
    assert torch.equal(codec.encode(strided).payload, codec.encode(contiguous).payload)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_check_rejects_foreign_and_wrong_size_payloads(name):
    codec = make_codec(name)
    block = outlier_block(2, 64, 64, seed=6)
    encoded = codec.encode(block)
    other = "int4:g32" if name != "int4" else "int8:g64"
    with pytest.raises(ValueError, match="written by codec"):
        codec.check(Encoded(other, encoded.dtype, encoded.shape, encoded.payload))
    for payload in (encoded.payload[:-2], torch.cat([encoded.payload, encoded.payload[:2]])):
        with pytest.raises(ValueError, match=f"must be {encoded.nbytes} bytes"):
            codec.check(Encoded(encoded.codec, encoded.dtype, encoded.shape, payload))
        with pytest.raises(ValueError, match=f"must be {encoded.nbytes} bytes"):
            codec.decode(Encoded(encoded.codec, encoded.dtype, encoded.shape, payload), "cpu")
    with pytest.raises(ValueError, match="1-D uint8"):
        codec.check(Encoded(encoded.codec, encoded.dtype, encoded.shape, encoded.payload.view(torch.int16)))
    with pytest.raises(ValueError, match="kv_heads, tokens, head_dim"):
        codec.check(Encoded(encoded.codec, encoded.dtype, (2, 64), encoded.payload))
    with pytest.raises(TypeError, match="dtype"):
        codec.check(Encoded(encoded.codec, torch.int8, encoded.shape, encoded.payload))
    with pytest.raises(TypeError, match="expected an Encoded"):
        codec.check(encoded.payload)


@pytest.mark.parametrize("name", sorted(MAX_RELATIVE_ERROR))
def test_corrupt_params_are_rejected_not_decoded(name):
    codec = make_codec(name)
    encoded = codec.encode(outlier_block(2, 64, 64, seed=7))
    sections = codec.fmt.layout(2, 64, 64).sections
    for section in ("key_scale", "value_scale"):
        offset = sections[section][0] + 6  # the fourth param of the section
        payload = encoded.payload.clone()
        payload[offset : offset + 2].view(torch.float16)[0] = float("nan")
        corrupt = Encoded(encoded.codec, encoded.dtype, encoded.shape, payload)
        with pytest.raises(ValueError, match="corrupt"):
            codec.check(corrupt)
        with pytest.raises(ValueError, match="corrupt"):
            codec.decode(corrupt, "cpu")


@pytest.mark.parametrize("name", sorted(MAX_RELATIVE_ERROR))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_blocks_cannot_be_encoded(name, bad):
    codec = make_codec(name)
    for where in ("keys", "values"):
        block = outlier_block(2, 64, 64, dtype=torch.float32, seed=8)
        getattr(block, where)[1, 5, 7] = bad
        with pytest.raises(ValueError, match="cannot quantize"):
            codec.encode(block)
        with pytest.raises(ValueError, match="cannot quantize"):
            codec.encode_many([outlier_block(2, 64, 64, dtype=torch.float32), block])


@pytest.mark.parametrize("name", ["int8", "int4", "int2"])
def test_a_min_outside_fp16_cannot_be_encoded(name):
    codec = make_codec(name)
    block = outlier_block(2, 64, 64, dtype=torch.float32, seed=9)
    block.values[0, 3, 2] = -1e6  # its group's min would be -inf in fp16
    with pytest.raises(ValueError, match=r"does not fit fp16"):
        codec.encode(block)
    block.values[0, 3, 2] = -6e4  # in range: fine
    codec.encode(block)


def test_make_codec_specs_and_errors():
    assert make_codec("int4").spec == "int4:g64"
    assert make_codec("int2").spec == "int2:g32"
    assert make_codec("int4:g32").spec == "int4:g32" == make_codec("int4", group=32).spec
    assert make_codec("fp8:g16").spec == "fp8:g16"
    assert make_codec("fp16").spec == "fp16"
    with pytest.raises(ValueError, match=r"unknown codec 'zip'; valid names: \[.*'int4'.*'raw'"):
        make_codec("zip")
    for spec in ("int4:x", "int4:g0", "int4:g-3", "int4:g32:g16", "raw:g32", "fp16:g8"):
        with pytest.raises(ValueError, match="codec spec"):
            make_codec(spec)
    with pytest.raises(ValueError, match="codec spec"):
        make_codec("int4:g32", group=16)
    with pytest.raises(ValueError, match="group size must be >= 1"):
        make_codec("int8", group=0)
    with pytest.raises(TypeError, match="group size must be int"):
        make_codec("int8", group=2.5)
    with pytest.raises(TypeError, match="codec name must be str"):
        make_codec(4)
