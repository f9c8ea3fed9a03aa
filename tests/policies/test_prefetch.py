"""One interface suite over every prefetch policy, then what each policy asks for."""

from __future__ import annotations

import copy

import pytest
import torch

from policies import PREFETCH, PrefetchRequest, PrefetchView, key_bounds, make_prefetch

HEADS, KV_HEADS, DIM, BLOCK, BLOCKS, LAYERS = 4, 2, 16, 8, 12, 3


def view(layer: int = 0, seed: int = 0, **overrides) -> PrefetchView:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(KV_HEADS, BLOCKS * BLOCK, DIM, generator=g)  # the next layer's keys
    query = torch.randn(HEADS, DIM, generator=g)
    keys[:, 5 * BLOCK + 3] = 6 * query.view(KV_HEADS, -1, DIM).mean(1)  # block 5 holds what the query seeks
    key_min, key_max = key_bounds(keys, BLOCK)
    fields = dict(
        layer=layer,
        layers=LAYERS,
        blocks=BLOCKS,
        query=query,
        next_key_min=key_min,
        next_key_max=key_max,
        block_scores=torch.rand(BLOCKS, generator=g),
        budget_blocks=5,
        sink_blocks=1,
        window_blocks=2,
        max_blocks=None,
        scale=DIM**-0.5,
    )
    fields.update(overrides)
    return PrefetchView(**fields)


@pytest.mark.parametrize("name", sorted(PREFETCH))
@pytest.mark.parametrize("layer", range(LAYERS))
def test_plans_are_valid_deterministic_and_change_nothing(name, layer):
    policy = make_prefetch(name)
    v = view(layer)
    before = copy.deepcopy(vars(policy))
    first = policy.plan(v)
    assert vars(policy) == before
    assert policy.plan(v) == first == make_prefetch(name).plan(view(layer))
    for request in first:
        assert isinstance(request, PrefetchRequest)
        assert 0 <= request.layer < LAYERS
        assert request.indices and all(0 <= i < BLOCKS for i in request.indices)
        assert len(set(request.indices)) == len(request.indices)


def layers_ahead(layer: int, after: int) -> int:
    """Layer computations until `layer` is read once `after` attended (policies.prefetch.base)."""
    return (layer - after - 1) % LAYERS + 1


@pytest.mark.parametrize("name", sorted(PREFETCH))
@pytest.mark.parametrize("layer", range(LAYERS))
def test_requests_come_most_urgent_first(name, layer):
    ahead = [layers_ahead(r.layer, layer) for r in make_prefetch(name).plan(view(layer))]
    assert ahead == sorted(ahead)


@pytest.mark.parametrize("name", sorted(PREFETCH))
@pytest.mark.parametrize("max_blocks", [0, 1, 3, 7])
def test_plans_respect_max_blocks(name, max_blocks):
    unlimited = make_prefetch(name).plan(view(0))
    limited = make_prefetch(name).plan(view(0, max_blocks=max_blocks))
    flat = [(r.layer, i) for r in unlimited for i in r.indices]
    assert [(r.layer, i) for r in limited for i in r.indices] == flat[:max_blocks]


def test_registry_errors_name_the_valid_policies():
    with pytest.raises(ValueError, match="valid names") as err:
        make_prefetch("all")
    assert all(name in str(err.value) for name in PREFETCH)
    with pytest.raises(TypeError, match="'none'"):
        make_prefetch("none", depth=2)
    with pytest.raises(TypeError, match="PrefetchView"):
        make_prefetch("none").plan({"layer": 0})


def test_none_asks_for_nothing():
    assert make_prefetch("none").plan(view(1)) == []


def test_next_layer_scores_the_next_layers_blocks_with_this_query():
    plan = make_prefetch("next-layer").plan(view(0))
    assert [r.layer for r in plan] == [1]
    assert plan[0].indices[0] == 5  # the block whose key matches the query comes first
    assert len(plan[0].indices) == 5 - 1 - 2  # the budget minus sinks and window, which stay on the device
    assert not {0, BLOCKS - 1, BLOCKS - 2} & set(plan[0].indices)
    assert make_prefetch("next-layer").plan(view(LAYERS - 1, next_key_min=None, next_key_max=None)) == []
    with pytest.raises(ValueError, match="next_key_min"):
        make_prefetch("next-layer").plan(view(0, next_key_min=None, next_key_max=None))


def test_topk_asks_for_the_best_ranked_blocks_of_this_layer_next_step():
    scores = torch.tensor([9.0, 1, 8, 2, 7, 3, 6, 4, 5, 0, 0, 0])
    plan = make_prefetch("topk").plan(view(1, block_scores=scores))
    assert plan == [PrefetchRequest(1, (2, 4))]  # 0 is a sink, 10 and 11 the window
    with pytest.raises(ValueError, match="block_scores"):
        make_prefetch("topk").plan(view(1, block_scores=None))


def test_sequential_walks_every_layer_in_order_from_the_next_one():
    plan = make_prefetch("sequential").plan(view(1))
    assert [r.layer for r in plan] == [2, 0, 1]
    assert [layers_ahead(r.layer, after=1) for r in plan] == [1, 2, LAYERS]  # most urgent first
    assert all(r.indices == tuple(range(BLOCKS)) for r in plan)
    resume = make_prefetch("sequential").plan(view(LAYERS - 1))  # before any step: the whole session
    assert [r.layer for r in resume] == [0, 1, 2]


def test_bad_views_are_rejected():
    with pytest.raises(ValueError, match="layer must be < layers"):
        view(LAYERS)
    with pytest.raises(ValueError, match="given together"):
        view(0, next_key_max=None)
    with pytest.raises(ValueError, match="block_scores must have shape"):
        view(0, block_scores=torch.ones(3))
    with pytest.raises(ValueError, match="query must be a tensor"):
        view(0, query=torch.ones(3))
    with pytest.raises(ValueError, match="max_blocks must be >= 0"):
        view(0, max_blocks=-1)
