"""The tiered KV manager on a tiny random Llama: exact equals a full cache wherever blocks live."""

from __future__ import annotations

import pytest
import torch

from policies import PREFETCH
from runtime import load_model
from runtime.kv import KVManager, grouped_attention
from runtime.kv.attention import attention_over_runs
from runtime.model import DenseKV
from runtime.session import Session
from tiered import StoreConfig, TieredStore
from tiered.content import is_content_key
from tiered.gather import DenseRun

from .tiny_models import write_hf_dir

BLOCK_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    write_hf_dir(directory, "llama", seed=3)
    return load_model(directory)


def block_bytes(model) -> int:
    cfg = model.config
    return 2 * cfg.num_kv_heads * BLOCK_TOKENS * cfg.head_dim * 4


def store_config(model, device_blocks: int, host_blocks: int = 4096, **overrides) -> StoreConfig:
    fields = dict(
        device="cpu",
        device_bytes=device_blocks * block_bytes(model),
        host_bytes=host_blocks * block_bytes(model),
        block_tokens=BLOCK_TOKENS,
    )
    fields.update(overrides)
    return StoreConfig(**fields)


def run(model, session: Session, ids: list[int], chunk: int = 37) -> torch.Tensor:
    """Teacher-force `ids` in uneven chunks (so blocks fill across calls): logits [n, vocab]."""
    return torch.cat([session.extend(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])


def prompt(model, tokens: int = 180) -> list[int]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, model.config.vocab_size, (tokens,), generator=generator).tolist()


def test_grouped_attention_matches_repeated_heads():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(6, 5, 16, generator=generator)  # [heads, n, head_dim]
    keys = torch.randn(2, 12, 16, generator=generator)  # [kv_heads, S, head_dim]
    values = torch.randn(2, 12, 16, generator=generator)
    positions = torch.arange(7, 12)
    out, weights = grouped_attention(q, keys, values, positions, return_weights=True)
    repeated_k, repeated_v = keys.repeat_interleave(3, 0), values.repeat_interleave(3, 0)
    mask = torch.arange(12)[None, :] <= positions[:, None]  # [n, S]
    expected = torch.nn.functional.scaled_dot_product_attention(q, repeated_k, repeated_v, attn_mask=mask)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(6, 5))
    assert (weights[:, 0, 8:] == 0).all()  # the first query (position 7) sees keys 0..7 only


@pytest.mark.parametrize("n", [1, 5])
def test_attention_over_runs_equals_attention_over_the_joined_runs(n):
    """Device blocks in several runs of slots are attended where they are: one softmax over every
    run's scores equals grouped attention over one joined copy (decode, and a causal chunk)."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(6, n, 16, generator=generator)  # [heads, n, head_dim]
    keys = torch.randn(2, 40, 16, generator=generator)  # [kv_heads, S, head_dim]
    values = torch.randn(2, 40, 16, generator=generator)
    positions = torch.arange(40 - n, 40)
    runs = [DenseRun(keys[:, a:b], values[:, a:b], a) for a, b in ((0, 16), (16, 24), (24, 40))]
    expected, _ = grouped_attention(q, keys, values, positions)
    assert torch.allclose(attention_over_runs(q, runs, positions), expected, atol=1e-6)
    assert torch.equal(attention_over_runs(q, [DenseRun(keys, values, 0)], positions), expected)  # one run: the same


def test_exact_mode_equals_a_dense_cache(tiny):
    ids = prompt(tiny)
    dense = DenseKV.for_model(tiny)
    chunks = [(i, min(i + 37, len(ids))) for i in range(0, len(ids), 37)]
    expected = torch.cat([tiny.forward(torch.tensor(ids[a:b]), torch.arange(a, b), dense) for a, b in chunks])
    with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
        got = run(tiny, session, ids)
        assert session.store.stats()["tiers"]["host"]["blocks"] == 0
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("host_codec", ["raw"])
def test_exact_mode_through_host_and_disk_equals_all_on_device(tiny, tmp_path, host_codec):
    ids = prompt(tiny)
    with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
        expected = run(tiny, session, ids)
        expected_tokens = session.generate(20)
    # 2 layers x 23 blocks: 4 device slots and 10 host slots push most blocks to disk
    config = store_config(tiny, device_blocks=4, host_blocks=10, host_codec=host_codec, disk_dir=str(tmp_path / "kv"))
    with Session(tiny, config) as session:
        got = run(tiny, session, ids)
        tokens = session.generate(20)
        tiers = session.store.stats()["tiers"]
    assert tiers["host"]["blocks"] > 0 and tiers["disk"]["blocks"] > 0 and tiers["disk"]["hits"] > 0
    assert (got - expected).abs().max().item() <= 1e-5
    assert tokens == expected_tokens


def test_sparse_mode_with_a_budget_above_the_context_equals_exact(tiny):
    ids = prompt(tiny, 100)
    with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
        run(tiny, session, ids)
        expected = session.generate(10)
    with Session(tiny, store_config(tiny, device_blocks=1024), mode="sparse", budget_tokens=256) as session:
        run(tiny, session, ids)
        assert session.generate(10) == expected
        assert session.stats()["kv"]["sparse_steps"] == 0


@pytest.mark.parametrize("device_blocks", [1024, 2 * 4], ids=["all on the device", "most in int8 below"])
def test_sparse_pages_attended_in_the_pool_equal_pages_copied_out(tiny, device_blocks):
    """A sparse step scores and chooses its pages in one C call (Quest, the default) and attends
    them where they lie: in the device pool (one fused call) and, below the device, in the int8
    codes (the fused kernel, each head's pages marked). The same steps scored in torch and reading
    the pages out first (read_pages decodes, then attention) give the same logits."""
    ids = prompt(tiny, 160)
    sparse = dict(mode="sparse", budget_tokens=6 * BLOCK_TOKENS, sink_tokens=8, window_tokens=16, dense_layers=0)
    config = store_config(tiny, device_blocks=device_blocks, host_codec="int8" if device_blocks < 1024 else "raw")
    logits = []
    for fused in (True, False):
        with Session(tiny, config, **sparse) as session:
            assert session.kv.sparse.fused  # head_dim 16, fp32 on the CPU
            session.kv.sparse.fused = fused
            run(tiny, session, ids[:150])
            copied = []  # the steps that read their pages out (read_pages)
            read_pages = session.store.read_pages
            session.store.read_pages = lambda *args, **kwargs: copied.append(1) or read_pages(*args, **kwargs)
            logits.append(torch.cat([session.extend([token]) for token in ids[150:]]))  # decode steps
            assert session.stats()["kv"]["sparse_steps"] == tiny.config.num_layers * 10
            assert len(copied) == (0 if fused else tiny.config.num_layers * 10)
            tiers = session.store.stats()["tiers"]
            assert (tiers["host"]["hits"] > 0) == (device_blocks < 1024)
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("importance", ["quest", "h2o", "snapkv", "tova", "recency"])
def test_sparse_mode_reads_only_its_budget(tiny, importance):
    ids = prompt(tiny, 160)  # 20 blocks of 8 tokens per layer
    budget = 6 * BLOCK_TOKENS
    sparse = dict(mode="sparse", budget_tokens=budget, importance=importance, sink_tokens=8, window_tokens=16, dense_layers=0)
    with Session(tiny, store_config(tiny, device_blocks=1024), **sparse) as session:
        run(tiny, session, ids)
        before = session.kv.counters.attended_tokens
        generated = session.generate(8, stop=[])
        stats = session.stats()["kv"]
    layers = tiny.config.num_layers
    assert len(generated) == 8
    assert stats["sparse_steps"] == layers * 8  # every generated token is fed back: one step each
    assert stats["attended_tokens"] - before <= layers * 8 * budget  # tokens each KV head read
    assert all(0 <= token < tiny.config.vocab_size for token in generated)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_every_prefetch_policy_runs_in_a_session_and_changes_no_token(tiny, tmp_path, mode):
    """Blocks spread over device, host and disk; each prefetch policy of the registry moves
    blocks in the background while the session decodes, and the tokens are those of `none`."""
    options = dict(mode=mode)
    if mode == "sparse":  # every layer sparse, so next-layer plans for a layer that has a next one
        options.update(budget_tokens=48, page_tokens=8, sink_tokens=8, window_tokens=16, dense_layers=0)
    outputs, requested = {}, {}
    for name in sorted(PREFETCH):
        config = store_config(tiny, device_blocks=12, host_blocks=10, disk_dir=tmp_path / name)
        with Session(tiny, config, prefetch=name, **options) as session:
            session.extend(prompt(tiny, 150))
            outputs[name] = session.generate(12, stop=[])
            stats = session.stats()["store"]
            requested[name] = stats["prefetch"]["requested_blocks"]
            assert stats["prefetch"]["failed_blocks"] == 0
    assert all(tokens == outputs["none"] for tokens in outputs.values()), outputs
    if mode == "sparse":
        assert requested["none"] == 0 and all(requested[name] > 0 for name in PREFETCH if name != "none")


def test_truncate_undoes_tokens_so_a_replay_gives_the_same_logits(tiny):
    ids = prompt(tiny, 60)
    with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
        first = run(tiny, session, ids)
        session.kv.truncate(20)
        session.tokens = session.tokens[:20]
        again = session.extend(ids[20:])
        assert session.kv.lengths == [60] * tiny.config.num_layers
    # the replayed blocks sit in other slots: read in two runs merged by log-sum-exp, not one
    assert torch.allclose(again, first[20:], atol=1e-5)


def test_a_failed_extend_leaves_the_session_as_it_was(tiny):
    ids = prompt(tiny, 30)
    with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
        run(tiny, session, ids)
        blocks = len(session.store)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
            session.extend([5, 512])
        with pytest.raises(ValueError, match="takes at most 256"):
            session.extend(list(range(3, 3 + 256)))
        assert len(session.tokens) == 30 and len(session.store) == blocks
        assert session.kv.lengths == [30] * tiny.config.num_layers


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(mode="fast"), ValueError, "mode must be one of"),
        (dict(mode="sparse"), ValueError, "sparse mode needs budget_tokens"),
        (dict(mode="sparse", budget_tokens=8), ValueError, "sparse mode needs budget_tokens"),
        (dict(mode="sparse", budget_tokens=64, importance="magic"), ValueError, "valid names"),
        (dict(mode="sparse", budget_tokens=64, importance="oracle"), ValueError, "tiered experiment"),
        (dict(prefetch="psychic"), ValueError, "valid names"),
    ],
)
def test_bad_session_arguments_are_rejected(tiny, kwargs, error, words):
    with pytest.raises(error, match=words):
        Session(tiny, store_config(tiny, device_blocks=64), **kwargs)


def test_generate_needs_a_prompt_and_a_closed_session_refuses_work(tiny):
    session = Session(tiny, store_config(tiny, device_blocks=64))
    with pytest.raises(ValueError, match="needs a prompt"):
        session.generate(3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(session.stream(-1))
    with pytest.raises(TypeError, match="ints"):
        session.extend(["a"])
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.extend([1, 2])


def test_sessions_sharing_a_store_keep_their_blocks_apart(tiny):
    ids = prompt(tiny, 50)
    config = store_config(tiny, device_blocks=1024, layers=tiny.config.num_layers)
    with TieredStore(config) as store:
        a = Session(tiny, store=store)
        b = Session(tiny, store=store)
        logits_a = run(tiny, a, ids)
        logits_b = run(tiny, b, ids[::-1])
        with Session(tiny, store_config(tiny, device_blocks=1024)) as alone:
            assert torch.allclose(run(tiny, alone, ids), logits_a, atol=1e-6)
        assert not torch.allclose(logits_a, logits_b)
        keys_a = [key for keys in a.kv.block_keys for key in keys]
        keys_b = [key for keys in b.kv.block_keys for key in keys]
        assert not set(keys_a) & set(keys_b)
        a.close()
        assert all(store.holding(keys_b))
        assert all(store.references(key) == 0 for key in keys_a)  # a's full blocks stay cached, unreferenced
        assert not any(store.holding([key for key in keys_a if not is_content_key(key)]))  # its own are gone
        b.close()
        assert all(is_content_key(key) and store.references(key) == 0 for key in store.keys())


def test_sampling_is_reproducible_with_a_seed(tiny):
    ids = prompt(tiny, 20)
    outputs = []
    for _ in range(2):
        with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
            session.extend(ids)
            outputs.append(session.generate(12, temperature=0.8, seed=11, stop=[]))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 12


def test_top_p_samples_only_from_the_nucleus(tiny):
    from runtime.session import _choose

    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([4.0, 3.0, 2.0, 0.0, -1.0])  # softmax: 0.64, 0.23, 0.09, 0.01, 0.004
    drawn = {_choose(logits, 1.0, generator, top_p=0.8) for _ in range(300)}
    assert drawn == {0, 1}  # 0.64 < 0.8 <= 0.64 + 0.23: the two most likely tokens
    assert {_choose(logits, 1.0, generator, top_p=1e-6) for _ in range(50)} == {0}  # at least one token
    assert len({_choose(logits, 1.0, generator, top_p=1.0) for _ in range(300)}) > 2
    ids = prompt(tiny, 20)
    with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
        session.extend(ids)
        greedy = session.generate(6, stop=[])
    with Session(tiny, store_config(tiny, device_blocks=1024)) as session:
        session.extend(ids)
        assert session.generate(6, temperature=1.0, seed=3, stop=[], top_p=1e-6) == greedy
        for bad in (0, 1.5, -0.1):
            with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
                session.generate(1, temperature=1.0, top_p=bad)
        with pytest.raises(TypeError, match="top_p must be a number, got True"):
            session.generate(1, temperature=1.0, top_p=True)


def test_kv_manager_rejects_positions_that_do_not_continue_the_sequence(tiny):
    cfg = tiny.config
    with TieredStore(store_config(tiny, device_blocks=64)) as store:
        kv = KVManager(store, "s", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        q = torch.zeros(cfg.num_heads, 1, cfg.head_dim)
        k = torch.zeros(cfg.num_kv_heads, 1, cfg.head_dim)
        with pytest.raises(ValueError, match="must start there, not at 5"):
            kv.attend(0, q, k, k, torch.tensor([5]))
