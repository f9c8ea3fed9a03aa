"""Quest's bound holds for every key of every block, on random and adversarial inputs."""

from __future__ import annotations

import pytest
import torch

from policies import key_bounds, make_importance
from policies.importance import quest_bound

KV_HEADS, GROUP, DIM = 2, 3, 32


def exact_max(query: torch.Tensor, keys: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """max over each block's keys of q·k, in float64: [heads, blocks]."""
    kv_heads, tokens, dim = keys.shape
    dots = (query.double().view(kv_heads, -1, dim) @ keys.double().transpose(1, 2)).reshape(
        -1, tokens
    )  # [heads, tokens]
    blocks = -(-tokens // block_tokens)
    padded = torch.full((dots.shape[0], blocks * block_tokens), float("-inf"), dtype=torch.float64)
    padded[:, :tokens] = dots
    return padded.view(dots.shape[0], blocks, block_tokens).amax(-1)


def adversarial(case: str, g: torch.Generator, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """query [heads, dim], keys [kv_heads, tokens, dim] for one kind of input."""
    query = torch.randn(KV_HEADS * GROUP, DIM, generator=g)
    keys = torch.randn(KV_HEADS, tokens, DIM, generator=g)
    if case == "negative query":
        query = -query.abs()
    elif case == "mixed signs, outlier channels":
        keys[..., :3] *= 50  # a few key channels far larger than the rest, as real models show
        query[:, :3] *= -40
    elif case == "outlier tokens":
        keys[:, ::7] *= 30
    elif case == "constant keys":
        keys[:] = keys[:, :1]
    elif case == "tiny and huge scales":
        keys *= torch.logspace(-6, 6, DIM)
        query *= torch.logspace(6, -6, DIM)
    return query, keys


CASES = [
    "random",
    "negative query",
    "mixed signs, outlier channels",
    "outlier tokens",
    "constant keys",
    "tiny and huge scales",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_tokens, tokens", [(16, 160), (16, 157), (1, 40), (64, 20)])
def test_bound_holds_for_every_block(case, block_tokens, tokens):
    for seed in range(5):
        query, keys = adversarial(case, torch.Generator().manual_seed(seed), tokens)
        key_min, key_max = key_bounds(keys.double(), block_tokens)
        bound = quest_bound(query.double(), key_min, key_max)  # [heads, blocks]
        truth = exact_max(query, keys, block_tokens)
        slack = 1e-9 * (query.double().abs() @ keys.double().abs().amax((0, 1)))[:, None]  # rounding, relative
        assert (bound >= truth - slack).all(), f"{case}: bound below a key's q·k"


@pytest.mark.parametrize("case", CASES)
def test_bound_holds_in_float32_and_fp16_summaries(case):
    query, keys = adversarial(case, torch.Generator().manual_seed(11), 96)
    keys16 = keys.clamp(-6e4, 6e4).half()
    key_min, key_max = key_bounds(keys16, 16)  # fp16 summaries of fp16 keys, as the runtime keeps them
    bound = quest_bound(query, key_min, key_max).double()  # float32 arithmetic
    truth = exact_max(query, keys16.float(), 16)
    slack = 1e-5 * (query.double().abs() @ keys16.double().abs().amax((0, 1)))[:, None]
    assert (bound >= truth - slack).all()


def test_bound_is_exact_for_single_token_blocks():
    g = torch.Generator().manual_seed(3)
    query, keys = (
        torch.randn(KV_HEADS * GROUP, DIM, generator=g, dtype=torch.float64),
        torch.randn(KV_HEADS, 12, DIM, generator=g, dtype=torch.float64),
    )
    key_min, key_max = key_bounds(keys, 1)
    assert torch.allclose(quest_bound(query, key_min, key_max), exact_max(query, keys, 1), atol=1e-12)


def test_the_estimator_bounds_every_head_of_each_kv_group():
    g = torch.Generator().manual_seed(5)
    query, keys = adversarial("mixed signs, outlier channels", g, 100)
    key_min, key_max = key_bounds(keys.double(), 10)
    scores = make_importance("quest", block_tokens=10).score(query.double(), key_min, key_max)  # [kv_heads, blocks]
    truth = exact_max(query, keys, 10).view(KV_HEADS, GROUP, -1)  # [kv_heads, group, blocks]
    assert (scores.double()[:, None, :] >= truth - 1e-3).all()
    assert torch.allclose(
        scores.double(),
        quest_bound(query.double(), key_min, key_max).view(KV_HEADS, GROUP, -1).amax(1).float().double(),
    )


def test_quest_finds_the_block_holding_a_matching_key():
    g = torch.Generator().manual_seed(8)
    keys = torch.randn(KV_HEADS, 256, DIM, generator=g)
    query = torch.randn(KV_HEADS * GROUP, DIM, generator=g)
    keys[:, 200] = 5 * query.view(KV_HEADS, GROUP, DIM).mean(1)  # a key the whole group looks for
    key_min, key_max = key_bounds(keys, 16)
    for scale in (None, DIM**-0.5):
        quest = make_importance("quest", block_tokens=16, scale=scale)
        assert int(quest.block_scores(quest.score(query, key_min, key_max)).argmax()) == 200 // 16
    with pytest.raises(ValueError, match="scale"):
        make_importance("quest", scale=-1.0)


def test_key_bounds_match_the_keys():
    keys = torch.randn(2, 37, 8, generator=torch.Generator().manual_seed(1))
    key_min, key_max = key_bounds(keys, 8)
    assert key_min.shape == (5, 2, 8)
    for block in range(5):
        chunk = keys[:, block * 8 : (block + 1) * 8]
        assert torch.equal(key_min[block], chunk.amin(1)) and torch.equal(key_max[block], chunk.amax(1))
    with pytest.raises(ValueError, match="kv_heads, tokens>0, head_dim"):
        key_bounds(keys[0], 8)
