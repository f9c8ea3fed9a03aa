"""Replay's sparse step is the runtime's: on random keys, values and queries, the pages
policies.trace.replay.sparse_step keeps, per KV head, are those runtime/kv/sparse.py reads
through the KV manager, step after step (stateful estimators learn the same thing from it)."""

from __future__ import annotations

import pytest
import torch

from policies import make_importance
from policies.importance import key_bounds
from policies.trace.format import attention_logits
from policies.trace.replay import sparse_step
from runtime.kv import KVManager
from tiered import StoreConfig, TieredStore

BLOCK_TOKENS, PAGE_TOKENS = 64, 16
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
BUDGET_TOKENS, SINK_TOKENS, WINDOW_TOKENS = 96, 16, 16
PROMPT_TOKENS, STEPS = 300, 8


def expected_output(q, keys, values, keep, tokens):
    """Each head's attention over its KV head's kept pages: [heads, 1, head_dim]."""
    visible = torch.zeros(KV_HEADS, -(-tokens // PAGE_TOKENS), dtype=torch.bool)  # [kv_heads, pages]
    visible.scatter_(1, keep, True)
    visible = visible.repeat_interleave(PAGE_TOKENS, 1)[:, :tokens].repeat_interleave(HEADS // KV_HEADS, 0)
    logits = attention_logits(q[:, 0], keys, HEAD_DIM**-0.5)  # [heads, tokens]
    weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    per_kv = values.repeat_interleave(HEADS // KV_HEADS, 0)  # [heads, tokens, head_dim]
    return (weights[:, None, :] @ per_kv).view(HEADS, 1, HEAD_DIM)


@pytest.mark.parametrize("importance", ["quest", "h2o", "tova", "snapkv", "recency"])
def test_replay_keeps_the_pages_the_runtime_reads(importance):
    gen = torch.Generator().manual_seed(7)
    config = StoreConfig(device="cpu", device_bytes=64 << 20, host_bytes=64 << 20, block_tokens=BLOCK_TOKENS)
    with TieredStore(config) as store:
        manager = KVManager(
            store, "s", 1, KV_HEADS, HEAD_DIM, mode="sparse", budget_tokens=BUDGET_TOKENS, importance=importance,
            page_tokens=PAGE_TOKENS, sink_tokens=SINK_TOKENS, window_tokens=WINDOW_TOKENS, dense_layers=0,
        )  # fmt: skip
        keys = torch.randn(KV_HEADS, PROMPT_TOKENS, HEAD_DIM, generator=gen)  # [kv_heads, tokens, head_dim]
        values = torch.randn(KV_HEADS, PROMPT_TOKENS, HEAD_DIM, generator=gen)
        prompt_q = torch.randn(HEADS, PROMPT_TOKENS, HEAD_DIM, generator=gen)
        manager.attend(0, prompt_q, keys, values, torch.arange(PROMPT_TOKENS))  # prefill: exact, no update
        kwargs = {"scale": HEAD_DIM**-0.5} if importance == "quest" else {}
        estimator = make_importance(importance, block_tokens=PAGE_TOKENS, **kwargs)
        heads_disagree = False
        for _ in range(STEPS):
            tokens = keys.shape[1] + 1
            q = 2 * torch.randn(HEADS, 1, HEAD_DIM, generator=gen)  # [heads, 1, head_dim]
            k, v = (torch.randn(KV_HEADS, 1, HEAD_DIM, generator=gen) for _ in range(2))
            keys, values = torch.cat([keys, k], 1), torch.cat([values, v], 1)
            out = manager.attend(0, q, k, v, torch.tensor([tokens - 1]))
            assert manager.counters.sparse_steps > 0
            key_min, key_max = key_bounds(keys, PAGE_TOKENS)
            keep, _ = sparse_step(
                estimator, q[:, 0], key_min, key_max, attention_logits(q[:, 0], keys, HEAD_DIM**-0.5),
                budget_blocks=BUDGET_TOKENS // PAGE_TOKENS, sink_blocks=SINK_TOKENS // PAGE_TOKENS,
                window_blocks=WINDOW_TOKENS // PAGE_TOKENS,
            )  # fmt: skip
            assert keep.shape == (KV_HEADS, BUDGET_TOKENS // PAGE_TOKENS)
            torch.testing.assert_close(out, expected_output(q, keys, values, keep, tokens), atol=1e-5, rtol=1e-5)
            heads_disagree |= not torch.equal(keep[0], keep[1])
        runtime_estimator = manager.sparse.estimators[0]
        torch.testing.assert_close(
            runtime_estimator.score(q[:, 0], key_min, key_max), estimator.score(q[:, 0], key_min, key_max)
        )  # what a stateful estimator learned is the same
        assert manager.counters.sparse_steps == STEPS
    if importance in ("quest", "tova"):  # (recency scores every head alike; h2o keeps what it first kept)
        assert heads_disagree  # the check is per head: one shared set would fail it
