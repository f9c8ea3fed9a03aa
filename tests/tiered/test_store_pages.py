"""TieredStore.read_pages: the pages each KV head chose (a sparse step's read), straight out of the
device pool or decoded where they lie, equal to the same tokens taken from a joined read."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_block
from tiered import BlockKey, StoreConfig, TieredStore
from tiered.codecs import cpu_kernels

HEADS, TOKENS, DIM, PAGE = 2, 4, 8, 2  # two pages per block
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 4


def config(device_blocks: int, host_codec: str = "raw") -> StoreConfig:
    return StoreConfig(device="cpu", device_bytes=device_blocks * BLOCK_BYTES, host_bytes=64 * BLOCK_BYTES,
                       block_tokens=TOKENS, host_codec=host_codec)


def fill(store: TieredStore, blocks: int, last_tokens: int = TOKENS) -> list[BlockKey]:
    keys = [BlockKey("s", 0, i) for i in range(blocks)]
    sizes = [TOKENS] * (blocks - 1) + [last_tokens]
    store.put_many((key, random_block(HEADS, n, DIM, torch.float32, seed=i)) for i, (key, n) in enumerate(zip(keys, sizes)))
    return keys


def expected(store: TieredStore, keys: list[BlockKey], pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen pages' tokens cut out of a joined read of every block, head by head."""
    with store.reading(keys) as (k, v):
        total = k.shape[1]
        rows = [torch.cat([torch.arange(p * PAGE, min(p * PAGE + PAGE, total)) for p in head.tolist()]) for head in pages]
        return (torch.stack([k[h, r] for h, r in enumerate(rows)]), torch.stack([v[h, r] for h, r in enumerate(rows)]))


PAGES = torch.tensor([[0, 3, 4, 9], [1, 2, 7, 9]])  # per head, ascending; 9 is the newest page


@pytest.mark.parametrize("host_codec", ["raw", "int8"])
@pytest.mark.parametrize("device_blocks", [8, 2], ids=["all on the device", "most below"])
def test_pages_equal_the_same_tokens_of_a_joined_read(device_blocks, host_codec):
    with TieredStore(config(device_blocks, host_codec)) as store:
        keys = fill(store, 5, last_tokens=3)  # 19 tokens: the newest page holds one
        below = [key for key in keys if store.where(key) != "device"]
        assert bool(below) == (device_blocks == 2)
        where = [store.where(key) for key in keys]
        want_k, want_v = expected(store, keys, PAGES)
        k, v = store.read_pages(keys, PAGES, PAGE, tokens=19)
        assert k.shape == (HEADS, 4 * PAGE - 1, DIM)
        assert torch.equal(k, want_k) and torch.equal(v, want_v)
        assert [store.where(key) for key in keys] == where  # read where they lie, nothing moved


@pytest.mark.parametrize("checks", ["C kernels", "torch"])
def test_only_the_blocks_of_the_chosen_pages_are_read(checks, monkeypatch):
    if checks == "torch":  # as where the kernels cannot be built
        monkeypatch.setattr(cpu_kernels, "page_blocks", lambda *args: None)
    with TieredStore(config(device_blocks=8)) as store:
        keys = fill(store, 6)
        before = store.stats()["tiers"]["device"]["hits"]
        pages = torch.tensor([[0, 1, 10], [0, 4, 11]])  # blocks 0, 2 and 5
        k, _ = store.read_pages(keys, pages, PAGE, tokens=24, touch=True)
        assert store.stats()["tiers"]["device"]["hits"] - before == 3
        assert k.shape == (HEADS, 3 * PAGE, DIM)
        touched = {i for i in range(6) if store.block_stats(keys[i]).hits}
        assert touched == {0, 2, 5}


def test_scattered_device_slots_and_a_block_that_moved_up():
    """Blocks of one layer out of slot order (one came back from the host): pages still land right."""
    with TieredStore(config(device_blocks=3)) as store:
        keys = fill(store, 5)
        assert store.where(keys[0]) == "host"
        store.get(keys[0])  # promoted into a freed slot, after the others
        pages = torch.tensor([[0, 1, 9], [1, 8, 9]])
        assert torch.equal(store.read_pages(keys, pages, PAGE, tokens=20)[0], expected(store, keys, pages)[0])


def test_all_on_the_device_in_scattered_slots_and_after_a_block_moves():
    """The slot table a read keeps for the next one is dropped when a block moves."""
    with TieredStore(config(device_blocks=7)) as store:
        keys = fill(store, 3)
        store.put(BlockKey("t", 0, 0), random_block(HEADS, TOKENS, DIM, torch.float32, seed=50))  # takes slot 3
        keys += [BlockKey("s", 0, 3), BlockKey("s", 0, 4)]
        for i in (3, 4):
            store.put(keys[i], random_block(HEADS, TOKENS, DIM, torch.float32, seed=i))
        assert all(store.where(key) == "device" for key in keys)
        pages = torch.tensor([[0, 5, 9], [2, 7, 9]])
        for _ in range(2):  # the second read uses the kept slot table
            assert torch.equal(store.read_pages(keys, pages, PAGE, tokens=20)[1], expected(store, keys, pages)[1])
        for i in range(3):  # the device fills: the least recently used of s's blocks go to the host
            store.put(BlockKey("u", 0, i), random_block(HEADS, TOKENS, DIM, torch.float32, seed=60 + i))
        assert any(store.where(key) == "host" for key in keys)
        assert torch.equal(store.read_pages(keys, pages, PAGE, tokens=20)[1], expected(store, keys, pages)[1])


@pytest.mark.parametrize(
    ("pages", "page_tokens", "tokens", "error", "match"),
    [
        (torch.tensor([[0, 10]]), PAGE, 19, ValueError, r"0\.\.9"),
        (torch.tensor([[-1, 9]]), PAGE, 19, ValueError, r"0\.\.9"),
        (torch.tensor([[9, 3]]), PAGE, 19, ValueError, "partial newest page"),
        (torch.tensor([[0, 9]], dtype=torch.int32), PAGE, 19, ValueError, "int64"),
        (torch.tensor([0, 9]), PAGE, 19, ValueError, "kv_heads, kept"),
        (torch.tensor([[0, 1]]), 3, 19, ValueError, "divide"),
        (torch.tensor([[0, 1]]), 0, 19, ValueError, "divide"),
        ([[0, 9]], PAGE, 19, TypeError, "tensor"),
        (torch.tensor([[0, 1]]), PAGE, 40, ValueError, "cannot hold"),
    ],
)
@pytest.mark.parametrize("checks", ["C kernels", "torch"])
def test_bad_pages_are_refused(pages, page_tokens, tokens, error, match, checks, monkeypatch):
    if checks == "torch":  # as where the kernels cannot be built
        monkeypatch.setattr(cpu_kernels, "page_blocks", lambda *args: None)
    with TieredStore(config(device_blocks=8)) as store:
        keys = fill(store, 5, last_tokens=3)
        with pytest.raises(error, match=match):
            store.read_pages(keys, pages, page_tokens, tokens)


def test_a_block_not_stored_is_a_key_error():
    with TieredStore(config(device_blocks=8)) as store:
        keys = fill(store, 3)
        store.remove(keys[1])
        with pytest.raises(KeyError, match="index=1"):
            store.read_pages(keys, torch.tensor([[2, 5]]), PAGE, tokens=12)


def rows_read(rows: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens reading_page_rows' spans name, head by head: [kv_heads, read, head_dim] each."""
    keys_pool, values_pool, first, count = rows.keys_pool, rows.values_pool, rows.first, rows.count
    heads = keys_pool.shape[0]
    index = [torch.cat([torch.arange(f, f + c) for f, c in zip(first[h].tolist(), count[h].tolist())]) for h in range(heads)]
    return (torch.stack([keys_pool.reshape(-1, DIM)[i] for i in index]),
            torch.stack([values_pool.reshape(-1, DIM)[i] for i in index]))


def test_page_rows_name_the_pages_read_pages_copies_and_hold_their_blocks():
    """All on the device in scattered slots: the spans name the same tokens read_pages copies, the
    chosen blocks are counted once and cannot be removed while the spans are read."""
    with TieredStore(config(device_blocks=7)) as store:
        keys = fill(store, 3)
        store.put(BlockKey("t", 0, 0), random_block(HEADS, TOKENS, DIM, torch.float32, seed=50))  # takes slot 3
        keys += [BlockKey("s", 0, 3), BlockKey("s", 0, 4)]
        store.put(keys[3], random_block(HEADS, TOKENS, DIM, torch.float32, seed=3))
        store.put(keys[4], random_block(HEADS, 3, DIM, torch.float32, seed=4))  # 19 tokens: the newest page holds one
        want_k, want_v = store.read_pages(keys, PAGES, PAGE, tokens=19)
        before = store.stats()["tiers"]["device"]["hits"]
        with store.reading_page_rows(keys, PAGES, PAGE, tokens=19) as rows:
            k, v = rows_read(rows)
            with pytest.raises(RuntimeError, match="being read"):
                store.remove(keys[2])  # page 4 lies in block 2
        assert torch.equal(k, want_k) and torch.equal(v, want_v)
        assert store.stats()["tiers"]["device"]["hits"] - before == 5  # the blocks of pages 0..9: all five, once each
        store.remove(keys[2])  # free once the with block ends


def test_page_rows_are_none_and_count_nothing_when_a_block_is_below_the_device():
    with TieredStore(config(device_blocks=2)) as store:
        keys = fill(store, 5, last_tokens=3)
        before = store.stats()["tiers"]
        with store.reading_page_rows(keys, PAGES, PAGE, tokens=19, touch=True) as rows:
            assert rows is None
        assert store.stats()["tiers"] == before
        with pytest.raises(ValueError, match="partial newest page"):
            with store.reading_page_rows(keys, torch.tensor([[9, 3]]), PAGE, tokens=19):
                pass


def test_pages_below_the_device_in_int8_are_read_where_they_lie():
    """Most blocks in an int8 host tier: the device pages are spans of the pool (count 0 for the
    others), the host blocks of the pages come as stored with each head's pages marked, and
    attention over both equals attention over what read_pages decodes and copies."""
    from runtime.kv.attention import grouped_attention
    from tiered.codecs.attend_reference import merge_partials

    dim = 16  # the kernels' vectors
    config = StoreConfig(device="cpu", device_bytes=2 * 2 * HEADS * TOKENS * dim * 4, host_bytes=1 << 20,
                         block_tokens=TOKENS, host_codec="int8")
    with TieredStore(config) as store:
        keys = [BlockKey("s", 0, i) for i in range(5)]
        sizes = [TOKENS] * 4 + [3]  # 19 tokens: the newest page holds one
        store.put_many((key, random_block(HEADS, n, dim, torch.float32, seed=i)) for i, (key, n) in enumerate(zip(keys, sizes)))
        where = [store.where(key) for key in keys]
        assert where.count("device") == 2 and where.count("host") == 3
        q = torch.randn(2 * HEADS, 1, dim, generator=torch.Generator().manual_seed(9))
        want_k, want_v = store.read_pages(keys, PAGES, PAGE, tokens=19)
        expected, _ = grouped_attention(q, want_k, want_v, torch.tensor([18]))
        before = store.stats()["tiers"]
        with store.reading_page_rows(keys, PAGES, PAGE, tokens=19) as rows:
            assert rows is not None and [len(run.items) for run in rows.below] == [3]
            with pytest.raises(RuntimeError, match="being read"):
                store.remove(keys[0])
            device_pages = rows.count > 0
            assert torch.equal(rows.visible.gather(1, PAGES), ~device_pages)
            partials = [cpu_kernels.attend_rows(q, rows.keys_pool, rows.values_pool, rows.first, rows.count, dim**-0.5)]
            run = rows.below[0]
            partials.append(run.codec.attend(q, run.items, run.starts, None, dim**-0.5, visible=rows.visible,
                                             page_tokens=PAGE))
        after = store.stats()["tiers"]
        assert after["host"]["hits"] - before["host"]["hits"] == 3 and after["device"]["hits"] - before["device"]["hits"] == 2
        assert [store.where(key) for key in keys] == where  # read where they lie, nothing moved
        torch.testing.assert_close(merge_partials(partials)[0], expected, atol=1e-5, rtol=1e-5)
