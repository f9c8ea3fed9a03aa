"""TieredCache.for_prompt and commit: content-keyed prefix blocks reused across cache objects and across
stores reopened over one disk directory, on a tiny random Qwen3 (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from runtime.hf import TieredCache, model_fingerprint
from tiered import StoreConfig, TieredStore

BLOCK_TOKENS = 16
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, bos_token_id=None,
             eos_token_id=None)
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()


def store_config(tmp_path, model, **overrides) -> StoreConfig:
    fields = dict(device="cpu", device_bytes=1 << 20, host_bytes=1 << 20, disk_dir=str(tmp_path / "kv"),
                  block_tokens=BLOCK_TOKENS, layers=2, fingerprint=model_fingerprint(model.config))
    return StoreConfig(**(fields | overrides))


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(seed))  # [1, n]


def test_for_prompt_reuses_the_committed_turn_and_equals_dynamic_cache(qwen3, tmp_path):
    with TieredStore(store_config(tmp_path, qwen3)) as store:
        first = ids_of(50, seed=1)
        cache = TieredCache.for_prompt(store, first, config=qwen3.config)
        assert cache.reused_tokens == 0
        out = qwen3.generate(first, max_new_tokens=20, cache=cache, **GREEDY)
        assert all(key.namespace.startswith("c:") for key in cache.block_keys(0)[0][:3])  # the prompt's full blocks
        cache.commit(out.sequences)  # the answer's full blocks are sealed too: 69 tokens held, 4 full blocks
        assert all(key.namespace.startswith("c:") for key in cache.block_keys(1)[0][:4])
        cache.close()

        second = torch.cat([out.sequences, ids_of(11, seed=2)], dim=1)  # [1, 81]
        again = TieredCache.for_prompt(store, second, config=qwen3.config)
        assert again.reused_tokens == 4 * BLOCK_TOKENS
        ours = qwen3.generate(second, max_new_tokens=10, cache=again, **GREEDY)
        reference = qwen3.generate(second, max_new_tokens=10, cache=DynamicCache(), **GREEDY)
        assert torch.equal(reference.sequences, ours.sequences)
        for expected, got in zip(reference.logits, ours.logits):
            assert torch.allclose(expected, got, atol=1e-5, rtol=0)
        assert store.stats()["seal_hits"] == 0  # the reused blocks were read, never recomputed
        again.close()


def test_for_prompt_finds_blocks_a_closed_store_left_on_disk(qwen3, tmp_path):
    prompt = ids_of(70, seed=3)
    with TieredStore(store_config(tmp_path, qwen3)) as store:
        cache = TieredCache.for_prompt(store, prompt, config=qwen3.config)
        qwen3.generate(prompt, max_new_tokens=2, cache=cache)
        store.flush()
        cache.close()
    with TieredStore(store_config(tmp_path, qwen3)) as reopened:  # as another process would
        cache = TieredCache.for_prompt(reopened, prompt, config=qwen3.config)
        assert cache.reused_tokens == 64
        assert {reopened.where(key) for key in cache.block_keys(0)[0]} == {"disk"}
        ours = qwen3.generate(prompt, max_new_tokens=6, cache=cache, **GREEDY)
        reference = qwen3.generate(prompt, max_new_tokens=6, cache=DynamicCache(), **GREEDY)
        assert torch.equal(reference.sequences, ours.sequences)
        cache.close()


def test_a_salt_or_another_model_finds_nothing(qwen3, tmp_path):
    prompt = ids_of(40, seed=4)
    with TieredStore(store_config(tmp_path, qwen3, disk_dir=None)) as store:
        cache = TieredCache.for_prompt(store, prompt, config=qwen3.config)
        qwen3.generate(prompt, max_new_tokens=2, cache=cache)
        assert TieredCache.for_prompt(store, prompt, config=qwen3.config).reused_tokens == 32
        assert TieredCache.for_prompt(store, prompt, config=qwen3.config, salt="tenant-b").reused_tokens == 0
        other = Qwen3Config(**(SHAPE | dict(rms_norm_eps=1e-5)))
        with pytest.raises(ValueError, match="content keys must never mix models"):
            TieredCache.for_prompt(store, prompt, config=other)


def test_commit_refuses_ids_that_contradict_the_cache(qwen3, tmp_path):
    with TieredStore(store_config(tmp_path, qwen3, disk_dir=None)) as store:
        cache = TieredCache.for_prompt(store, [5] * 20, config=qwen3.config)
        with pytest.raises(ValueError, match="differ"):
            cache.commit([5] * 10 + [6])
        with pytest.raises(TypeError, match="ints"):
            cache.commit([5.0, 1.0])
        with pytest.raises(ValueError, match="one"):
            TieredCache.for_prompt(store, torch.ones(2, 20, dtype=torch.long), config=qwen3.config)


def test_crop_forgets_ids_so_redrafted_tokens_are_not_sealed_under_the_old_ones(qwen3, tmp_path):
    with TieredStore(store_config(tmp_path, qwen3, disk_dir=None)) as store:
        prompt = ids_of(40, seed=5)
        cache = TieredCache.for_prompt(store, prompt, config=qwen3.config)
        qwen3(prompt, cache=cache)  # 40 tokens held: 2 full blocks sealed
        cache.crop(-20)  # 20 held: block 1 is private again, and its ids unknown
        assert cache.block_keys(0)[0][1].namespace.startswith("hf-")
        different = torch.cat([prompt[:, :20], ids_of(12, seed=6)], dim=1)
        qwen3(different[:, 20:], cache=cache)  # block 1 fills with other tokens: no ids known, no seal
        assert cache.block_keys(0)[0][1].namespace.startswith("hf-")
        cache.commit(different)
        assert cache.block_keys(0)[0][1].namespace.startswith("c:")
        assert TieredCache.for_prompt(store, different, config=qwen3.config).reused_tokens == 16 * 1
