"""Reading traces: Mooncake's format, our recorded one, and clear errors on bad lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from runtime.simulate import Trace, TraceRequest, parse_trace, read_trace, write_trace
from runtime.simulate.synthetic import SyntheticTrace, synthetic_trace

DATA = Path(__file__).parent.parent / "data"
GOOD = {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]}


def lines(*records) -> list[str]:
    return [json.dumps(r) if isinstance(r, dict) else r for r in records]


def test_reads_the_shipped_slice():
    trace = read_trace(DATA / "mooncake_conversation_head.jsonl")
    assert len(trace.requests) == 300 and trace.block_tokens == 512
    first = trace.requests[0]
    assert first.arrival_s == 0.0 and first.input_tokens == 6758 and first.output_tokens == 500
    assert first.hash_ids == tuple(range(14))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace.requests, trace.requests[1:]))


def test_gzip_and_round_trip(tmp_path):
    trace = Trace([TraceRequest(0.5, 40, 3, (7, 8), {"session": "s1"}), TraceRequest(1.25, 20, 1, (7,))], 16)
    for name in ("t.jsonl", "t.jsonl.gz"):
        again = read_trace(write_trace(trace, tmp_path / name))
        assert again.requests == trace.requests and again.block_tokens == 16
        assert again.requests[0].extra == {"session": "s1"}
    with gzip.open(tmp_path / "t.jsonl.gz", "rt") as file:
        assert json.loads(file.readline())["block_tokens"] == 16


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"timestamp": 0, "input_length": 10, "hash_ids": []}, r"missing field\(s\) \['output_length'\]"),
        ({**GOOD, "timestamp": -1}, "timestamp must be"),
        ({**GOOD, "input_length": -5, "hash_ids": []}, "input_length must be a non-negative int"),
        ({**GOOD, "output_length": -1}, "output_length must be a non-negative int"),
        ({**GOOD, "input_length": 1024}, "3 hash_ids, but an input of 1024 tokens has at most 2 blocks of 512"),
        ({**GOOD, "hash_ids": [1, "x"]}, "hash_ids must be a list of ints"),
        ({**GOOD, "timestamp": "soon"}, "timestamp must be a number"),
        ({**GOOD, "block_tokens": 0}, "block_tokens must be a positive int"),
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_lines_name_their_line(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_trace(lines(GOOD, GOOD, bad), source="t.jsonl")
    assert "t.jsonl:3:" in str(err.value)


def test_unsorted_timestamps_name_the_line():
    with pytest.raises(ValueError, match=r"t.jsonl:2: timestamp 3 is earlier than the line before \(7\)"):
        parse_trace(lines({**GOOD, "timestamp": 7}, {**GOOD, "timestamp": 3}), source="t.jsonl")


def test_block_tokens_of_the_trace_and_the_caller():
    recorded = [{**GOOD, "input_length": 40, "block_tokens": 16}]
    assert parse_trace(lines(*recorded)).block_tokens == 16
    assert parse_trace(lines(GOOD)).block_tokens == 512
    assert parse_trace(lines({**GOOD, "input_length": 48}), block_tokens=16).block_tokens == 16
    with pytest.raises(ValueError, match="says block_tokens 16, but 32 was asked for"):
        parse_trace(lines(*recorded), block_tokens=32)
    with pytest.raises(ValueError, match=":2: block_tokens 8 differs from 16"):
        parse_trace(lines(*recorded, {**recorded[0], "block_tokens": 8}))
    with pytest.raises(ValueError, match="has at most 2 blocks of 32"):
        parse_trace(lines({**GOOD, "input_length": 40}), block_tokens=32)


def test_blank_lines_are_skipped_and_numbers_still_count():
    trace = parse_trace(["", json.dumps(GOOD), "  ", json.dumps({**GOOD, "timestamp": 1})])
    assert len(trace.requests) == 2
    with pytest.raises(ValueError, match="trace:3:"):
        parse_trace([json.dumps(GOOD), "", "{"])


def test_synthetic_traces_share_prefixes_and_are_reproducible():
    spec = SyntheticTrace(conversations=30, seed=4)
    trace = synthetic_trace(spec)
    assert trace.requests == synthetic_trace(spec).requests
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace.requests, trace.requests[1:]))
    assert all(len(r.hash_ids) == -(-r.input_tokens // 512) for r in trace.requests)
    firsts = {r.hash_ids[0] for r in trace.requests}
    assert len(firsts) <= spec.system_prompts  # the system prompt's first block is shared
    seen, repeated = set(), 0
    for r in trace.requests:
        repeated += sum(h in seen for h in r.hash_ids)
        seen.update(r.hash_ids)
    assert repeated / trace.blocks > 0.3
    with pytest.raises(ValueError, match="conversations"):
        SyntheticTrace(conversations=0)
