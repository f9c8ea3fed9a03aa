"""Trace files: written atomically as .npz without pickle, read back exactly, bad files refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policies.trace import SyntheticConfig, synthetic_trace
from runtime.traces import load_trace, save_trace

SMALL = SyntheticConfig(
    layers=2, heads=4, kv_heads=2, head_dim=32, prompt_tokens=128, steps=6, observe_steps=2, topics=3
)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(SMALL)


def test_a_trace_round_trips_through_a_file(trace, tmp_path):
    path = save_trace(trace, tmp_path / "nested" / "run.npz")
    assert [p.name for p in path.parent.iterdir()] == ["run.npz"]  # no temporary file left behind
    again = load_trace(path)
    for name in ("query", "keys", "tokens", "block_mass"):
        assert torch.equal(getattr(again, name), getattr(trace, name))
    assert again.info == trace.info and again.scale == trace.scale and again.block_tokens == trace.block_tokens
    with np.load(path, allow_pickle=False) as archive:  # plain arrays: readable by any numpy, no pickle
        assert sorted(archive.files) == ["block_mass", "header", "keys", "query", "tokens"]
        assert json.loads(archive["header"].tobytes())["format"] == "tiered-trace"


def test_saving_replaces_an_older_file(trace, tmp_path):
    path = tmp_path / "run.npz"
    path.write_bytes(b"old")
    save_trace(trace, path)
    assert torch.equal(load_trace(path).query, trace.query)


def test_bad_files_are_refused(trace, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x93NUMPY not really")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**trace.to_arrays(), "query": np.array([{"a": 1}], dtype=object)})
    truncated = tmp_path / "truncated.npz"
    save_trace(trace, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **{**trace.to_arrays(), "block_mass": trace.to_arrays()["block_mass"] * 3})
    for path, message in [
        (garbage, "not a readable trace file"),
        (single, "not an .npz archive"),
        (pickled, "not a readable trace file|numeric array"),
        (truncated, "not a readable trace file"),
        (tampered, "sum to 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_trace(path)
    with pytest.raises(FileNotFoundError, match="no trace file"):
        load_trace(tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="expects a Trace"):
        save_trace({"query": 1}, tmp_path / "x.npz")
