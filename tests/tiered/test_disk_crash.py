"""Crash safety: a writer process killed with SIGKILL at a random moment, 50 times over one directory.

After each kill the directory is reopened: every block the tier returns equals what was written,
every operation the writer finished is there, the one in flight is all or nothing, blocks of
earlier rounds are untouched, and the tier keeps accepting writes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.tiered.disk_helpers import encoded_for, matches, state_after
from tiered import BlockKey
from tiered.disk import DiskTier

ROUNDS = 50
CHILD = Path(__file__).with_name("disk_child.py")
CAPACITY_BYTES = 1 << 30  # nothing is evicted: every finished write must survive
SEGMENT_BYTES = 64 << 10  # small segments: rolls, sealing and compaction happen every round
DURABILITY = ("segment", "record", "never")


def finished_ops(log: Path) -> int:
    """Operations the writer logged as returned (its log says 'ready', then 0, 1, 2, ...)."""
    lines = log.read_text().split("\n")
    numbers = [int(line) for line in lines[1:] if line.strip()]
    assert numbers == list(range(len(numbers)))
    return len(numbers)


def wait_ready(log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (log.exists() and log.read_text().startswith("ready")):
        assert time.monotonic() < deadline, "the writer never opened the tier"
        time.sleep(0.005)


def test_sigkill_at_random_moments_never_loses_or_corrupts_a_finished_write(tmp_path):
    directory = tmp_path / "disk"
    rng = random.Random(1234)
    zygote = subprocess.Popen([sys.executable, str(CHILD), "zygote"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=CHILD.parent)
    expected: dict[BlockKey, int] = {}  # blocks of finished rounds, and the parent's own writes
    killed_mid_write = 0
    from_snapshot = 0
    segments_deleted = 0
    try:
        for round_index in range(ROUNDS):
            seed = rng.randrange(1 << 30)
            log = tmp_path / f"round{round_index}.log"
            job = dict(dir=str(directory), round=round_index, seed=seed, log=str(log), pace_s=0.001,
                       durability=DURABILITY[round_index % 3], capacity_bytes=CAPACITY_BYTES,
                       segment_bytes=SEGMENT_BYTES)
            if round_index % 4 == 3:  # now and then the writer and the reopen rebuild from the segments alone
                (directory / "INDEX.snapshot").unlink()
            zygote.stdin.write(json.dumps(job) + "\n")
            zygote.stdin.flush()
            pid = json.loads(zygote.stdout.readline())["pid"]
            wait_ready(log)
            time.sleep(rng.uniform(0.05, 0.5))
            os.kill(pid, signal.SIGKILL)
            ended = json.loads(zygote.stdout.readline())
            assert ended["signal"] == signal.SIGKILL, f"round {round_index}: the writer ended on its own: {ended}"

            done = finished_ops(log)
            killed_mid_write += done > 0
            before, after = state_after(round_index, seed, done), state_after(round_index, seed, done + 1)
            tier = DiskTier(directory, CAPACITY_BYTES, segment_bytes=SEGMENT_BYTES)
            try:
                from_snapshot += tier.counters.opened_from_snapshot
                ids = tier.segment_ids()
                segments_deleted = max(ids) - len(ids)  # nothing is evicted: the gaps are compactions
                stored = set(tier.keys())
                mine = {key for key in stored if key.namespace == f"r{round_index}"}
                assert mine <= set(before) | set(after), "a key the writer never had is stored"
                for key in set(before) | set(after):
                    got = tier.get(key)
                    if before.get(key) == after.get(key):  # untouched by the operation in flight
                        assert matches(got, key, before[key]), f"round {round_index}: {key} lost or wrong"
                        expected[key] = before[key]
                    elif got is not None:  # the operation in flight happened or did not: nothing between
                        generations = [g for g in (before.get(key), after.get(key)) if g is not None]
                        found = [g for g in generations if matches(got, key, g)]
                        assert found, f"round {round_index}: {key} is neither version"
                        expected[key] = found[0]
                assert mine <= set(expected), "a listed block of this round did not read back intact"
                # earlier rounds: all present; a sample checked byte for byte
                assert set(expected) <= stored, f"round {round_index}: blocks of earlier rounds are gone"
                for key in rng.sample(sorted(expected, key=repr), min(40, len(expected))):
                    assert matches(tier.get(key), key, expected[key])
                # the tier keeps accepting writes
                key = BlockKey("parent", 0, round_index)
                tier.put(key, encoded_for(key))
                assert matches(tier.get(key), key)
                expected[key] = 0
            finally:
                tier.close()
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert killed_mid_write >= ROUNDS * 0.9, "most kills should land after the writer finished some writes"
    assert ROUNDS // 4 <= ROUNDS - from_snapshot < ROUNDS, "reopens should use the snapshot, and rebuild without it"
    assert segments_deleted > 0, "the writers' compactions should have deleted segments"
    final = DiskTier(directory, CAPACITY_BYTES, segment_bytes=SEGMENT_BYTES)
    try:
        assert set(final.keys()) == set(expected)
        assert all(matches(final.get(key), key, generation) for key, generation in expected.items())
    finally:
        final.close()
