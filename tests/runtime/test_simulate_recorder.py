"""The trace recorder writes what the simulator reads, with prefix-chained block ids."""

from __future__ import annotations

import itertools

import pytest

from runtime.simulate import SimConfig, load_profile, read_trace, simulate
from runtime.trace_recorder import TraceRecorder


def test_recorded_traces_read_back_and_simulate(tmp_path):
    ticks = itertools.count(start=100.0, step=0.25)
    path = tmp_path / "rec" / "trace.jsonl"
    system = list(range(40))
    with TraceRecorder(path, block_tokens=16, clock=lambda: next(ticks)) as recorder:
        first = recorder.record(system + [7] * 10, 5, ttft_s=0.5, session="a")
        second = recorder.record(system + [8] * 30, 2, session="b")
        third = recorder.record(system + [7] * 10 + [9] * 20, 1, session="a")
        assert recorder.requests == 3
    assert first["hash_ids"] == recorder.chain_ids(system + [7] * 10) and len(first["hash_ids"]) == 3
    assert second["hash_ids"][:2] == first["hash_ids"][:2]  # the 32 tokens of the system prompt's full blocks
    assert second["hash_ids"][2] != first["hash_ids"][2]  # the third block differs in its last tokens
    assert third["hash_ids"][:3] == first["hash_ids"]
    trace = read_trace(path)
    assert trace.block_tokens == 16 and len(trace.requests) == 3
    assert [r.arrival_s for r in trace.requests] == [0.25, 0.5, 0.75]
    assert trace.requests[0].extra == {"ttft_s": 0.5, "session": "a"}
    row = simulate(trace, SimConfig(device_blocks=100), load_profile("cpu-local"))
    assert row["hit_blocks"] == 2 + 3 and row["blocks"] == 3 + 4 + 4


def test_store_digests_become_the_ids(tmp_path):
    recorder = TraceRecorder(tmp_path / "t.jsonl", block_tokens=4)
    line = recorder.record(list(range(9)), 1, block_digests=[b"\x00" * 7 + b"\x02", b"\xff" * 8])
    assert line["hash_ids"] == [1, (2**64 - 1) >> 1]
    with pytest.raises(ValueError, match="2 block digests for 1 full blocks"):
        recorder.record(list(range(5)), 1, block_digests=[b"a" * 8, b"b" * 8])
    with pytest.raises(ValueError, match="written by the recorder"):
        recorder.record([1], 1, timestamp=3)
    with pytest.raises(ValueError, match="output_tokens"):
        recorder.record([1], -1)
    recorder.close()
    with pytest.raises(ValueError, match="block_tokens"):
        TraceRecorder(tmp_path / "u.jsonl", block_tokens=0)


def test_timestamps_never_go_backwards(tmp_path):
    recorder = TraceRecorder(tmp_path / "t.jsonl", block_tokens=4, clock=lambda: 10.0)
    recorder.record([1, 2, 3, 4], 1, arrival_s=12.0)
    recorder.record([1, 2, 3, 4], 1, arrival_s=11.0)  # a request that started earlier, recorded later
    recorder.close()
    assert [r.arrival_s for r in read_trace(tmp_path / "t.jsonl").requests] == [2.0, 2.0]
