"""The trace format (arrays <-> Trace, validation) and the synthetic trace's structure."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from policies.importance import block_mass
from policies.trace import FORMAT, SyntheticConfig, Trace, synthetic_trace

SMALL = SyntheticConfig(
    layers=2, heads=4, kv_heads=2, head_dim=32, prompt_tokens=256, steps=12, observe_steps=3, topics=3, phase_steps=6
)


@pytest.fixture(scope="module")
def small() -> Trace:
    return synthetic_trace(SMALL)


@pytest.fixture(scope="module")
def default() -> Trace:
    return synthetic_trace(SyntheticConfig())


def test_arrays_round_trip(small):
    arrays = small.to_arrays()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    again = Trace.from_arrays(arrays)
    for name in ("query", "keys", "tokens", "block_mass"):
        assert torch.equal(getattr(again, name), getattr(small, name))
    assert (again.block_tokens, again.scale, again.observe_steps, again.info) == (
        small.block_tokens,
        small.scale,
        small.observe_steps,
        small.info,
    )


def header(trace: Trace, **changes) -> np.ndarray:
    meta = json.loads(trace.to_arrays()["header"].tobytes())
    meta.update(changes)
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def test_malformed_arrays_are_rejected(small):
    arrays = small.to_arrays()
    cases = [
        ({k: v for k, v in arrays.items() if k != "keys"}, "missing \\['keys'\\]"),
        ({**arrays, "header": header(small, format="other")}, f"not a {FORMAT} file"),
        ({**arrays, "header": header(small, version=99)}, "version 99 is not supported"),
        ({**arrays, "header": np.frombuffer(b"{not json", dtype=np.uint8)}, "not UTF-8 JSON"),
        ({**arrays, "header": header(small, block_tokens=0)}, "block_tokens must be an int > 0"),
        ({**arrays, "query": arrays["query"][..., :-1]}, "head_dim"),
        ({**arrays, "block_mass": arrays["block_mass"] * 2}, "sum to 1"),
        ({**arrays, "tokens": arrays["tokens"] + 10_000}, "tokens must be"),
        ({**arrays, "query": np.array(["a"])}, "numeric array"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            Trace.from_arrays(bad)


def test_inconsistent_traces_are_rejected(small):
    mass = small.block_mass.clone()
    mass[0, 0, 0] *= 0.5
    mass[0, 0, 0, -1] = 0.5  # half the mass past the first step's tokens
    cases = [
        (dict(block_mass=mass), "past each step's tokens"),
        (dict(block_mass=-small.block_mass), "negative"),
        (dict(observe_steps=small.steps), "observe_steps"),
        (dict(scale=0.0), "scale"),
        (dict(keys=torch.cat([small.keys, small.keys[:, :1]], 1)), "multiple of kv_heads"),
        (dict(keys=small.keys[:, :, :100]), "block_mass must be"),
        (dict(query=small.query.double()), "float16 or float32"),
        (dict(tokens=small.tokens.int()), "int64"),
    ]
    for change, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            replace(small, **change)


def test_synthetic_traces_are_seeded(small):
    again = synthetic_trace(SMALL)
    other = synthetic_trace(replace(SMALL, seed=1))
    assert torch.equal(again.query, small.query) and torch.equal(again.keys, small.keys)
    assert not torch.equal(other.keys, small.keys)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        SyntheticConfig(heads=6, kv_heads=4)


def test_the_mass_is_the_softmax_of_the_vectors(default):
    for step, layer in [(0, 0), (20, 1), (default.steps - 1, default.layers - 1)]:
        weights = torch.softmax(default.logits(step, layer), -1)  # from the query and keys themselves
        assert torch.allclose(block_mass(weights, default.block_tokens), default.mass(step, layer), atol=1e-6)


def token_weights(trace: Trace) -> list[torch.Tensor]:
    """Head-averaged attention per token at each scored step of layer 0."""
    return [torch.softmax(trace.logits(s, 0), -1).mean(0) for s in range(trace.observe_steps, trace.steps)]


def test_synthetic_attention_has_sinks_local_windows_and_heavy_hitters(default):
    weights = token_weights(default)
    heavy = default.info["heavy_positions"]
    sink = torch.tensor([w[0] for w in weights])
    assert sink.mean() > 0.2  # the first token soaks up attention
    for w in weights:
        tokens = w.shape[0]
        background = w[1 : tokens - 64].mean()
        assert w[-16:].mean() > 5 * background  # recent tokens get more than the distant ones
    shares = torch.stack([w[heavy].mean() / w[1:-64].mean() for w in weights])  # [steps]
    assert shares.mean() > 10  # a few scattered tokens draw far more than the average token...
    on_top = torch.stack([(w[heavy][:, None] >= w[1:-64].quantile(0.99)).float().mean() for w in weights])
    assert on_top.mean() > 0.3  # ...often among the top 1% of tokens...
    high = (on_top > 0.5).int()
    assert int((high[1:] > high[:-1]).sum()) >= 2  # ...and coming back there after falling away (recurring)


def test_synthetic_topics_drift_between_phases(default):
    c = SyntheticConfig()
    topics = default.info["phase_topics"]
    assert all(a != b for a, b in zip(topics, topics[1:]))
    tops = []
    for phase in range(len(topics)):
        step = default.observe_steps + phase * c.phase_steps + 2
        mass = default.mass(step, 0).sum(0)  # [blocks]
        mass[0] = 0
        mass[-4:] = 0  # leave the sink, the local window and the heavy hitters out
        mass[[p // c.block_tokens for p in default.info["heavy_positions"]]] = 0
        tops.append(set(mass.topk(8).indices.tolist()))
        topic_blocks = {
            (start + i) // c.block_tokens
            for start, length, t in default.info["segments"]
            if t == topics[phase]
            for i in range(length)
        }
        assert len(tops[-1] & topic_blocks) >= 6  # what the phase reads is mostly about its topic
    assert all(len(a & b) <= 4 for a, b in zip(tops, tops[1:]))
