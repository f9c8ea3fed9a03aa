"""The prefetch scheduler through the store: priority order, cancellation, joins, pinning, failing
moves, shutdown and its statistics, on real blocks in real tiers (the disk tier in a directory).

The disk tier below is the real one with a gate in front of the mover's reads: a test closes the
gate to hold the mover inside one move while it queues others, then opens it. Nothing sleeps to
synchronise: Events say when the mover is inside a move.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from tests.conftest import random_block
from tiered import BlockKey, KVBlock, StoreConfig, TieredStore
from tiered.disk import DiskTier

HEADS, TOKENS, DIM = 2, 16, 8
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 2  # fp16 keys + values of one full block
MOVER = "tiered-mover"  # the scheduler's thread
WAIT_S = 5  # the longest any event is waited for; the tests take milliseconds


class GatedDisk(DiskTier):
    """The disk tier, whose reads on the mover thread are recorded, wait at `gate`, and raise an
    injected OSError while `failing` is set. Reads on other threads go straight through."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # the mover is inside a read
        self.moved: list[int] = []  # block indices the mover read, in order
        self.failing = False

    def get(self, key: BlockKey):
        if threading.current_thread().name == MOVER:
            self.moved.append(key.index)
            self.entered.set()
            assert self.gate.wait(WAIT_S)
            if self.failing:
                raise OSError(5, "injected I/O error")
        return super().get(key)


class GatedStore(TieredStore):
    disk_tier_type = GatedDisk


def key(i: int) -> BlockKey:
    return BlockKey("s", 0, i)


def block(i: int) -> KVBlock:
    return random_block(HEADS, TOKENS, DIM, torch.float16, seed=i)


def config(directory) -> StoreConfig:
    return StoreConfig(device="cpu", device_bytes=4 * BLOCK_BYTES, host_bytes=2 * BLOCK_BYTES,
                       disk_dir=str(directory), disk_bytes=1 << 20, block_tokens=TOKENS)


@contextmanager
def filled(tmp_path) -> Iterator[tuple[TieredStore, GatedDisk]]:
    """Blocks 0..9 put in order: 0-3 on disk, 4-5 on host, 6-9 on the device (LRU)."""
    with GatedStore(config(tmp_path / "kv")) as store:
        for i in range(10):
            store.put(key(i), block(i))
        assert [store.where(key(i)) for i in range(10)] == ["disk"] * 4 + ["host"] * 2 + ["device"] * 4
        yield store, store._place.tiers[2]


@contextmanager
def mover_held(disk: GatedDisk, store: TieredStore, index: int):
    """The mover inside the move of block `index`, held at the gate until the `with` ends; yields its plan."""
    disk.gate.clear()
    disk.entered.clear()
    plan = store.prefetch([key(index)])
    assert disk.entered.wait(WAIT_S)
    try:
        yield plan
    finally:
        disk.gate.set()


def wait_until(condition) -> None:
    """Poll a condition that another thread makes true (no Event exists for it)."""
    done = threading.Event()
    for _ in range(WAIT_S * 1000):
        if condition():
            return
        done.wait(0.001)
    raise AssertionError("condition not reached")


def test_moves_run_most_urgent_first_across_plans(tmp_path):
    with filled(tmp_path) as (store, disk):
        with mover_held(disk, store, 0) as first:
            # block 1 and 3 are needed two layers ahead (3 scores higher); block 2, asked later, one layer ahead
            later = store.prefetch([key(1), key(3)], layers_ahead=2, scores=[0.1, 0.9])
            soonest = store.prefetch([key(2)], layers_ahead=1)
        assert (first.result(WAIT_S), soonest.result(WAIT_S), later.result(WAIT_S)) == (1, 1, 2)
        assert disk.moved == [0, 2, 3, 1]
        assert all(store.where(key(i)) == "device" for i in range(4))
        assert all(store.get(key(i)).equal(block(i)) for i in range(4))


def test_a_newer_plan_cancels_what_it_no_longer_asks_for(tmp_path):
    with filled(tmp_path) as (store, disk):
        with mover_held(disk, store, 0):
            old = store.prefetch([key(1), key(2)], plan=("s", 0))
            other = store.prefetch([key(3)], plan=("t", 0))  # another sequence's plan: left alone
            new = store.prefetch([key(2)], plan=("s", 0))
            assert old.result(WAIT_S) == 0  # superseded: settled at once, nothing moved for it
        assert (new.result(WAIT_S), other.result(WAIT_S)) == (1, 1)
        assert disk.moved == [0, 2, 3]  # block 1 never moved
        assert store.where(key(1)) == "disk" and store.get(key(1)).equal(block(1))
        stats = store.stats()["prefetch"]
        assert (stats["cancelled_blocks"], stats["joined_requests"], stats["moved_blocks"]) == (1, 1, 3)
        assert stats["queued_blocks"] == 0


def test_requests_for_a_block_queued_or_moving_join_its_move(tmp_path):
    with filled(tmp_path) as (store, disk):
        with mover_held(disk, store, 0) as first:
            moving = store.prefetch([key(0)])  # joins the running move
            queued = store.prefetch([key(1)])
            again = store.prefetch([key(1)], layers_ahead=0)  # joins, and makes it more urgent
            assert not (first.done() or moving.done() or queued.done() or again.done())
        assert [f.result(WAIT_S) for f in (first, moving, queued, again)] == [1, 1, 1, 1]
        assert disk.moved == [0, 1]  # each block read from disk once
        stats = store.stats()["prefetch"]
        assert (stats["requested_blocks"], stats["joined_requests"], stats["moved_blocks"]) == (4, 2, 2)


def test_scheduled_moves_may_evict_pinned_blocks_but_never_blocks_under_read(tmp_path):
    """A session's pins (TieredStore.pinning: what its forward reads) keep blocks in the store, not
    on the device: a prefetch for that forward makes room among them by the eviction policy, as
    the forward's own reads do. A block under read never leaves."""
    with filled(tmp_path) as (store, disk):
        on_device = [key(i) for i in range(6, 10)]
        with store.pinning(on_device), store.reading(on_device):
            assert store.prefetch([key(4), key(0)]).result(WAIT_S) == 0  # every device block is under read
            assert all(store.where(k) == "device" for k in on_device)
        assert store.where(key(4)) == "host" and store.where(key(0)) == "disk"
        assert store.stats()["prefetch"]["skipped_blocks"] == 2
        with store.pinning(on_device):
            assert store.prefetch([key(4), key(0)]).result(WAIT_S) == 2  # pinned, not read: the LRU two leave
        assert [store.where(key(i)) for i in (0, 4, 6, 7, 8, 9)] == ["device"] * 2 + ["host"] * 2 + ["device"] * 2
        assert store.get(key(0)).equal(block(0)) and store.get(key(6)).equal(block(6))


def test_moves_go_on_during_a_read_but_never_move_what_it_reads(tmp_path):
    with filled(tmp_path) as (store, disk):
        with store.reading([key(6), key(7)]) as (keys, values):  # views of the device pool
            # the read holds no lock: the mover works meanwhile, evicting only blocks 8 and 9
            assert store.prefetch([key(4), key(5), key(0)]).result(WAIT_S) == 2
            assert [store.where(key(i)) for i in (4, 5, 6, 7, 0)] == ["device"] * 4 + ["disk"]
            assert keys.equal(torch.cat([block(6).keys, block(7).keys], dim=1))
            assert values.equal(torch.cat([block(6).values, block(7).values], dim=1))
        with store.reading_parts([key(0)]) as parts:  # a disk block read where it lies
            assert store.prefetch([key(0)]).result(WAIT_S) == 0
            assert store.where(key(0)) == "disk"
            assert parts[0].keys.equal(block(0).keys)
        assert store.prefetch([key(0)]).result(WAIT_S) == 1  # the read is over: now it moves


def test_a_failing_move_is_counted_and_reads_use_the_block_where_it_lies(tmp_path):
    with filled(tmp_path) as (store, disk):
        disk.failing = True
        plan = store.prefetch([key(0), key(1)])
        with pytest.raises(OSError, match="injected"):
            plan.result(WAIT_S)
        stats = store.stats()["prefetch"]
        assert (stats["failed_blocks"], stats["moved_blocks"]) == (2, 0)
        assert "OSError" in stats["last_error"] and "injected" in stats["last_error"]
        assert store.where(key(0)) == "disk" and store.where(key(1)) == "disk"
        with store.reading([key(0)]) as (keys, values):  # this thread's reads of the disk tier work
            assert keys.equal(block(0).keys) and values.equal(block(0).values)
        assert store.get(key(1)).equal(block(1))
        disk.failing = False
        assert store.prefetch([key(0)]).result(WAIT_S) == 1
        assert store.get(key(0)).equal(block(0))


def test_a_damaged_block_fails_its_move_and_is_a_miss_never_wrong_data(tmp_path):
    with filled(tmp_path) as (store, disk):
        segments = sorted((tmp_path / "kv").glob("seg-*.log"))
        data = bytearray(segments[0].read_bytes())
        data[-BLOCK_BYTES // 2] ^= 0xFF  # a payload byte of the last record written (block 3)
        segments[0].write_bytes(bytes(data))
        with pytest.raises(KeyError, match="could not be read back"):
            store.prefetch([key(3)]).result(WAIT_S)
        assert store.stats()["prefetch"]["failed_blocks"] == 1
        assert store.where(key(3)) is None and store.get(key(3)) is None
        assert store.prefetch([key(2)]).result(WAIT_S) == 1 and store.get(key(2)).equal(block(2))


def test_close_cancels_queued_moves_and_waits_for_the_running_one(tmp_path):
    with filled(tmp_path) as (store, disk):
        with mover_held(disk, store, 0) as running:
            queued = store.prefetch([key(1), key(2)])
            closer = threading.Thread(target=store.close)
            closer.start()
            assert queued.result(WAIT_S) == 0  # cancelled at once, while the running move still waits
            assert not running.done() and closer.is_alive()
        closer.join(WAIT_S)
        assert not closer.is_alive()
        assert running.result(0) == 1
        with pytest.raises(RuntimeError, match="closed"):
            store.prefetch([key(3)])
    with TieredStore(config(tmp_path / "kv")) as again:  # what stayed on disk is intact
        assert [again.where(key(i)) for i in range(4)] == [None, "disk", "disk", "disk"]
        assert all(again.get(key(i)).equal(block(i)) for i in (1, 2, 3))


def test_stats_count_stall_precision_and_bytes_per_link(tmp_path):
    with filled(tmp_path) as (store, disk):
        got = []
        with mover_held(disk, store, 0):
            reader = threading.Thread(target=lambda: got.append(store.get(key(0))))
            reader.start()
            wait_until(lambda: store.stats()["prefetch"]["waiting_reads"] == 1)
        reader.join(WAIT_S)
        assert got[0].equal(block(0))
        stats = store.stats()
        assert stats["stall_s"] > 0 and stats["prefetch"]["stalled_reads"] == 1
        assert stats["tiers"]["disk"]["hits"] == 0 and stats["tiers"]["device"]["hits"] == 1  # moved, then read
        assert (stats["prefetch"]["used_blocks"], stats["prefetch"]["precision"]) == (1, 1.0)

        assert store.prefetch([key(1)]).result(WAIT_S) == 1
        for i in range(10, 14):  # four new blocks push block 1 out unread
            store.put(key(i), block(i))
        assert store.where(key(1)) != "device"
        stats = store.stats()
        assert (stats["prefetch"]["used_blocks"], stats["prefetch"]["wasted_blocks"]) == (1, 1)
        assert stats["prefetch"]["precision"] == 0.5
        assert stats["link_bytes"]["disk->device"] == 2 * BLOCK_BYTES  # raw codec: a block's bytes each
        assert stats["link_bytes"]["device->host"] >= 6 * BLOCK_BYTES  # blocks 4-5, 6-9 and 1 went down
        assert stats["link_bytes"]["host->disk"] >= 4 * BLOCK_BYTES

        stall_s = stats["stall_s"]
        with store.reading([key(i) for i in range(10, 14)]):  # on the device, nothing queued: no stall
            pass
        assert store.stats()["stall_s"] == stall_s


def test_priorities_and_their_lengths_are_checked_before_anything_is_queued(tmp_path):
    with filled(tmp_path) as (store, _):
        with pytest.raises(ValueError, match="layers_ahead"):
            store.prefetch([key(0)], layers_ahead=-1)
        with pytest.raises(ValueError, match="2 keys got 1 layers_ahead"):
            store.prefetch([key(0), key(1)], layers_ahead=[1])
        with pytest.raises(ValueError, match="score"):
            store.prefetch([key(0)], scores=[float("nan")])
        assert store.stats()["prefetch"]["requested_blocks"] == 0


def test_a_block_under_read_stays_put_for_other_callers_too(tmp_path):
    with filled(tmp_path) as (store, _):
        with store.reading([key(4), key(6)]) as (keys, _values):  # a host block and a device block
            copy = store.get(key(4))  # a copy: promoting it would reuse its host slot
            assert store.where(key(4)) == "host"
            for call in (lambda: store.remove(key(4)), lambda: store.put(key(6), block(60))):
                with pytest.raises(RuntimeError, match="being read"):
                    call()
            assert keys.equal(torch.cat([block(4).keys, block(6).keys], dim=1))
        store.put(key(6), block(60))  # the read is over
        assert store.remove(key(4)) and store.get(key(6)).equal(block(60))
        for i in range(20, 26):  # new blocks push others down into the host slot block 4 had
            store.put(key(i), block(i))
        assert copy.equal(block(4))  # the caller's copy is its own


def test_reads_of_blocks_below_the_device_count_their_time_in_the_critical_path(tmp_path):
    with filled(tmp_path) as (store, _):
        with store.reading([key(i) for i in range(6, 10)]):
            pass
        assert all(tier["read_s"] == 0 for tier in store.stats()["tiers"].values())
        with store.reading([key(0), key(4), key(6)]):  # disk, host, device: gathered and decoded
            pass
        tiers = store.stats()["tiers"]
        assert tiers["disk"]["read_s"] > 0 and tiers["host"]["read_s"] > 0 and tiers["device"]["read_s"] == 0


def test_another_threads_change_of_a_block_under_read_waits_for_the_read(tmp_path):
    with filled(tmp_path) as (store, _):
        with store.reading([key(6)]) as (keys, _values):
            writer = threading.Thread(target=store.put, args=(key(6), block(60)))
            writer.start()
            writer.join(0.05)
            assert writer.is_alive()  # waiting: the read's view of the slot is unchanged
            assert keys.equal(block(6).keys)
        writer.join(WAIT_S)
        assert not writer.is_alive() and store.get(key(6)).equal(block(60))


def test_a_read_in_place_cancels_the_queued_moves_of_its_blocks_and_waits_for_a_running_one(tmp_path):
    """On a CPU device a sparse step's read (reading_page_rows) takes a queued block where it lies:
    its move is cancelled, not waited for. A move already running is waited for."""
    keys = [key(i) for i in range(10)]  # 160 tokens; pages of 16 tokens: page i is block i
    with filled(tmp_path) as (store, disk):
        with mover_held(disk, store, 0):
            queued = store.prefetch([key(1)], plan=("s", 0))
            with store.reading_page_rows(keys, torch.tensor([[1, 9], [1, 9]]), TOKENS, 10 * TOKENS) as rows:
                assert rows is None  # raw blocks below the device: read_pages would read them
            assert queued.result(WAIT_S) == 0  # settled while the mover is still held: cancelled
            done = []

            def read_block_0() -> None:
                with store.reading_page_rows(keys, torch.tensor([[0, 9], [0, 9]]), TOKENS, 10 * TOKENS) as rows:
                    done.append(rows)

            reader = threading.Thread(target=read_block_0)
            reader.start()
            wait_until(lambda: store.stats()["prefetch"]["waiting_reads"] == 1)  # block 0 is moving
            assert not done
        reader.join(WAIT_S)
        assert len(done) == 1 and done[0].below == []  # block 0 came up: both pages in the pool
        stats = store.stats()
        assert stats["prefetch"]["cancelled_blocks"] == 1 and stats["prefetch"]["stalled_reads"] == 1
        assert disk.moved == [0] and store.where(key(1)) == "disk" and store.where(key(0)) == "device"
