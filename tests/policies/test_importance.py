"""One interface suite over every importance estimator, then what each method does."""

from __future__ import annotations

import copy

import pytest
import torch

from policies import IMPORTANCE, key_bounds, make_importance
from policies.importance import block_mass
from tests.conftest import cuda

HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 16, 4


def inputs(seed: int, tokens: int = 37):
    """A query, the key bounds of `tokens` keys, and the query's true attention weights."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(KV_HEADS, tokens, DIM, generator=g)  # [kv_heads, tokens, head_dim]
    query = torch.randn(HEADS, DIM, generator=g)  # [heads, head_dim]
    logits = (query.view(KV_HEADS, -1, DIM) @ keys.transpose(1, 2)).reshape(HEADS, tokens) / DIM**0.5
    key_min, key_max = key_bounds(keys, BLOCK)
    return query, key_min, key_max, torch.softmax(logits, -1)


def run(estimator, steps: range, score_between: bool = False) -> list[torch.Tensor]:
    """Update with growing sequences; the scores after each step."""
    scores = []
    for step in steps:
        query, key_min, key_max, weights = inputs(step, tokens=20 + step)
        if score_between:
            for _ in range(2):
                estimator.score(query, key_min, key_max, weights=weights)
                estimator.block_scores(estimator.score(query, key_min, key_max, weights=weights))
        estimator.update(query, weights)
        scores.append(estimator.score(query, key_min, key_max, weights=weights))
    return scores


def snapshot(estimator) -> dict:
    return copy.deepcopy({k: v for k, v in vars(estimator).items()})


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or type(a).__name__ == "deque":
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(IMPORTANCE))
def test_scores_have_the_documented_shape(name):
    estimator = make_importance(name, block_tokens=BLOCK)
    query, key_min, key_max, weights = inputs(0)
    estimator.update(query, weights)
    scores = estimator.score(query, key_min, key_max, weights=weights)
    assert scores.shape == (KV_HEADS, key_min.shape[0]) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert estimator.block_scores(scores).shape == (key_min.shape[0],)


@pytest.mark.parametrize("name", sorted(IMPORTANCE))
def test_scoring_has_no_side_effects_and_is_deterministic(name):
    plain = run(make_importance(name, block_tokens=BLOCK), range(6))
    busy = run(make_importance(name, block_tokens=BLOCK), range(6), score_between=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, busy))
    estimator = make_importance(name, block_tokens=BLOCK)
    run(estimator, range(4))
    before = snapshot(estimator)
    query, key_min, key_max, weights = inputs(9, tokens=30)
    first = estimator.score(query, key_min, key_max, weights=weights)
    assert same(snapshot(estimator), before)
    assert torch.equal(first, estimator.score(query, key_min, key_max, weights=weights))


@pytest.mark.parametrize("name", sorted(IMPORTANCE))
def test_reset_forgets_the_sequence(name):
    estimator = make_importance(name, block_tokens=BLOCK)
    run(estimator, range(5))
    estimator.reset()
    fresh = make_importance(name, block_tokens=BLOCK)
    assert all(torch.equal(a, b) for a, b in zip(run(estimator, range(3)), run(fresh, range(3))))


@pytest.mark.parametrize("name", sorted(IMPORTANCE))
def test_stateful_methods_learn_from_updates_and_the_others_do_not(name):
    estimator = make_importance(name, block_tokens=BLOCK)
    query, key_min, key_max, weights = inputs(1, tokens=40)
    before = estimator.score(query, key_min, key_max, weights=weights)
    focused = torch.zeros(HEADS, 40)
    focused[:, 4 * BLOCK + 1] = 1.0  # every head attends one token of block 4
    estimator.update(query, focused)
    after = estimator.score(query, key_min, key_max, weights=weights)
    if estimator.stateful:
        assert int(estimator.block_scores(after).argmax()) == 4
    else:
        assert torch.equal(before, after)


@pytest.mark.parametrize("name", sorted(IMPORTANCE))
def test_bad_inputs_are_rejected(name):
    estimator = make_importance(name, block_tokens=BLOCK)
    query, key_min, key_max, weights = inputs(2)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        estimator.score(query[:3], key_min, key_max, weights=weights[:3])
    with pytest.raises(ValueError, match=r"\[blocks, kv_heads, head_dim\]"):
        estimator.score(query, key_min[0], key_max[0], weights=weights)
    with pytest.raises(ValueError, match="same shape"):
        estimator.score(query, key_min, key_max[:-1], weights=weights)
    with pytest.raises(ValueError, match="head_dim"):
        estimator.score(query[:, :-1], key_min, key_max, weights=weights)
    with pytest.raises(ValueError, match="weights"):
        estimator.update(query, weights[:2])
    with pytest.raises(TypeError, match="block_tokens must be int"):
        make_importance(name, block_tokens="64")


def test_registry_errors_name_the_valid_estimators():
    with pytest.raises(ValueError, match="valid names") as err:
        make_importance("streaming")
    assert all(name in str(err.value) for name in IMPORTANCE)
    with pytest.raises(TypeError, match="'quest'"):
        make_importance("quest", window=3)


def test_oracle_is_the_exact_mass_per_kv_group_and_needs_the_weights():
    oracle = make_importance("oracle", block_tokens=BLOCK)
    query, key_min, key_max, weights = inputs(3)
    mass = block_mass(weights, BLOCK)  # [heads, blocks]
    expected = mass.view(KV_HEADS, HEADS // KV_HEADS, -1).sum(1)
    assert torch.allclose(oracle.score(query, key_min, key_max, weights=weights), expected)
    with pytest.raises(ValueError, match="needs weights"):
        oracle.score(query, key_min, key_max)


def test_tova_averages_the_heads_of_each_group():
    tova = make_importance("tova", block_tokens=BLOCK)
    query, key_min, key_max, _ = inputs(4, tokens=24)
    weights = torch.zeros(HEADS, 24)
    weights[: HEADS // 2, 1 * BLOCK] = 1.0  # group 0 reads block 1
    weights[HEADS // 2 :, 3 * BLOCK] = 1.0  # group 1 reads block 3
    weights[0] = 0
    weights[0, 5 * BLOCK] = 1.0  # one head of group 0 reads block 5 instead
    tova.update(query, weights)
    scores = tova.score(query, key_min, key_max)
    assert scores.argmax(-1).tolist() == [1, 3]
    assert scores[0, 5] == pytest.approx(1 / (HEADS // 2)) and scores[1, 5] == 0


def test_h2o_accumulates_decays_and_normalizes():
    query, key_min, key_max, _ = inputs(5, tokens=16)  # 4 blocks
    early = torch.zeros(HEADS, 8)
    early[:, 0] = 1.0  # block 0, in the first two of three steps
    late = torch.zeros(HEADS, 16)
    late[:, 12] = 0.5
    late[:, 4] = 0.5
    plain, decayed, normalized = (
        make_importance("h2o", block_tokens=BLOCK, **kw) for kw in ({}, {"decay": 0.1}, {"normalize": True})
    )
    for estimator in (plain, decayed, normalized):
        for weights in (early, early, late):
            estimator.update(query, weights)
    assert plain.score(query, key_min, key_max)[0].tolist() == pytest.approx([2.0, 0.5, 0.0, 0.5])
    assert decayed.score(query, key_min, key_max)[0].tolist() == pytest.approx(
        [0.11, 0.5, 0.0, 0.5]
    )  # (0.1 · 1 + 1) · 0.1
    # block 0 was visible to 3 queries, block 3 to 1: 2/3 against 0.5/1
    assert normalized.score(query, key_min, key_max)[0].tolist() == pytest.approx([2 / 3, 0.5 / 3, 0.0, 0.5])
    with pytest.raises(ValueError, match="decay"):
        make_importance("h2o", decay=0)


def test_snapkv_pools_votes_over_neighbours_and_keeps_a_window():
    snapkv = make_importance("snapkv", block_tokens=BLOCK, window=2, kernel_size=3, pooling="max")
    query, key_min, key_max, _ = inputs(6, tokens=24)  # 6 blocks
    vote = torch.zeros(HEADS, 24)
    vote[:, 2 * BLOCK - 1] = 1.0  # the last token of block 1: pooling lends it to block 2's first token
    snapkv.update(query, vote)
    scores = snapkv.score(query, key_min, key_max)[0]
    assert scores[1] > 0 and scores[2] > 0 and scores[0] == 0 and scores[3] == 0
    other = torch.zeros(HEADS, 24)
    other[:, 5 * BLOCK + 2] = 1.0
    snapkv.update(query, other)
    snapkv.update(query, other)  # the window holds 2 queries: the first vote is gone
    scores = snapkv.score(query, key_min, key_max)[0]
    assert scores[1] == 0 and scores[5] > 0
    with pytest.raises(ValueError, match="odd"):
        make_importance("snapkv", kernel_size=4)
    with pytest.raises(ValueError, match="pooling"):
        make_importance("snapkv", pooling="mean")


def test_recency_ranks_sinks_then_newest():
    recency = make_importance("recency", block_tokens=BLOCK, sink_blocks=2)
    query, key_min, key_max, _ = inputs(7, tokens=24)
    order = recency.block_scores(recency.score(query, key_min, key_max)).argsort(descending=True, stable=True)
    assert order.tolist()[:2] == [0, 1] and order.tolist()[2:] == [5, 4, 3, 2]


@pytest.mark.parametrize("name", sorted(IMPORTANCE))
def test_scores_stay_on_the_querys_device(name):
    """The meta device stands in for an accelerator here: an operation mixing in a CPU tensor raises."""
    estimator = make_importance(name, block_tokens=BLOCK)
    query, key_min, key_max, weights = (t.to("meta") for t in inputs(0))
    estimator.update(query, weights)
    scores = estimator.score(query, key_min, key_max, weights=weights)
    assert scores.device.type == "meta" and scores.shape == (KV_HEADS, key_min.shape[0])
    assert estimator.block_scores(scores).device.type == "meta"


@cuda
@pytest.mark.parametrize("name", sorted(IMPORTANCE))
def test_scores_on_cuda_equal_the_cpu_ones(name):
    on_cpu, on_gpu = make_importance(name, block_tokens=BLOCK), make_importance(name, block_tokens=BLOCK)
    for step in range(4):
        query, key_min, key_max, weights = inputs(step, tokens=20 + step)
        on_cpu.update(query, weights)
        on_gpu.update(query.cuda(), weights.cuda())
        expected = on_cpu.score(query, key_min, key_max, weights=weights)
        got = on_gpu.score(query.cuda(), key_min.cuda(), key_max.cuda(), weights=weights.cuda())
        assert got.device.type == "cuda"
        assert torch.allclose(got.cpu(), expected, rtol=1e-4, atol=1e-6)
