"""The record format and payload compression of the disk tier, byte for byte."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch

from tests.tiered.disk_helpers import encoded_for, matches
from tiered import BlockKey
from tiered.disk import DiskTier
from tiered.disk.compress import FAILS_BEFORE_SKIP, SKIP_PAYLOADS, Packer, shuffle_width, unpack
from tiered.disk.record import (DEAD_MAGIC, FIXED, LIVE_MAGIC, MAX_PAYLOAD_BYTES, RecordError, RecordHeader,
                                pack_header, parse_fixed, parse_header, parse_record, payload_checksum)


def header_for(payload: bytes, seq: int = 7, **overrides) -> RecordHeader:
    fields = dict(key=BlockKey("ns/é", 3, 9), codec="int4:g64", dtype=torch.bfloat16, shape=(2, 16, 32), flags=0,
                  width=1, stored_len=len(payload), raw_len=len(payload), seq=seq, payload_sum=payload_checksum(payload))
    fields.update(overrides)
    return RecordHeader(**fields)


def test_record_round_trips_and_every_byte_is_covered_by_a_checksum():
    payload = bytes(range(256)) * 3
    header = header_for(payload)
    record = pack_header(header) + payload
    assert len(record) == header.length and len(pack_header(header)) == header.header_len
    parsed, stored = parse_record(record)
    assert parsed == header and bytes(stored) == payload
    for i in range(4, len(record)):  # flipping any bit after the magic is detected
        damaged = bytearray(record)
        damaged[i] ^= 1 << (i % 8)
        with pytest.raises(RecordError):
            parse_record(bytes(damaged))
    for i in range(4):  # and in the magic too
        damaged = bytearray(record)
        damaged[i] ^= 0x10
        with pytest.raises(RecordError, match="magic"):
            parse_record(bytes(damaged))


def test_a_dead_record_still_parses_its_header_but_is_never_served():
    payload = b"x" * 100
    record = DEAD_MAGIC + (pack_header(header_for(payload)) + payload)[4:]
    fixed = parse_fixed(record)
    assert fixed.dead and parse_header(fixed, record).seq == 7
    with pytest.raises(RecordError, match="dead"):
        parse_record(record)
    assert sum(a != b for a, b in zip(np.unpackbits(np.frombuffer(LIVE_MAGIC, np.uint8)),
                                      np.unpackbits(np.frombuffer(DEAD_MAGIC, np.uint8)))) == 8


def test_torn_records_are_detected():
    payload = b"y" * 500
    record = pack_header(header_for(payload)) + payload
    for cut in (10, FIXED.size - 1, FIXED.size + 3, len(record) - 1):
        with pytest.raises(RecordError, match="torn"):
            parse_record(record[:cut])


@pytest.mark.parametrize("field, value", [(12, MAX_PAYLOAD_BYTES + 1), (13, 0xFFFFFFFF), (4, 0), (6, 200), (9, 0)])
def test_absurd_lengths_are_rejected_before_anything_is_read(field, value):
    fields = list(FIXED.unpack(pack_header(header_for(b"z" * 64))[: FIXED.size]))
    fields[field] = value
    with pytest.raises(RecordError, match="absurd"):
        parse_fixed(FIXED.pack(*fields))


def test_a_header_claiming_a_huge_payload_allocates_nothing_for_it(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20)
    key = BlockKey("s", 0, 0)
    tier.put(key, encoded_for(key))
    tier.close()
    (tmp_path / "INDEX.snapshot").unlink()
    huge = header_for(b"", stored_len=MAX_PAYLOAD_BYTES, raw_len=MAX_PAYLOAD_BYTES)  # valid checksum
    with open(tmp_path / "seg-0000000001.log", "ab") as f:
        f.write(pack_header(huge) + b"only a few bytes")
    tracemalloc.start()
    try:
        tier = DiskTier(tmp_path, 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 8 << 20, f"opening allocated {peak} bytes for a header that claims 1 GiB"
        assert tier.counters.damaged_records == 1 and matches(tier.get(key), key) and len(tier) == 1
    finally:
        tier.close()


@pytest.mark.parametrize("codec, dtype, width", [
    ("raw", torch.float16, 2), ("raw", torch.bfloat16, 2), ("raw", torch.float32, 1),
    ("fp16", torch.float32, 2), ("bf16", torch.float16, 2), ("fp8", torch.float16, 1),
    ("int8", torch.float16, 1), ("int4:g64", torch.bfloat16, 1), ("int2", torch.float16, 1),
])
def test_only_16_bit_float_payloads_are_byte_shuffled(codec, dtype, width):
    assert shuffle_width(codec, dtype) == width


def test_byte_shuffle_helps_fp16_and_unpack_restores_the_exact_bytes():
    payload = encoded_for(BlockKey("s", 0, 1), tokens=64).payload.numpy()  # fp16 KV, 16 KiB
    shuffled = Packer(level=1).pack(payload, 2, "raw")
    plain = Packer(level=1).pack(payload, 1, "raw")
    assert shuffled.compressed and shuffled.stored_len < plain.stored_len < payload.nbytes
    for packed, width in ((shuffled, 2), (plain, 1)):
        stored = b"".join(bytes(memoryview(b).cast("B")) for b in packed.buffers)
        assert len(stored) == packed.stored_len
        assert np.array_equal(unpack(memoryview(stored), width, payload.nbytes), payload)


def test_a_payload_that_does_not_shrink_is_stored_raw_and_later_ones_skip_trying():
    rng = np.random.default_rng(0)
    packer = Packer(level=1)
    for _ in range(FAILS_BEFORE_SKIP):
        packed = packer.pack(rng.integers(0, 256, 4096, dtype=np.uint8), 1, "int8")
        assert not packed.compressed and packed.stored_len == 4 + 4096
    zeros = np.zeros(4096, dtype=np.uint8)  # compressible, but int8 payloads are not tried for a while
    assert all(not packer.pack(zeros, 1, "int8").compressed for _ in range(SKIP_PAYLOADS))
    assert packer.pack(zeros, 1, "int8").compressed  # probed again
    assert packer.pack(zeros, 1, "int4").compressed  # other kinds were never skipped


def test_unpack_rejects_stored_forms_that_do_not_add_up():
    payload = np.arange(1000, dtype=np.uint16).view(np.uint8)
    packed = Packer(level=1).pack(payload, 2, "raw")
    stored = bytearray(b"".join(bytes(memoryview(b).cast("B")) for b in packed.buffers))
    with pytest.raises(RecordError):
        unpack(memoryview(bytes(stored[:-1])), 2, payload.nbytes)
    with pytest.raises(RecordError):
        unpack(memoryview(bytes(stored) + b"\0"), 2, payload.nbytes)
    with pytest.raises(RecordError):
        unpack(memoryview(bytes(stored)), 2, payload.nbytes + 2)  # frames declare the true size
    table = list(struct.unpack_from("<2I", stored))
    table[0] += 1
    with pytest.raises(RecordError):
        unpack(memoryview(struct.pack("<2I", *table) + bytes(stored[8:])), 2, payload.nbytes)
