"""The cluster on a real local Ray with Ray Serve: two CPU replicas of a tiny random Llama.

Every session's conversation equals the same conversation on an in-process Session; a session's
calls stay on its replica; a new session sharing a document with a session on replica B goes to
B; a replica killed mid-conversation is replaced and the conversation goes on unchanged.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import ray  # noqa: E402  (the serve extra is a dependency: a missing one fails, never skips)
from ray import serve  # noqa: E402

from runtime import Cluster, Session  # noqa: E402
from runtime.actors import start_ray  # noqa: E402
from tiered import StoreConfig  # noqa: E402


BLOCK_TOKENS = 16
CONFIG = StoreConfig(device="cpu", device_bytes=1 << 20, host_bytes=1 << 20, block_tokens=BLOCK_TOKENS)
NEW_TOKENS = 6
LONG_TOKENS = 48
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    start_ray("local", num_cpus=4, _system_config={"metrics_report_interval_ms": 1000})
    try:
        with Cluster(model=str(tiny_dir), workers=2, store_config=CONFIG, shared_dir=tmp_path_factory.mktemp("shared"),
                     call_timeout_s=120, failover_timeout_s=120) as running:
            yield running
    finally:
        serve.shutdown()
        ray.shutdown()


def prompt(seed: int, length: int = 40) -> list[int]:
    return [(seed * 37 + i * 11) % 500 + 3 for i in range(length)]


def converse(session, turns: list[list[int]]) -> list[int]:
    """Extend each turn and generate after it; the whole token log."""
    for ids in turns:
        session.extend(ids)
        session.generate(NEW_TOKENS)
    return list(session.tokens)


def reference(model, turns: list[list[int]]) -> list[int]:
    with Session(model, CONFIG) as session:
        return converse(session, turns)


def test_four_sessions_on_two_replicas_equal_in_process_sessions(cluster, tiny_model):
    conversations = {f"conv-{k}": [prompt(k, 40 + 7 * k), prompt(100 + k, 9)] for k in range(4)}
    handles = {sid: cluster.open(sid) for sid in conversations}
    for sid, turns in conversations.items():  # interleaved: turn 1 of each, then turn 2 of each
        handles[sid].extend(turns[0])
    for sid in conversations:
        handles[sid].generate(NEW_TOKENS)
    for sid, turns in conversations.items():
        handles[sid].extend(turns[1])
        handles[sid].generate(NEW_TOKENS)
    replicas = set()
    for sid, turns in conversations.items():
        assert handles[sid].tokens == reference(tiny_model, turns), sid
        stats = handles[sid].stats()
        assert stats["tokens"] == len(handles[sid].tokens)
        assert stats["replica_id"] == handles[sid].replica_id  # its calls stayed on its replica
        replicas.add(stats["replica_id"])
    assert len(replicas) == 2  # distinct prompts, balanced by load
    listing = cluster.stats()
    assert listing["workers"] == 2
    hosted = sorted(s for entry in listing["replicas"].values() for s in entry["sessions"])
    assert hosted == sorted(conversations)
    for sid in conversations:
        assert cluster.worker_of(sid)._actor_id.hex() in {
            ray.get_actor(entry["actor_name"], namespace="serve")._actor_id.hex()
            for entry in listing["replicas"].values() if sid in entry["sessions"]}
        handles[sid].close()
    with pytest.raises(KeyError):
        cluster.worker_of("conv-0")


def test_concurrent_sessions_share_their_replicas_forward_steps(cluster, tiny_model):
    """Four conversations at once from four threads: each replica batches its two sessions'
    decodes into shared steps, and every conversation still equals its in-process twin."""
    turns = [[prompt(40 + i, 30 + 7 * i)] for i in range(4)]
    expected = [reference_long(tiny_model, t) for t in turns]
    before = {r: d["batching"]["shared_steps"] for r, d in cluster.stats()["replicas"].items()}
    start = threading.Barrier(4)

    def talk(conversation: list[list[int]]) -> list[int]:
        session = cluster.open()
        try:
            session.extend(conversation[0])
            start.wait(timeout=60)
            session.generate(LONG_TOKENS)
            return list(session.tokens)
        finally:
            session.close()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(talk, turns)) == expected
    after = cluster.stats()["replicas"]
    assert sum(d["batching"]["shared_steps"] - before.get(r, 0) for r, d in after.items()) > 0


def test_a_stream_cancelled_by_its_caller_leaves_the_replicas_loop(cluster):
    """A caller that cancels a stream mid-way (a client gone): the replica's loop drops the call
    at its next step, the session keeps the tokens it handed out, and its next call works."""
    session = cluster.open()
    session.extend(prompt(50, 30))
    replica = session.stats()["replica_id"]
    tokens = cluster._handle.options(method_name="stream", stream=True).remote(session.session_id, 200, 0.0, None, 1.0)
    handed_out = [next(tokens), next(tokens)]
    tokens.cancel()
    deadline_s = time.monotonic() + 30
    while cluster.stats()["replicas"][replica]["batching"]["running"] and time.monotonic() < deadline_s:
        time.sleep(0.1)  # polling the replica: cancellation reaches it asynchronously
    assert cluster.stats()["replicas"][replica]["batching"]["running"] == 0
    held = session.stats()["tokens"]
    assert 30 + len(handed_out) <= held < 30 + 200  # it stopped long before its 200 tokens
    assert len(session.generate(3)) == 3 and session.stats()["tokens"] == held + 3  # its next call works
    session.close()


def reference_long(model, turns: list[list[int]]) -> list[int]:
    with Session(model, CONFIG) as session:
        session.extend(turns[0])
        session.generate(LONG_TOKENS)
        return list(session.tokens)


def test_a_new_session_sharing_a_prefix_goes_to_its_replica_unless_it_is_overloaded(cluster):
    document = prompt(7, 6 * BLOCK_TOKENS)
    other = cluster.open()
    other.extend(prompt(8, 30))
    first = cluster.open()
    first.extend(document + prompt(9, 5))
    home = first.replica_id
    opened = [other, first]
    max_imbalance = cluster.table.policy.max_imbalance
    for k in range(10):  # sessions over the document follow it until its replica is overloaded
        loads = {r: len(entry["sessions"]) for r, entry in cluster.table.snapshot().items()}
        overloaded = loads[home] - min(loads.values()) > max_imbalance
        session = cluster.open()
        opened.append(session)
        session.extend(document + prompt(10 + k, 5))
        if overloaded:
            assert session.replica_id != home  # two choices, both sampled: the idle one
            break
        assert session.replica_id == home
        assert session.stats()["reused_tokens"] == len(document)
    else:
        raise AssertionError("the document's replica never became overloaded")
    for session in opened:
        session.close()


def test_failover_after_the_hosting_replica_is_killed(cluster, tiny_model):
    turns = [prompt(20, 50), prompt(21, 12), prompt(22, 8)]
    session = cluster.open("failover")
    session.extend(turns[0])
    session.generate(NEW_TOKENS)
    saved_tokens = list(session.tokens)
    manifest = session.save()  # its sealed blocks are in the shared tier once this returns
    assert manifest.startswith(str(cluster.shared_dir))
    victim = session.replica_id
    ray.kill(cluster.worker_of("failover"))
    session.extend(turns[1])  # placed again on a live replica, rebuilt from the shared tier + token log
    stats = session.stats()
    assert session.failovers == 1 and stats["replica_id"] != victim
    blocks = len(saved_tokens) // BLOCK_TOKENS
    assert stats["reused_tokens"] == blocks * BLOCK_TOKENS  # the victim's sealed blocks, read back
    session.generate(NEW_TOKENS)
    session.extend(turns[2])
    session.generate(NEW_TOKENS)
    assert session.tokens == reference(tiny_model, turns)
    assert session.stats()["tokens"] == len(session.tokens)
    session.close()
    resumed = cluster.resume("failover")  # the manifest of the save, from the shared directory
    assert resumed.tokens == saved_tokens
    resumed.extend(turns[1])
    resumed.generate(NEW_TOKENS)
    assert resumed.tokens == reference(tiny_model, turns[:2])
    resumed.close()


def test_a_first_placement_on_a_replica_that_just_died_goes_to_a_live_one(cluster, tiny_model):
    busy = [cluster.open()]
    busy[0].extend(prompt(30, 20))
    deadline_s = time.monotonic() + 120  # a replica killed by an earlier test may still be starting again
    for k in itertools.count():  # new sessions go to the least loaded live replica: soon the other one
        idle = cluster.open()
        idle.extend(prompt(31 + k, 20))
        if idle.replica_id != busy[0].replica_id or time.monotonic() > deadline_s:
            break
        busy.append(idle)
        time.sleep(2)
    victim, victim_actor = idle.replica_id, cluster.worker_of(idle.session_id)
    assert victim != busy[0].replica_id
    idle.close()  # the victim is the least loaded replica again: where the next new session is routed
    ray.kill(victim_actor)
    session = cluster.open()
    turns = [prompt(40, 40)]
    assert converse(session, turns) == reference(tiny_model, turns)  # the adopt that met the dead replica was retried
    assert session.replica_id != victim and session.failovers == 0
    for opened in (session, *busy):
        opened.close()


def test_bad_arguments(tiny_dir):
    with pytest.raises(ValueError, match="workers"):
        Cluster(model=str(tiny_dir), workers=0)
    with pytest.raises(TypeError, match="store_config"):
        Cluster(model=str(tiny_dir), store_config={"device": "cpu"})
    with pytest.raises(ValueError, match="routing"):
        Cluster(model=str(tiny_dir), routing="nearest")
    with pytest.raises(TypeError, match="shared_dir"):
        Cluster(model=str(tiny_dir), shared_dir=5)


def test_a_replica_refusing_bad_input_raises_that_error_itself(cluster):
    session = cluster.open()
    with pytest.raises(ValueError, match="at most 256") as caught:
        session.extend(prompt(30, 300))  # the tiny model holds 256 positions
    assert type(caught.value) is ValueError and "Traceback" not in str(caught.value)
    session.close()


def scrape(deadline_s: float, wanted: tuple[str, ...]) -> dict[str, float]:
    """Sum of the values of each wanted metric at the Prometheus endpoints of Ray's nodes, polled
    until all are there or the deadline passes (metrics reach the endpoint periodically)."""
    found: dict[str, float] = {}
    while time.monotonic() < deadline_s:
        found = {}
        for node in ray.nodes():
            if not node["Alive"]:
                continue
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            body = urllib.request.urlopen(url, timeout=10).read().decode()
            for line in body.splitlines():
                name = line.split("{", 1)[0]
                if name in wanted:
                    found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if all(found.get(name, 0) > 0 for name in wanted):
            return found
        time.sleep(1.0)  # polling a periodic export, not synchronizing with it
    return found


def test_metrics_reach_the_prometheus_endpoint(cluster):
    session = cluster.open()
    session.extend(prompt(40, 3 * BLOCK_TOKENS + 4))
    session.generate(NEW_TOKENS)
    decoded = len(session.tokens) - (3 * BLOCK_TOKENS + 4)
    wanted = ("ray_tiered_prefilled_tokens_total", "ray_tiered_decoded_tokens_total", "ray_tiered_tier_hits_total",
              "ray_tiered_tier_bytes_in_total", "ray_tiered_request_latency_s_count", "ray_tiered_step_sequences_count")
    found = scrape(time.monotonic() + 90, wanted)
    session.close()
    assert all(found.get(name, 0) > 0 for name in wanted), found
    assert found["ray_tiered_prefilled_tokens_total"] >= 3 * BLOCK_TOKENS + 4  # this session's prompt at least
    assert found["ray_tiered_decoded_tokens_total"] >= decoded
