"""Sessions record their own request trace (Session(recorder=...)): one line per extend +
generate turn, hash_ids the store's block digests. Two stores stand for two replicas; each
request is a new session over the whole history, dealt round-robin, as a stateless server
serves them. Simulating the recorded trace with the same routing and room for every block hits
exactly the blocks the sessions reused.

The workload keeps each turn's output inside the input's last partial block: a block completed
by generated tokens is cached by the runtime but, in Mooncake's format, not named by the request.
"""

from __future__ import annotations

import json
import random

import pytest

from runtime import Session, load_model
from runtime.session import model_store_config
from runtime.simulate import SimConfig, load_profile, read_trace, simulate
from runtime.trace_recorder import TraceRecorder
from tiered import StoreConfig, TieredStore

from .tiny_models import write_hf_dir

BLOCK_TOKENS, NEW_TOKENS = 16, 6
CONFIG = StoreConfig(device="cpu", device_bytes=16 << 20, host_bytes=16 << 20, block_tokens=BLOCK_TOKENS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    write_hf_dir(directory, "llama", seed=3)
    return load_model(directory)


def message(rng: random.Random, history: list[int], length: int) -> list[int]:
    """`length` or a few more random tokens, so that history + message ends 1 token into a block."""
    extra = (1 - len(history) - length) % BLOCK_TOKENS
    return [rng.randrange(3, 500) for _ in range(length + extra)]


def test_recorded_session_turns_simulate_to_the_reuse_measured(tiny, tmp_path):
    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(40)]
    histories = {c: list(system) for c in range(3)}
    stores = [TieredStore(model_store_config(tiny, CONFIG)) for _ in range(2)]
    reused_tokens, index = 0, 0
    try:
        with TraceRecorder(tmp_path / "trace.jsonl", block_tokens=BLOCK_TOKENS) as recorder:
            for turn in range(3):
                for c in range(3):
                    with Session(tiny, store=stores[index % 2], recorder=recorder) as session:
                        session.extend(histories[c] + message(rng, histories[c], 21))
                        session.generate(NEW_TOKENS, stop=[])
                        reused_tokens += session.stats()["reused_tokens"]
                        histories[c] = list(session.tokens)
                    index += 1
    finally:
        for store in stores:
            store.close()
    lines = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and all(line["output_length"] == NEW_TOKENS for line in lines)
    assert all(line["input_length"] % BLOCK_TOKENS == 1 for line in lines)
    assert [line["timestamp"] for line in lines] == sorted(line["timestamp"] for line in lines)
    assert sum(line["reused_tokens"] for line in lines) == reused_tokens > 0
    trace = read_trace(tmp_path / "trace.jsonl")  # the trace names its block size: 16, not Mooncake's 512
    assert trace.block_tokens == BLOCK_TOKENS
    row = simulate(trace, SimConfig(workers=2, device_blocks=10_000, routing="round-robin"), load_profile("cpu-local"))
    assert row["hit_blocks"] * BLOCK_TOKENS == reused_tokens
    assert row["hit_blocks"] < row["blocks"]


def test_a_turn_without_generate_is_recorded_with_no_output(tiny, tmp_path):
    with (
        TraceRecorder(tmp_path / "t.jsonl", block_tokens=BLOCK_TOKENS) as recorder,
        Session(tiny, CONFIG, recorder=recorder) as session,
    ):
        session.extend(list(range(3, 40)))
        session.extend(list(range(3, 10)))  # the first turn ends here, with no output
        session.generate(2, stop=[])
    first, second = (json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines())
    assert (first["input_length"], first["output_length"]) == (37, 0)
    assert (second["input_length"], second["output_length"]) == (44, 2)
    assert second["hash_ids"][:2] == first["hash_ids"][:2] and len(second["hash_ids"]) == 2
    assert first["session"] == second["session"] and second["ttft_s"] > 0


def test_a_recorder_of_another_block_size_is_refused(tiny, tmp_path):
    with (
        TraceRecorder(tmp_path / "t.jsonl", block_tokens=512) as recorder,
        pytest.raises(ValueError, match="recorder counts blocks of 512"),
    ):
        Session(tiny, CONFIG, recorder=recorder)
