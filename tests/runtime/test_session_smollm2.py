"""Sessions of the real default model over the tiered store: exact through every tier, quantized
host blocks, sparse attention that still finds a passkey with the default config, and two
conversations over one document that share its blocks."""

from __future__ import annotations

import pytest
import torch

from runtime import Session
from runtime.passkey import passkey_prompt
from tiered import StoreConfig, TieredStore

from .tiny_models import shakespeare

PASSKEY = "68231"


def kv_block_bytes(model, block_tokens: int = 64) -> int:
    cfg = model.config
    return 2 * cfg.num_kv_heads * block_tokens * cfg.head_dim * 4


def teacher_force(session: Session, ids: list[int], chunk: int = 256) -> torch.Tensor:
    return torch.cat([session.extend(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])


@pytest.fixture(scope="module")
def text_ids(smollm2) -> list[int]:
    return smollm2.tokenizer.encode(shakespeare(6000))[:640]


@pytest.fixture(scope="module")
def all_on_device(smollm2, text_ids):
    """Logits of 640 teacher-forced tokens and 16 greedy tokens, every block on the device tier."""
    config = StoreConfig(device="cpu", device_bytes=64 << 20, host_bytes=16 << 20)
    with Session(smollm2, config) as session:
        logits = teacher_force(session, text_ids)
        tokens = session.generate(16, stop=[])
        assert session.store.stats()["tiers"]["host"]["blocks"] == 0
    return logits, tokens


def test_exact_through_host_and_disk_equals_all_on_device(smollm2, text_ids, all_on_device, tmp_path):
    block = kv_block_bytes(smollm2)
    # 30 layers x 10-11 blocks: 2 blocks per layer on the device, 60 on host, the rest on disk
    config = StoreConfig(
        device="cpu", device_bytes=60 * block, host_bytes=60 * block, disk_dir=str(tmp_path / "kv"), disk_bytes=1 << 30
    )
    with Session(smollm2, config) as session:
        logits = teacher_force(session, text_ids)
        tokens = session.generate(16, stop=[])
        tiers = session.store.stats()["tiers"]
    assert tiers["host"]["hits"] > 0 and tiers["disk"]["hits"] > 0 and tiers["disk"]["blocks"] > 0
    assert (logits - all_on_device[0]).abs().max().item() <= 1e-5
    assert tokens == all_on_device[1]


def test_int8_host_codec_keeps_top1_agreement(smollm2, text_ids, all_on_device):
    block = kv_block_bytes(smollm2)
    config = StoreConfig(device="cpu", device_bytes=60 * block, host_bytes=1 << 30, host_codec="int8")
    with Session(smollm2, config) as session:
        logits = teacher_force(session, text_ids[:512])
        assert session.store.stats()["tiers"]["host"]["hits"] > 0
    agreement = (logits.argmax(-1) == all_on_device[0][:512].argmax(-1)).float().mean().item()
    assert agreement >= 0.99


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_sparse_with_the_default_config_finds_the_passkey(smollm2, depth):
    ids = passkey_prompt(smollm2.tokenizer, PASSKEY, depth)
    assert 1800 <= len(ids) <= 2048
    # the default StoreConfig: 64-token blocks, with 16-token pages chosen per KV head inside them
    with Session(smollm2, mode="sparse", budget_tokens=512, importance="quest") as session:
        teacher_force(session, ids, chunk=512)
        answer = smollm2.tokenizer.decode(session.generate(6))
        kv = session.stats()["kv"]
    assert PASSKEY in answer, answer
    assert kv["sparse_steps"] > 0 and kv["attended_tokens"] < kv["appended_tokens"] * 30


def test_two_conversations_over_one_document_share_its_blocks(smollm2):
    tokenizer = smollm2.tokenizer
    document = tokenizer.decode(tokenizer.encode(shakespeare(8000))[:1000])

    def prompt(question: str) -> list[int]:
        return tokenizer.apply_chat_template([{"role": "user", "content": f"{document}\n\n{question}"}])

    first, second = prompt("Who speaks first?"), prompt("What do the citizens want?")
    shared_tokens = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared_tokens >= 1000
    with Session(smollm2) as alone:
        alone.extend(second)
        expected = alone.generate(12)
    with TieredStore(StoreConfig(device="cpu", layers=smollm2.config.num_layers, fingerprint=smollm2.fingerprint)) as store:
        with Session(smollm2, store=store) as a:
            a.extend(first)
            a.generate(4)
            with Session(smollm2, store=store) as b:
                b.extend(second)
                assert b.generate(12) == expected
                assert b.stats()["reused_tokens"] >= shared_tokens // 64 * 64
