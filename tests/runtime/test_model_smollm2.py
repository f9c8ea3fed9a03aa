"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on the same file."""

from __future__ import annotations

import torch

from runtime import load_model
from runtime.model import DenseKV, Model
from runtime.model.cache import entry_path
from runtime.model.gguf_loader import file_digest
from runtime.model.load import smollm2_135m

TOLERANCE = 1e-4


def test_default_model_is_smollm2(smollm2):
    cfg = smollm2.config
    assert isinstance(smollm2, Model)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (49152, 576, 30, 9, 3, 64)
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert smollm2.dtype == torch.float32 and smollm2.device == torch.device("cpu")
    assert len(smollm2.fingerprint) == 32 and smollm2.fingerprint == cfg.fingerprint


def test_dequantized_weights_equal_transformers(smollm2, hf_smollm2):
    """Q4_1/Q8_0 dequantization and the undoing of llama.cpp's q/k row permutation, tensor by tensor."""
    cfg, reference = smollm2.config, hf_smollm2.state_dict()
    assert torch.equal(smollm2.embedding, reference["model.embed_tokens.weight"])
    assert torch.equal(smollm2.final_norm, reference["model.norm.weight"])
    for index in (0, cfg.num_layers - 1):
        layer, prefix = smollm2.layers[index], f"model.layers.{index}."
        q, k, v = layer.qkv.split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim])
        gate, up = layer.gate_up.chunk(2)
        for ours, name in ((q, "self_attn.q_proj"), (k, "self_attn.k_proj"), (v, "self_attn.v_proj"),
                           (layer.out, "self_attn.o_proj"), (gate, "mlp.gate_proj"), (up, "mlp.up_proj"),
                           (layer.down, "mlp.down_proj"), (layer.attention_norm, "input_layernorm"),
                           (layer.mlp_norm, "post_attention_layernorm")):
            assert torch.equal(ours, reference[prefix + name + ".weight"]), name


def test_prefill_logits_equal_transformers(smollm2, hf_smollm2, shakespeare_prompt):
    ids = shakespeare_prompt
    with torch.inference_mode():
        expected = hf_smollm2(ids[None]).logits[0].float()  # [tokens, vocab]
    logits = smollm2.forward(ids, torch.arange(len(ids)), DenseKV.for_model(smollm2))
    assert logits.shape == (len(ids), 49152) and logits.dtype == torch.float32
    assert (logits - expected).abs().max().item() <= TOLERANCE
    # chunked prefill (the cache already holds tokens when a chunk arrives) gives the same logits
    kv = DenseKV.for_model(smollm2, capacity_tokens=16)
    chunks = [smollm2.forward(ids[start:start + 100], torch.arange(start, min(start + 100, len(ids))), kv)
              for start in range(0, len(ids), 100)]
    assert (torch.cat(chunks) - expected).abs().max().item() <= TOLERANCE
    assert kv.length_tokens(0) == kv.length_tokens(29) == len(ids)


def test_token_by_token_logits_equal_transformers(smollm2, hf_smollm2, shakespeare_prompt):
    """Prefill 96 tokens, then decode the other 160 one at a time, against transformers with a DynamicCache."""
    from transformers import DynamicCache

    ids, prefill = shakespeare_prompt, 96
    kv = DenseKV.for_model(smollm2, capacity_tokens=64)  # grows twice on the way
    ours = [smollm2.forward(ids[:prefill], torch.arange(prefill), kv)]
    ours += [smollm2.forward(ids[i:i + 1], torch.tensor([i]), kv) for i in range(prefill, len(ids))]
    cache = DynamicCache()
    with torch.inference_mode():
        expected = [hf_smollm2(ids[None, :prefill], past_key_values=cache, use_cache=True).logits[0]]
        expected += [hf_smollm2(ids[None, i:i + 1], past_key_values=cache, use_cache=True).logits[0]
                     for i in range(prefill, len(ids))]
    assert (torch.cat(ours) - torch.cat(expected).float()).abs().max().item() <= TOLERANCE
    assert kv.length_tokens(0) == len(ids)


def test_greedy_chat_answer(smollm2, hf_smollm2):
    """A real question, answered greedily: the same tokens as transformers' generate, and the right answer."""
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    kv, generated = DenseKV.for_model(smollm2), []
    logits = smollm2.forward(torch.tensor(prompt), torch.arange(len(prompt)), kv)
    for position in range(len(prompt), len(prompt) + 12):
        token = int(logits[-1].argmax())
        generated.append(token)
        if token == smollm2.tokenizer.eos_token_id:
            break
        logits = smollm2.forward(torch.tensor([token]), torch.tensor([position]), kv)
    assert "Paris" in smollm2.tokenizer.decode(generated)
    with torch.inference_mode():
        expected = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=len(generated), do_sample=False)
    assert expected[0, len(prompt):].tolist() == generated


def test_bfloat16_runs_and_agrees(smollm2, shakespeare_prompt):
    model = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.layers[0].qkv.dtype == torch.bfloat16
    assert model.fingerprint != smollm2.fingerprint  # dtype is part of what makes a KV cache
    ids = shakespeare_prompt[:128]
    low = model.forward(ids, torch.arange(len(ids)), DenseKV.for_model(model))
    full = smollm2.forward(ids, torch.arange(len(ids)), DenseKV.for_model(smollm2))
    assert low.dtype == torch.float32
    assert (low.argmax(-1) == full.argmax(-1)).float().mean().item() >= 0.9


def test_load_is_cached_and_deterministic(smollm2):
    again = load_model()
    assert again.fingerprint == smollm2.fingerprint
    assert torch.equal(again.layers[3].qkv, smollm2.layers[3].qkv)
    assert entry_path(file_digest(smollm2_135m())).is_file()  # the dequantized weights, for the next load
