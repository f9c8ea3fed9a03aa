"""Sessions on one store share prefix blocks by content, recompute what another session's pressure
pushed out of every tier, refuse a conversation the store cannot hold, and run from several threads."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime import Session, load_model
from tiered import BlockKey, StoreConfig, TieredStore
from tiered.content import is_content_key

from .tiny_models import write_hf_dir

BLOCK = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-sharing")
    write_hf_dir(directory, "llama", seed=3)
    return load_model(directory)


def block_bytes(model) -> int:
    cfg = model.config
    return 2 * cfg.num_kv_heads * BLOCK * cfg.head_dim * 4


def config(model, device_blocks=1024, host_blocks=1024, **overrides) -> StoreConfig:
    return StoreConfig(device="cpu", device_bytes=device_blocks * block_bytes(model),
                       host_bytes=host_blocks * block_bytes(model), block_tokens=BLOCK, **overrides)


def ids(model, tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (tokens,), generator=generator).tolist()


def conversation(session: Session, prompt: list[int], generate: int = 12, chunk: int = 40) -> list[int]:
    for i in range(0, len(prompt), chunk):
        session.extend(prompt[i : i + chunk])
    return session.generate(generate, stop=[])


# Exact: b reads in chunks of 40; of a chunk that ends on a block boundary the last token is computed
# again, for its logits (3 here). Sparse: b reads in one call, so that every key it attends is one a
# computed (a recomputed token's float noise may tip a near-tie of page selection).
@pytest.mark.parametrize("mode, chunk, recomputed", [("exact", 40, 3), ("sparse", 1000, 0)])
def test_a_second_session_reuses_the_shared_prefix_and_answers_as_if_alone(tiny, mode, chunk, recomputed):
    options = dict(mode=mode, budget_tokens=64, sink_tokens=8, window_tokens=16, dense_layers=0) if mode == "sparse" else {}
    document = ids(tiny, 120, seed=1)
    question_a, question_b = ids(tiny, 15, seed=2), ids(tiny, 15, seed=3)
    with Session(tiny, config(tiny), **options) as alone:
        expected_b = conversation(alone, document + question_b)
    with TieredStore(config(tiny, layers=tiny.config.num_layers)) as store:
        a = Session(tiny, store=store, **options)
        conversation(a, document + question_a)
        b = Session(tiny, store=store, **options)
        assert conversation(b, document + question_b, chunk=chunk) == expected_b
        stats = b.stats()
        assert stats["reused_tokens"] == len(document) // BLOCK * BLOCK - recomputed
        assert stats["computed_tokens"] == len(document + question_b) + 12 - stats["reused_tokens"]
        shared = [key for key in b.kv.block_keys[0] if key in a.kv.block_keys[0]]
        assert len(shared) == len(document) // BLOCK and all(store.references(key) == 2 for key in shared)
        a.close()
        assert all(store.references(key) == 1 for key in shared) and all(store.holding(shared))
        assert len(b.generate(4, stop=[])) == 4
        b.close()
        assert all(store.references(key) == 0 for key in shared)  # cached, and evictable like any block


def test_blocks_pushed_out_by_another_session_are_recomputed(tiny):
    prompt_a, prompt_b = ids(tiny, 160, seed=4), ids(tiny, 160, seed=5)
    with Session(tiny, config(tiny)) as alone:
        expected = conversation(alone, prompt_a, generate=6)
    layers = tiny.config.num_layers
    # room for one conversation and a half: b's blocks push a's out of the store (there is no disk)
    small = config(tiny, device_blocks=layers * 10, host_blocks=layers * 20, layers=layers)
    with TieredStore(small) as store:
        a, b = Session(tiny, store=store), Session(tiny, store=store)
        for i in range(0, 160, 40):
            a.extend(prompt_a[i : i + 40])
        conversation(b, prompt_b, generate=1)
        assert not all(store.holding([key for keys in a.kv.block_keys for key in keys]))
        assert a.generate(6, stop=[]) == expected
        assert a.stats()["recomputed_tokens"] > 0
        a.close()
        b.close()


def test_a_conversation_the_store_cannot_hold_is_refused_before_any_work(tiny):
    with Session(tiny, config(tiny, device_blocks=4, host_blocks=4)) as session:
        with pytest.raises(ValueError, match=r"need 10 blocks .* hold at most 8 blocks: raise device_bytes"):
            session.extend(ids(tiny, 40, seed=6))
        assert session.tokens == [] and len(session.store) == 0
        session.extend(ids(tiny, 12, seed=6))  # 2 layers x 2 blocks fit
        assert len(session.generate(3, stop=[])) == 3


def test_sessions_on_one_store_from_several_threads(tiny):
    prompts = [ids(tiny, 100, seed=10) + ids(tiny, 20 + 7 * n, seed=20 + n) for n in range(4)]
    expected = []
    for prompt in prompts:
        with Session(tiny, config(tiny)) as alone:
            expected.append(conversation(alone, prompt))
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    with TieredStore(config(tiny, device_blocks=60, host_blocks=120, layers=tiny.config.num_layers)) as store:

        def run(n: int) -> None:
            try:
                with Session(tiny, store=store) as session:
                    results[n] = conversation(session, prompts[n])
            except BaseException as error:  # surfaced below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in threads), "deadlock"
        assert not errors, errors
        assert all(is_content_key(key) for key in store.keys())  # every private block was removed on close
    assert [results[n] for n in range(4)] == expected


def test_sessions_given_one_disk_directory_share_its_store(tiny, tmp_path):
    shared = config(tiny, disk_dir=str(tmp_path / "kv"))
    document = ids(tiny, 64, seed=30)
    a = Session(tiny, shared)
    b = Session(tiny, shared)  # not DirectoryBusy: the same store
    assert a.store is b.store
    a.extend(document + [5])
    b.extend(document + [6])
    assert b.stats()["reused_tokens"] == 64
    a.close()
    assert len(b.generate(3, stop=[])) == 3  # the store stays open for b
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.store.get(BlockKey("x", 0, 0))  # the last session closed the store
    with Session(tiny, shared) as c:  # a new store over the directory, with what a and b sealed
        c.extend(document + [7])
        assert c.stats()["reused_tokens"] == 64
    with Session(tiny, shared) as d, pytest.raises(ValueError, match="another StoreConfig"):
        Session(tiny, config(tiny, host_blocks=7, disk_dir=str(tmp_path / "kv")))
    assert d.store is not None
