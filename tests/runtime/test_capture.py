"""Capturing a real model's attention as a trace, and replaying it with `tiered experiment --capture`."""

from __future__ import annotations

import csv

import pytest
import torch

from runtime import load_model
from runtime.capture import capture_trace
from runtime.cli import main as cli
from runtime.traces import load_trace, save_trace

from .tiny_models import shakespeare, write_hf_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-capture")
    write_hf_dir(directory, "llama", seed=5)
    return directory


def test_capture_records_every_one_token_step(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    prompt = model.tokenizer.encode(shakespeare(2000))[:100]
    trace = capture_trace(model, prompt, steps=5, observe_steps=3, block_tokens=16)
    assert (trace.steps, trace.layers, trace.observe_steps) == (8, model.config.num_layers, 3)
    assert trace.tokens.tolist() == list(range(98, 106))  # the observed prompt tail, then 5 new tokens
    assert trace.keys.shape == (model.config.num_layers, model.config.num_kv_heads, 105, model.config.head_dim)
    for step in (0, 7):
        for layer in range(trace.layers):
            tokens = int(trace.tokens[step])
            expected = torch.softmax(trace.logits(step, layer), dim=-1)  # [heads, tokens]
            blocks = -(-tokens // 16)
            per_block = torch.nn.functional.pad(expected, (0, blocks * 16 - tokens)).view(-1, blocks, 16).sum(-1)
            assert torch.allclose(trace.mass(step, layer)[:, :blocks], per_block, atol=1e-5)
    loaded = load_trace(save_trace(trace, tmp_path / "t.npz"))
    assert torch.equal(loaded.block_mass, trace.block_mass) and torch.equal(loaded.query, trace.query)


def test_capture_rejects_contexts_beyond_the_model(tiny_dir):
    model = load_model(tiny_dir)
    with pytest.raises(ValueError, match="maximum of 256"):
        capture_trace(model, list(range(3, 250)), steps=10)
    with pytest.raises(ValueError, match="observe_steps"):
        capture_trace(model, [5, 6], steps=1, observe_steps=2)


def test_experiment_capture_writes_results(tiny_dir, tmp_path):
    out = tmp_path / "out"
    code = cli([
        "experiment", "--capture", "--model", str(tiny_dir), "--prompt-tokens", "120", "--steps", "6",
        "--block-tokens", "16", "--budgets", "0.25,0.5", "--importance", "oracle,quest,recency",
        "--prefetch", "none,next-layer", "--out", str(out),
    ])
    assert code == 0
    assert (out / "trace.npz").exists() and (out / "recall.png").stat().st_size > 0
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    oracle = [float(r["topk_recall"]) for r in rows if r["importance"] == "oracle"]
    assert oracle and all(value == pytest.approx(1.0) for value in oracle)
