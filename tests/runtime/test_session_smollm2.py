"""Sessions of the real default model over the tiered store: exact through every tier, quantized
host blocks, and sparse attention that still finds a passkey."""

from __future__ import annotations

import pytest
import torch

from runtime import Session
from tiered import CODECS, StoreConfig

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


@pytest.mark.skipif("int8" not in CODECS, reason="the int8 codec is not registered")
def test_int8_host_codec_keeps_top1_agreement(smollm2, text_ids, all_on_device):
    block = kv_block_bytes(smollm2)
    config = StoreConfig(device="cpu", device_bytes=60 * block, host_bytes=1 << 30, host_codec="int8")
    with Session(smollm2, config) as session:
        logits = teacher_force(session, text_ids[:512])
        assert session.store.stats()["tiers"]["host"]["hits"] > 0
    agreement = (logits.argmax(-1) == all_on_device[0][:512].argmax(-1)).float().mean().item()
    assert agreement >= 0.99


def passkey_prompt(model, depth: float, haystack_tokens: int = 1800) -> list[int]:
    """A passkey hidden at `depth` of a Shakespeare haystack, then the question (about 1.9K tokens).

    The needle states the key three times: SmolLM2-135M, all cache exact, finds it so at every depth.
    """
    tokenizer = model.tokenizer
    filler = tokenizer.encode(shakespeare(14_000))[:haystack_tokens]
    cut = int(len(filler) * depth)
    needle = f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. The pass key is {PASSKEY}."
    text = tokenizer.decode(filler[:cut]) + "\n" + needle + "\n" + tokenizer.decode(filler[cut:])
    return tokenizer.encode(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n\n" + text + "\n\nWhat is the pass key? The pass key is"
    )


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_sparse_quarter_budget_finds_the_passkey(smollm2, depth):
    ids = passkey_prompt(smollm2, depth)
    assert 1800 <= len(ids) <= 2048
    # 16-token blocks: Quest's page size; its per-block key bounds get loose over 64 tokens
    config = StoreConfig(device="cpu", device_bytes=128 << 20, host_bytes=16 << 20, block_tokens=16)
    with Session(smollm2, config, mode="sparse", budget_tokens=len(ids) // 4, importance="quest") as session:
        teacher_force(session, ids, chunk=512)
        answer = smollm2.tokenizer.decode(session.generate(6))
        kv = session.stats()["kv"]
    assert PASSKEY in answer, answer
    assert kv["sparse_steps"] > 0
