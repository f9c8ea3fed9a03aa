"""Races: reader threads against writers, removals, eviction and compaction running in other
threads. Every read returns the right block or a miss: never an exception, never wrong data."""

from __future__ import annotations

import random
import threading
import time

from tests.tiered.disk_helpers import encoded_for, matches
from tiered import BlockKey
from tiered.disk import DiskTier, inspect_dir

RUN_S = 1.5


def run_threads(targets: list, run_s: float = RUN_S) -> list[BaseException]:
    """Run each target(stop_event) in its own thread for run_s; the exceptions they raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(target):
        try:
            target(stop)
        except BaseException as err:  # collected and reported by the test
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=guard, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    time.sleep(run_s)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    return errors


def test_reads_during_compaction_and_removal_are_exact_and_never_miss_a_kept_block(tmp_path):
    tier = DiskTier(tmp_path, 256 << 20, segment_bytes=64 << 10, compact_live_fraction=0.5)
    kept = [BlockKey("kept", 0, i) for i in range(150)]
    doomed = [BlockKey("doomed", 0, i) for i in range(450)]
    order = kept + doomed
    random.Random(0).shuffle(order)  # kept blocks spread over every segment
    for key in order:
        tier.put(key, encoded_for(key))
    reads = {"exact": 0, "miss": 0}

    def reader(seed):
        def run(stop):
            rng = random.Random(seed)
            while not stop.is_set():
                key = rng.choice(order)
                got = tier.get(key)
                if key.namespace == "kept":
                    assert matches(got, key), f"{key} is kept but was missed or wrong"
                else:
                    assert got is None or matches(got, key), f"{key} came back wrong"
                reads["exact" if got is not None else "miss"] += 1
        return run

    def remover(stop):
        for key in doomed:
            if stop.is_set():
                return
            assert tier.remove(key)
            time.sleep(0.001)

    def compactor(stop):
        while not stop.is_set():
            tier.compact(0.9)
            time.sleep(0.005)

    errors = run_threads([reader(1), reader(2), remover, compactor], run_s=RUN_S)
    try:
        assert not errors, errors
        assert tier.counters.segments_compacted >= 3 and tier.counters.records_compacted > 0
        assert reads["exact"] > 500 and reads["miss"] > 50
        assert all(matches(tier.get(key), key) for key in kept)
        assert tier.counters.damaged_records == 0
    finally:
        tier.close()


def test_reads_during_eviction_return_the_right_block_or_a_miss(tmp_path):
    tier = DiskTier(tmp_path, 384 << 10, segment_bytes=64 << 10, compact_live_fraction=0.5)
    written: list[BlockKey] = []
    lock = threading.Lock()
    reads = {"exact": 0, "miss": 0}

    def writer(stop):
        i = 0
        while not stop.is_set():
            key = BlockKey("w", i % 4, i)
            tier.put(key, encoded_for(key))
            with lock:
                written.append(key)
            if i >= 3 and i % 3:  # two in three blocks removed: sparse segments, so compaction as well
                tier.remove(BlockKey("w", (i - 3) % 4, i - 3))
            i += 1

    def reader(seed):
        def run(stop):
            rng = random.Random(seed)
            while not stop.is_set():
                with lock:
                    if not written:
                        continue
                    key = written[-1 - min(int(rng.expovariate(0.01)), len(written) - 1)]
                got = tier.get(key)
                assert got is None or matches(got, key), f"{key} came back wrong"
                reads["exact" if got is not None else "miss"] += 1
        return run

    errors = run_threads([writer, reader(1), reader(2)])
    try:
        assert not errors, errors
        assert tier.counters.segments_evicted >= 3 and tier.counters.segments_compacted >= 1
        assert reads["exact"] > 100 and reads["miss"] > 10
        assert tier.used_bytes <= tier.capacity_bytes
        assert tier.counters.damaged_records == 0
    finally:
        tier.close()


def test_inspect_alongside_a_writer_sees_at_most_the_record_being_written(tmp_path):
    tier = DiskTier(tmp_path, 256 << 20, segment_bytes=64 << 10)
    scans = {"reports": 0, "live": 0}

    def writer(stop):
        i = 0
        while not stop.is_set():
            key = BlockKey("w", 0, i)
            tier.put(key, encoded_for(key))
            if i % 4 == 3:
                tier.remove(BlockKey("w", 0, i - 2))
            i += 1

    def inspector(stop):
        while not stop.is_set():
            report = inspect_dir(tmp_path, verify=True)  # another reader: no lock, writes nothing
            scans["reports"] += 1
            scans["live"] = max(scans["live"], report.live_records)
            newest = report.segments[-1] if report.segments else None
            for damage in report.damaged:  # only a tail still being appended may look torn
                assert damage.file == newest.file and damage.offset + damage.length == newest.file_bytes, damage

    errors = run_threads([writer, inspector], run_s=1.0)
    try:
        assert not errors, errors
        assert scans["reports"] >= 3 and scans["live"] > 0
    finally:
        tier.close()
    report = inspect_dir(tmp_path, verify=True)
    assert report.damaged == []
