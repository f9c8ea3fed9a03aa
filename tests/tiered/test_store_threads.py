"""Four threads on overlapping keys: no wrong data, no lost block, no deadlock. Reads hold their
blocks without the store's lock, so puts, prefetches and other reads run during them."""

from __future__ import annotations

import random
import threading

import torch

from tiered import BlockKey, KVBlock, StoreConfig, TieredStore

HEADS, TOKENS, DIM = 2, 8, 4
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 4
KEYS = [BlockKey("shared", 0, i) for i in range(24)]
THREADS, OPS = 4, 1_500


def versioned_block(key: BlockKey, version: int) -> KVBlock:
    """A block whose every value is determined by (key, version), and whose first key says version."""
    generator = torch.Generator().manual_seed(key.index * 1_000_003 + version)
    # keys, values: [HEADS, TOKENS, DIM] float32
    keys = torch.randn(HEADS, TOKENS, DIM, generator=generator)
    values = torch.randn(HEADS, TOKENS, DIM, generator=generator)
    keys[0, 0, 0] = version
    return KVBlock(keys, values)


def check(key: BlockKey, block: KVBlock) -> None:
    version = int(block.keys[0, 0, 0].item())
    assert block.equal(versioned_block(key, version)), f"wrong data for {key} (version {version})"


def test_four_threads_overlapping_keys():
    config = StoreConfig(
        device="cpu", device_bytes=5 * BLOCK_BYTES, host_bytes=len(KEYS) * BLOCK_BYTES, block_tokens=TOKENS
    )
    errors: list[BaseException] = []
    written = [set() for _ in range(THREADS)]
    gets = [0] * THREADS

    def work(thread: int) -> None:
        rng = random.Random(thread)
        try:
            for op in range(OPS):
                key = rng.choice(KEYS)
                roll = rng.random()
                if roll < 0.4:
                    store.put(key, versioned_block(key, version=thread * OPS + op))
                    written[thread].add(key)
                elif roll < 0.7:
                    gets[thread] += 1
                    got = store.get(key)
                    if got is not None:
                        check(key, got)
                elif roll < 0.8:
                    pair = rng.sample(KEYS, 2)
                    try:
                        with store.reading(pair) as (keys, values):  # [HEADS, 2 * TOKENS, DIM] each
                            for i, k in enumerate(pair):
                                check(k, KVBlock(keys[:, i * TOKENS : (i + 1) * TOKENS].clone(),
                                                 values[:, i * TOKENS : (i + 1) * TOKENS].clone()))
                    except KeyError:  # one of them was never written
                        pass
                elif roll < 0.9:
                    store.prefetch(rng.sample(KEYS, 3)).result(timeout=30)
                else:
                    got = store.peek(key)
                    if got is not None:
                        check(key, got)
        except BaseException as err:  # surfaced by the main thread
            errors.append(err)

    with TieredStore(config) as store:
        workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(THREADS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert not any(worker.is_alive() for worker in workers), "deadlock: a thread did not finish"
        assert not errors, errors[0]
        ever_written = set().union(*written)
        assert set(store.keys()) == ever_written  # device + host hold every key: none may be lost
        for key in ever_written:
            check(key, store.get(key))
        stats = store.stats()
        assert stats["tiers"]["host"]["dropped"] == 0
        assert stats["gets"] == sum(gets) + len(ever_written)
