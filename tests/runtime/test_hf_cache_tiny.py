"""TieredCache on tiny random Qwen3/Qwen2 models built from a config (no download): exactness against
DynamicCache with batch 2 and left padding, beam search, assisted decoding (crop), multi-turn, sliding
windows, and the layer's batch operations."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from runtime.hf import TieredCache, TieredLayer
from tiered import StoreConfig, TieredStore

BLOCK_TOKENS = 16
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, bos_token_id=None,
             eos_token_id=None)
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
KV_BYTES_PER_TOKEN = 2 * 2 * 16 * 4  # keys + values, kv_heads x head_dim fp32, one layer


@pytest.fixture(scope="module")
def qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()


def tiers(tmp_path, tokens: int, device_fraction: float = 0.25, **overrides) -> StoreConfig:
    """A store whose device tier holds `device_fraction` of `tokens` tokens' KV over all layers, the host
    tier another quarter and the disk tier the rest, all raw."""
    block_nbytes = BLOCK_TOKENS * KV_BYTES_PER_TOKEN
    blocks = SHAPE["num_hidden_layers"] * -(-tokens // BLOCK_TOKENS)
    device_blocks = max(SHAPE["num_hidden_layers"], int(blocks * device_fraction))
    fields = dict(device="cpu", device_bytes=device_blocks * block_nbytes, host_bytes=max(1, blocks // 4) * block_nbytes,
                  disk_dir=str(tmp_path / "kv"), disk_bytes=64 << 20, block_tokens=BLOCK_TOKENS)
    return StoreConfig(**(fields | overrides))


def left_padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 70 and 57 tokens, the shorter left-padded: ids and mask [2, 70]."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SHAPE["vocab_size"], (2, 70), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :13], mask[1, :13] = 0, 0
    return ids, mask


def assert_same_generation(reference, ours) -> None:
    assert torch.equal(reference.sequences, ours.sequences)
    assert len(reference.logits) == len(ours.logits)
    for step, (expected, got) in enumerate(zip(reference.logits, ours.logits)):
        assert torch.allclose(expected, got, atol=1e-5, rtol=0), f"logits differ at step {step}"


def test_batch_of_two_with_left_padding_equals_dynamic_cache(qwen3, tmp_path):
    ids, mask = left_padded_batch()
    reference = qwen3.generate(ids, attention_mask=mask, max_new_tokens=32, cache=DynamicCache(), **GREEDY)
    with TieredCache(tiers(tmp_path, 102), config=qwen3.config) as cache:
        ours = qwen3.generate(ids, attention_mask=mask, max_new_tokens=32, cache=cache, **GREEDY)
        assert_same_generation(reference, ours)
        assert cache.get_seq_length() == 70 + 31
        places = {cache.store.where(key) for rows in (cache.block_keys(i) for i in range(3)) for row in rows for key in row}
        assert places == {"device", "host", "disk"}  # the KV really spilled through every tier
        assert all(not key.namespace.startswith("c:") for row in cache.block_keys(0) for key in row)


def test_past_key_values_spelling_works_too(qwen3, tmp_path):
    ids, mask = left_padded_batch(seed=2)
    reference = qwen3.generate(ids, attention_mask=mask, max_new_tokens=8, cache=DynamicCache(), **GREEDY)
    with TieredCache(tiers(tmp_path, 78), config=qwen3.config) as cache, pytest.warns(FutureWarning):
        ours = qwen3.generate(ids, attention_mask=mask, max_new_tokens=8, past_key_values=cache, **GREEDY)
    assert_same_generation(reference, ours)


def test_without_config_layers_are_made_on_first_update(qwen3, tmp_path):
    ids, mask = left_padded_batch(seed=3)
    reference = qwen3.generate(ids, attention_mask=mask, max_new_tokens=8, cache=DynamicCache(), **GREEDY)
    with TieredCache(tiers(tmp_path, 78, device_fraction=1.0)) as cache:
        ours = qwen3.generate(ids, attention_mask=mask, max_new_tokens=8, cache=cache, **GREEDY)
        assert [type(layer) for layer in cache.layers] == [TieredLayer] * 3
    assert_same_generation(reference, ours)


def test_beam_search_equals_dynamic_cache(qwen3, tmp_path):
    ids, mask = left_padded_batch(seed=4)
    beams = dict(num_beams=2, max_new_tokens=20, do_sample=False)
    reference = qwen3.generate(ids, attention_mask=mask, **beams)
    with TieredCache(tiers(tmp_path, 90 * 2), config=qwen3.config) as cache:
        ours = qwen3.generate(ids, attention_mask=mask, cache=cache, **beams)
    assert torch.equal(reference, ours)


def test_assisted_decoding_crops_and_equals_dynamic_cache(qwen3, tmp_path):
    # Prompt lookup drafts tokens from the prompt; rejected drafts are cropped from the cache.
    generator = torch.Generator().manual_seed(5)
    pattern = torch.randint(1, 256, (1, 9), generator=generator)
    ids = pattern.repeat(1, 6)  # [1, 54]: repeats give the lookup something to draft
    lookup = dict(max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=5)
    reference = qwen3.generate(ids, **lookup)
    with TieredCache(tiers(tmp_path, 80), config=qwen3.config) as cache:
        cropped = []
        crop = cache.crop
        cache.crop = lambda n: (cropped.append(n), crop(n))[1]  # count the crops; the cache still crops
        ours = qwen3.generate(ids, cache=cache, **lookup)
    assert torch.equal(reference, ours)
    assert any(n < 0 for n in cropped)


def test_multi_turn_through_one_cache_equals_dynamic_cache(qwen3, tmp_path):
    generator = torch.Generator().manual_seed(6)
    turns = [torch.randint(1, 256, (1, n), generator=generator) for n in (40, 23, 17)]
    caches = {"dynamic": DynamicCache(), "tiered": TieredCache(tiers(tmp_path, 200), config=qwen3.config)}
    outputs = {}
    for name, cache in caches.items():
        conversation = torch.empty(1, 0, dtype=torch.long)
        steps = []
        for turn in turns:
            conversation = torch.cat([conversation, turn], dim=1)
            out = qwen3.generate(conversation, max_new_tokens=12, cache=cache, **GREEDY)
            conversation = out.sequences
            steps.append(out)
        outputs[name] = steps
    for reference, ours in zip(outputs["dynamic"], outputs["tiered"]):
        assert_same_generation(reference, ours)
    caches["tiered"].close()


def test_sliding_window_layers_stay_in_transformers_layers(tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=24, max_window_layers=1)
    model = Qwen2ForCausalLM(config).eval()
    ids, mask = left_padded_batch(seed=7)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=DynamicCache(config=config), **GREEDY)
    with TieredCache(tiers(tmp_path, 86), config=config) as cache:
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=cache, **GREEDY)
        assert [type(layer) for layer in cache.layers] == [TieredLayer, DynamicSlidingWindowLayer, DynamicSlidingWindowLayer]
    assert_same_generation(reference, ours)


def test_batch_operations_share_full_blocks_and_copy_the_partial_one(tmp_path):
    store = TieredStore(tiers(tmp_path, 200, device_fraction=1.0))
    cache = TieredCache(store=store)
    states = torch.randn(2, 2, 40, 16)  # [batch, kv_heads, seq, head_dim]: 2 full blocks + 8 tokens
    cache.update(states, states + 1, 0)
    layer = cache.layers[0]
    before = cache.block_keys(0)
    cache.batch_repeat_interleave(2)
    after = cache.block_keys(0)
    assert [row[:2] for row in after] == [before[0][:2]] * 2 + [before[1][:2]] * 2  # shared by reference
    assert len({row[2] for row in after}) == 4  # each row has its own partial block
    keys, values = layer.update(torch.zeros(4, 2, 1, 16), torch.zeros(4, 2, 1, 16))
    assert keys.shape == (4, 2, 41, 16)
    assert torch.equal(keys[:, :, :40], states.repeat_interleave(2, dim=0))
    assert torch.equal(values[:, :, :40], (states + 1).repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([3, 0]))
    keys, _ = layer.update(torch.ones(2, 2, 1, 16), torch.ones(2, 2, 1, 16))
    assert torch.equal(keys[0, :, :40], states[1]) and torch.equal(keys[1, :, :40], states[0])
    cache.crop(-30)
    keys, _ = layer.update(torch.ones(2, 2, 1, 16), torch.ones(2, 2, 1, 16))
    assert keys.shape == (2, 2, 13, 16) and torch.equal(keys[0, :, :12], states[1, :, :12])
    seen = {key for rows in (before, after, cache.block_keys(0)) for row in rows for key in row}
    assert sum(store.holding(seen)) == 2  # what the rows list now, nothing left behind
    cache.close()
    assert not any(store.holding(seen))
    assert store.stats()["tiers"]["device"]["blocks"] == 0
    store.close()
