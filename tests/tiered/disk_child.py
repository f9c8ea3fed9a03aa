"""Child processes of the disk tier tests (run as a script; not collected by pytest).

    disk_child.py zygote            read one JSON writer job per stdin line; fork a writer for each,
                                    print {"pid": ...}, then {"status": ...} once it has ended
    disk_child.py verify-tier JOB   open a DiskTier, check the expected blocks, print a JSON summary
    disk_child.py verify-store JOB  the same through a TieredStore

The zygote imports torch once, so each crash round costs a fork instead of a fresh interpreter.
A writer logs "ready" once its tier is open, then the index of every operation that returned.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from disk_helpers import block_for, crash_ops, encoded_for, matches

from tiered import BlockKey, StoreConfig, TieredStore
from tiered.disk import DiskTier


def writer(job: dict) -> None:
    tier = DiskTier(job["dir"], job["capacity_bytes"], segment_bytes=job["segment_bytes"],
                    durability=job["durability"], compact_live_fraction=0.5)
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(log, b"ready\n")
    for n, (op, key, generation) in enumerate(crash_ops(job["round"], job["seed"])):
        if op == "put":
            tier.put(key, encoded_for(key, generation))
        else:
            tier.remove(key)
        os.write(log, f"{n}\n".encode())
        time.sleep(job["pace_s"])


def zygote() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                writer(job)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(3)  # a writer only ends by being killed
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)


def _key(entry: list) -> BlockKey:
    return BlockKey(entry[0], entry[1], entry[2])


def verify_tier(job: dict) -> dict:
    tier = DiskTier(job["dir"], job["capacity_bytes"], segment_bytes=job.get("segment_bytes", 1 << 16))
    try:
        expected = [(_key(e), e[3]) for e in job["expected"]]
        equal = sum(matches(tier.get(key), key, generation) for key, generation in expected)
        return {"keys": len(tier), "equal": equal, "expected": len(expected),
                "from_snapshot": tier.counters.opened_from_snapshot, "damaged": tier.counters.damaged_records}
    finally:
        tier.close()


def verify_store(job: dict) -> dict:
    config = StoreConfig(**job["config"])
    with TieredStore(config) as store:
        where = [store.where(_key(e)) for e in job["expected"]]
        equal = 0
        for entry in job["expected"]:
            key = _key(entry)
            block = store.get(key)
            equal += block is not None and block.equal(block_for(key, entry[3], tokens=entry[4]))
        return {"blocks": len(store), "where": where, "equal": equal, "expected": len(job["expected"])}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "zygote":
        zygote()
    else:
        with open(sys.argv[2]) as f:
            job = json.load(f)
        result = verify_tier(job) if mode == "verify-tier" else verify_store(job)
        print(json.dumps(result))
