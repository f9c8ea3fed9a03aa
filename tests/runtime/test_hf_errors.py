"""TieredCache refuses what it cannot do with errors that say what was expected; `import runtime` and
`import tiered` do not import transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import Qwen3Config

from runtime.hf import TieredCache, model_fingerprint
from tiered import StoreConfig, TieredStore

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
CONFIG = Qwen3Config(**SHAPE)


def small(**overrides) -> StoreConfig:
    return StoreConfig(**(dict(device="cpu", device_bytes=1 << 20, host_bytes=1 << 20, block_tokens=16) | overrides))


def states(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def test_importing_runtime_or_tiered_does_not_import_transformers():
    code = ("import sys, tiered, runtime; assert 'transformers' not in sys.modules, 'imported';"
            "runtime.TieredCache; assert 'transformers' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="not both"):
        TieredCache(small(), store=TieredStore(small()))
    with pytest.raises(TypeError, match="StoreConfig"):
        TieredCache({"device": "cpu"})
    with pytest.raises(TypeError, match="TieredStore"):
        TieredCache(store="kv")
    with pytest.raises(TypeError, match="PreTrainedConfig"):
        TieredCache(small(), config={"num_hidden_layers": 2})


def test_a_store_that_does_not_fit_the_model_is_refused():
    with pytest.raises(ValueError, match="layers=2"):
        TieredCache(small(layers=3), config=CONFIG)
    with TieredStore(small(fingerprint="another-model")) as store, pytest.raises(ValueError, match="never mix models"):
        TieredCache(store=store, config=CONFIG)
    with TieredStore(small()) as store:
        TieredCache(store=store).update(states(1, 4, 3, 32), states(1, 4, 3, 32), 0)  # another model's blocks
        with pytest.raises(ValueError, match="kv_heads=4, head_dim=32"):
            TieredCache(store=store, config=CONFIG)
        with pytest.raises(ValueError, match="use a store made for this model"):
            TieredCache(store=store).update(states(1, 2, 3, 16), states(1, 2, 3, 16), 0)
    with TieredStore(small(fingerprint=model_fingerprint(CONFIG))) as store:
        TieredCache(store=store, config=CONFIG)  # its own fingerprint fits


def test_bad_key_value_states_are_refused():
    with TieredCache(small(), config=CONFIG) as cache:
        with pytest.raises(ValueError, match=r"\[batch, kv_heads, seq, head_dim\]"):
            cache.update(states(2, 3, 16), states(2, 3, 16), 0)
        with pytest.raises(TypeError, match="floating point"):
            cache.update(states(1, 2, 3, 16, dtype=torch.int64), states(1, 2, 3, 16, dtype=torch.int64), 0)
        with pytest.raises(ValueError, match="one shape and dtype"):
            cache.update(states(1, 2, 3, 16), states(1, 2, 4, 16), 0)
        cache.update(states(2, 2, 3, 16), states(2, 2, 3, 16), 0)
        with pytest.raises(ValueError, match=r"expected K/V of shape \[2, 2, seq, 16\]"):
            cache.update(states(3, 2, 1, 16), states(3, 2, 1, 16), 0)
        with pytest.raises(TypeError, match="float32"):
            cache.update(states(2, 2, 1, 16, dtype=torch.float16), states(2, 2, 1, 16, dtype=torch.float16), 0)
        assert cache.get_seq_length() == 3  # nothing half-written


def test_unsupported_cache_operations_say_so():
    with TieredCache(small(), config=CONFIG) as cache:
        cache.update(states(2, 2, 20, 16), states(2, 2, 20, 16), 0)
        with pytest.raises(ValueError, match="negative int"):
            cache.crop(5)
        with pytest.raises(ValueError, match=r"in \[0, 2\)"):
            cache.reorder_cache(torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="positive int"):
            cache.batch_repeat_interleave(0)
        with pytest.raises(ValueError, match="batch of one"):
            cache.commit(list(range(20)))
    with TieredStore(small()) as store, pytest.raises(ValueError, match="config"):
        TieredCache.for_prompt(store, [1, 2, 3], config=None)
    sliding = Qwen3Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with TieredStore(small()) as store, pytest.raises(ValueError, match="full attention"):
        TieredCache.for_prompt(store, [1, 2, 3], config=sliding)
