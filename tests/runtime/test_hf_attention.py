"""The "tiered" attention implementation (runtime.hf.attention) on a tiny random Qwen3: a decode step of a
TieredCache reads the store's blocks where they lie and gives DynamicCache's tokens; every other call
(prefill, padding masks, beams over padded prompts, another cache) is SDPA over the history, as before."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from runtime.hf import ATTENTION, TieredCache, model_fingerprint
from runtime.hf.attention import deferred_layer, tiered_attention
from tiered import TieredStore

from .test_hf_cache_tiny import (
    GREEDY,
    SHAPE,
    assert_same_generation,
    left_padded_batch,
    tiers,
)


@pytest.fixture(scope="module")
def models() -> tuple[Qwen3ForCausalLM, Qwen3ForCausalLM]:
    """The same random weights twice: with SDPA (the reference) and with the tiered attention."""
    torch.manual_seed(0)
    reference = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()
    ours = Qwen3ForCausalLM(Qwen3Config(**SHAPE, attn_implementation=ATTENTION)).eval()
    ours.load_state_dict(reference.state_dict())
    assert reference.config._attn_implementation == "sdpa" and ours.config._attn_implementation == ATTENTION
    return reference, ours


@pytest.mark.parametrize("host_codec", ["raw", "int8"])
def test_decode_steps_read_blocks_where_they_lie_and_equal_dynamic_cache(models, tmp_path, host_codec):
    reference_model, model = models
    ids = torch.randint(1, SHAPE["vocab_size"], (1, 70), generator=torch.Generator().manual_seed(7))
    if host_codec == "raw":
        reference = reference_model.generate(ids, max_new_tokens=32, cache=DynamicCache(), **GREEDY)
    else:  # int8 blocks dequantized for SDPA: the fused kernel reads the same codes where they lie
        with TieredCache(tiers(tmp_path / "sdpa", 102, host_codec=host_codec), config=reference_model.config) as cache:
            reference = reference_model.generate(ids, max_new_tokens=32, cache=cache, **GREEDY)
    with TieredCache(tiers(tmp_path, 102, host_codec=host_codec), config=model.config) as cache:
        ours = model.generate(ids, max_new_tokens=32, cache=cache, **GREEDY)
        places = {cache.store.where(key) for i in range(3) for key in cache.block_keys(i)[0]}
        assert places == {"device", "host", "disk"}
        # a decode step hands attention the new token, marked as the layer's history
        layer = cache.layers[0]
        states = torch.randn(1, 2, 1, 16)
        key, value = layer.update(states, states)
        assert deferred_layer(key) is layer and key.shape == (1, 2, 1, 16)
    assert torch.equal(reference.sequences, ours.sequences)
    tolerance = 1e-5 if host_codec == "raw" else 1e-4  # int8: the same codes, summed in another order
    for step, (expected, got) in enumerate(zip(reference.logits, ours.logits, strict=True)):
        assert torch.allclose(expected, got, atol=tolerance, rtol=0), f"logits differ at step {step}"


def test_a_batch_without_padding_reads_each_row_where_it_lies(models, tmp_path):
    reference_model, model = models
    ids = torch.randint(1, SHAPE["vocab_size"], (3, 50), generator=torch.Generator().manual_seed(11))
    reference = reference_model.generate(ids, max_new_tokens=16, cache=DynamicCache(), **GREEDY)
    with TieredCache(tiers(tmp_path, 3 * 66), config=model.config) as cache:
        assert_same_generation(reference, model.generate(ids, max_new_tokens=16, cache=cache, **GREEDY))
        layer, module = cache.layers[0], model.model.layers[0].self_attn
        key, value = layer.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16))
        assert deferred_layer(key) is layer and key.shape == (3, 2, 1, 16)
        query = torch.randn(3, 4, 1, 16)
        ours, _ = tiered_attention(module, query, key, value, None)
        expected, _ = sdpa_attention_forward(module, query, *layer.read_all(), None, scaling=1 / math.sqrt(16))
    assert ours.shape == expected.shape == (3, 1, 4, 16)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_prefill_padding_masks_and_other_caches_get_the_history_as_tensors(models, tmp_path):
    reference_model, model = models
    ids, mask = left_padded_batch(seed=8)
    reference = reference_model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=DynamicCache(), **GREEDY)
    with TieredCache(tiers(tmp_path, 86), config=model.config) as cache:  # the mask hides the padding
        assert_same_generation(reference, model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=cache, **GREEDY))
        key, _ = cache.layers[0].update(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16))
        assert deferred_layer(key) is None and key.shape == (2, 2, 70 + 15 + 3, 16)  # three new tokens: the history
    assert_same_generation(reference, model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=DynamicCache(), **GREEDY))
    beams = dict(num_beams=2, max_new_tokens=12, do_sample=False)
    with TieredCache(tiers(tmp_path, 82 * 2), config=model.config) as cache:
        ours = model.generate(ids, attention_mask=mask, cache=cache, **beams)
    assert torch.equal(reference_model.generate(ids, attention_mask=mask, **beams), ours)


def test_a_cache_made_without_the_config_never_defers(models, tmp_path):
    reference_model, model = models
    ids = torch.randint(1, SHAPE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(9))
    reference = reference_model.generate(ids, max_new_tokens=8, cache=DynamicCache(), **GREEDY)
    with TieredCache(tiers(tmp_path, 48, device_fraction=1.0)) as cache:  # it cannot know the attention
        assert_same_generation(reference, model.generate(ids, max_new_tokens=8, cache=cache, **GREEDY))
        key, _ = cache.layers[1].update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        assert deferred_layer(key) is None and key.shape[2] == 48


@pytest.mark.parametrize("scaling", [None, 0.5])
def test_fused_read_equals_sdpa_over_the_history_with_any_scaling(models, tmp_path, scaling):
    _, model = models
    with TieredCache(tiers(tmp_path, 80, host_codec="raw"), config=model.config) as cache:
        model(torch.randint(1, SHAPE["vocab_size"], (1, 77)), cache=cache)
        layer, module = cache.layers[2], model.model.layers[2].self_attn
        generator = torch.Generator().manual_seed(10)
        key, value = layer.update(torch.randn(1, 2, 1, 16, generator=generator), torch.randn(1, 2, 1, 16, generator=generator))
        query = torch.randn(1, 4, 1, 16, generator=generator)
        ours, _ = tiered_attention(module, query, key, value, None, scaling=scaling)
        history_keys, history_values = layer.read_all()
        expected, _ = sdpa_attention_forward(module, query, history_keys, history_values, None,
                                             scaling=1 / math.sqrt(16) if scaling is None else scaling)
    assert ours.shape == expected.shape == (1, 1, 4, 16)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_a_later_turn_reads_the_shared_blocks_it_adopted(models, tmp_path):
    reference_model, model = models
    config = tiers(tmp_path, 3 * 100, layers=3, fingerprint=model_fingerprint(model.config))
    first = torch.randint(1, SHAPE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(12))
    with TieredStore(config) as store:
        with TieredCache.for_prompt(store, first, config=model.config) as cache:
            out = model.generate(first, max_new_tokens=12, cache=cache, **GREEDY)
            cache.commit(out.sequences)  # 51 tokens held: 3 full blocks sealed for the next turn
        second = torch.cat([out.sequences, torch.randint(1, SHAPE["vocab_size"], (1, 9))], dim=1)  # [1, 61]
        with TieredCache.for_prompt(store, second, config=model.config) as again:
            assert again.reused_tokens == 48
            ours = model.generate(second, max_new_tokens=10, cache=again, **GREEDY)
    assert_same_generation(reference_model.generate(second, max_new_tokens=10, cache=DynamicCache(), **GREEDY), ours)


SPARSE = dict(budget_tokens=48, sink_tokens=16, window_tokens=16, dense_layers=1)


def test_sparse_steps_read_a_budget_of_pages_and_all_of_it_when_it_covers_the_history(models, tmp_path):
    reference_model, model = models
    ids = torch.randint(1, SHAPE["vocab_size"], (1, 90), generator=torch.Generator().manual_seed(13))
    reference = reference_model.generate(ids, max_new_tokens=20, cache=DynamicCache(), **GREEDY)
    with TieredCache(tiers(tmp_path / "all", 120), config=model.config, sparse=SPARSE | {"budget_tokens": 512}) as cache:
        assert_same_generation(reference, model.generate(ids, max_new_tokens=20, cache=cache, **GREEDY))
    with TieredCache(tiers(tmp_path / "some", 120), config=model.config, sparse=SPARSE) as cache:
        ours = model.generate(ids, max_new_tokens=20, cache=cache, **GREEDY)
        summaries = cache.state.sparse.rows[0].summaries
        assert [s.pages for s in summaries] == [-(-(90 + 19) // 16)] * 3  # every token's keys summarized
        cache.crop(-30)  # assisted decoding's crop: the summaries follow
        assert [s.pages for s in summaries] == [-(-(90 + 19 - 30) // 16)] * 3
    # 48 of ~100 tokens per KV head in layers 1 and 2: not the exact result
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(reference.logits, ours.logits))


def test_sparse_options_and_what_a_sparse_cache_refuses(models, tmp_path):
    reference_model, model = models
    with pytest.raises(ValueError, match="budget_tokens"):
        TieredCache(tiers(tmp_path, 64), config=model.config, sparse={"sink_tokens": 16})
    with pytest.raises(ValueError, match="unknown sparse options"):
        TieredCache(tiers(tmp_path, 64), config=model.config, sparse={"budget_tokens": 64, "budget": 1})
    with pytest.raises(ValueError, match="sparse mode needs budget_tokens >="):  # SparseAttention's own check
        TieredCache(tiers(tmp_path, 64), config=model.config, sparse={"budget_tokens": 16})
    with pytest.raises(ValueError, match="config"):
        TieredCache(tiers(tmp_path, 64), sparse=SPARSE)
    ids = torch.randint(1, SHAPE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(14))
    with TieredCache(tiers(tmp_path / "sdpa", 64), config=reference_model.config, sparse=SPARSE) as cache:
        with pytest.raises(ValueError, match="set_attn_implementation"):  # SDPA would read everything
            reference_model.generate(ids, max_new_tokens=2, cache=cache)
    ids, mask = left_padded_batch(seed=15)
    with TieredCache(tiers(tmp_path / "beams", 100 * 2), config=model.config, sparse=SPARSE) as cache:
        with pytest.raises(ValueError, match="does not reorder rows"):
            model.generate(ids, attention_mask=mask, cache=cache, num_beams=2, max_new_tokens=4, do_sample=False)
