"""TieredCache on SmolLM2-135M through transformers (the GGUF the runtime ships): exact against
DynamicCache with a quarter of the KV on the device and raw host and disk tiers; close with int8."""

from __future__ import annotations

from contextlib import contextmanager
from importlib import resources

import pytest
import torch
from transformers import DynamicCache

from runtime.hf import ATTENTION, TieredCache
from runtime.passkey import passkey_prompt, passkeys
from tiered import StoreConfig

BLOCK_TOKENS = 64
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
BLOCK_NBYTES = 2 * KV_HEADS * BLOCK_TOKENS * HEAD_DIM * 4  # keys + values of one fp32 block
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def prompt(smollm2) -> torch.Tensor:
    """~700 tokens of the shipped Shakespeare text: [1, 700]."""
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return torch.tensor([smollm2.tokenizer.encode(text[:4000])[:700]])


def quarter_on_device(tmp_path, tokens: int, host_codec: str = "raw", disk: bool = True) -> StoreConfig:
    """Device: a quarter of `tokens` tokens' KV; host: another quarter and disk the rest (or, without
    `disk`, the host all the rest)."""
    blocks = LAYERS * -(-tokens // BLOCK_TOKENS)
    device_blocks = blocks // 4
    host_blocks = device_blocks if disk else blocks
    return StoreConfig(device="cpu", device_bytes=device_blocks * BLOCK_NBYTES, host_bytes=host_blocks * BLOCK_NBYTES,
                       host_codec=host_codec, disk_codec="raw", disk_dir=str(tmp_path / "kv") if disk else None,
                       disk_bytes=1 << 30, block_tokens=BLOCK_TOKENS)


@contextmanager
def attention(model, implementation: str):
    """The model's attention set to `implementation` for the block, then set back."""
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@pytest.mark.parametrize("implementation", ["sdpa", ATTENTION])
def test_greedy_32_tokens_equal_dynamic_cache_with_a_quarter_on_device(hf_smollm2, prompt, tmp_path, implementation):
    reference = hf_smollm2.generate(prompt, max_new_tokens=32, cache=DynamicCache(), **GREEDY)
    with TieredCache(quarter_on_device(tmp_path, 732), config=hf_smollm2.config) as cache, attention(hf_smollm2, implementation):
        ours = hf_smollm2.generate(prompt, max_new_tokens=32, cache=cache, **GREEDY)
        tiers = cache.store.stats()["tiers"]
        assert tiers["disk"]["blocks"] > 0 and tiers["host"]["blocks"] > 0
        assert tiers["device"]["used_bytes"] <= 0.25 * LAYERS * 12 * BLOCK_NBYTES
    assert torch.equal(reference.sequences, ours.sequences)
    tolerance = 1e-5 if implementation == "sdpa" else 1e-4  # the fused read sums in another order
    for step, (expected, got) in enumerate(zip(reference.logits, ours.logits)):
        assert torch.allclose(expected, got, atol=tolerance, rtol=0), f"logits differ at step {step}"


@pytest.mark.timeout(1800)  # 512 decode steps: minutes on a loaded 2-core CPU
@pytest.mark.parametrize("implementation", ["sdpa", ATTENTION])
def test_int8_host_codec_agrees_on_99_percent_of_256_greedy_tokens(hf_smollm2, prompt, tmp_path, implementation):
    # Agreement under teacher forcing: each step feeds DynamicCache's greedy token, so one early
    # disagreement does not count as every later one.
    short = prompt[:, :128]
    reference = hf_smollm2.generate(short, max_new_tokens=256, min_new_tokens=256, cache=DynamicCache(), do_sample=False)
    tokens = reference[0, 128:]
    with TieredCache(quarter_on_device(tmp_path, 384, host_codec="int8", disk=False), config=hf_smollm2.config) as cache:
        with torch.no_grad(), attention(hf_smollm2, implementation):
            logits = hf_smollm2(short, cache=cache).logits[:, -1]
            agree = 0
            for step, token in enumerate(tokens):
                agree += int(logits.argmax(-1).item() == token.item())
                logits = hf_smollm2(token.view(1, 1), cache=cache).logits[:, -1]
        assert cache.store.stats()["tiers"]["host"]["blocks"] > 0  # int8 blocks took part
    assert agree / len(tokens) >= 0.99, f"{agree}/{len(tokens)}"


def test_three_turns_through_one_cache_equal_dynamic_cache(hf_smollm2, prompt, tmp_path):
    turns = [prompt[:, :300], prompt[:, 300:400], prompt[:, 400:460]]
    results = {}
    for name in ("dynamic", "tiered"):
        store_config = quarter_on_device(tmp_path, 520, disk=False)
        cache = DynamicCache() if name == "dynamic" else TieredCache(store_config, config=hf_smollm2.config)
        conversation, steps = torch.empty(1, 0, dtype=torch.long), []
        for turn in turns:
            out = hf_smollm2.generate(torch.cat([conversation, turn], dim=1), max_new_tokens=16, cache=cache, **GREEDY)
            conversation = out.sequences
            steps.append(out)
        results[name] = steps
        if name == "tiered":
            cache.close()
    for reference, ours in zip(results["dynamic"], results["tiered"]):
        assert torch.equal(reference.sequences, ours.sequences)
        for expected, got in zip(reference.logits, ours.logits):
            assert torch.allclose(expected, got, atol=1e-5, rtol=0)


@pytest.mark.timeout(900)
def test_sparse_cache_finds_passkeys_reading_an_eighth_of_each_layer(hf_smollm2, smollm2, tmp_path):
    # Quest pages per KV head at 12.5% of a ~1.9K-token haystack, the rest int8 on the host: the keys our
    # own sparse sessions find there (bench_passkey.py misses only the shallowest, depth 0.05)
    found = []
    with attention(hf_smollm2, ATTENTION):
        for key, depth in passkeys(4)[1:]:  # depths 0.35, 0.65, 0.95
            ids = torch.tensor([passkey_prompt(smollm2.tokenizer, key, depth)])  # [1, ~1880]
            budget = ids.shape[1] // 8
            store = StoreConfig(device="cpu", device_bytes=32 << 20, host_bytes=128 << 20, host_codec="int8",
                                block_tokens=BLOCK_TOKENS)
            with TieredCache(store, config=hf_smollm2.config, sparse={"budget_tokens": budget}) as cache:
                out = hf_smollm2.generate(ids, max_new_tokens=7, do_sample=False, cache=cache)
                assert cache.store.stats()["tiers"]["host"]["blocks"] > 0
            found.append(key in smollm2.tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    assert found == [True, True, True]
