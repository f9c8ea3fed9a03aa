"""The cluster over several Ray nodes on this machine (ray.cluster_utils.Cluster): the driver
joins by address, replicas land on different nodes, and a session whose node is removed goes on
on another node, rebuilt from the shared tier and its token log, with the tokens of an
uninterrupted run."""

from __future__ import annotations

import pytest

import ray  # noqa: E402  (the serve extra is a dependency: a missing one fails, never skips)
from ray import serve  # noqa: E402

from ray.cluster_utils import Cluster as RayNodes  # noqa: E402

from runtime import Cluster, Session, load_model  # noqa: E402

from .test_cluster import BLOCK_TOKENS, CONFIG, NEW_TOKENS, converse, prompt  # noqa: E402
from .tiny_models import write_hf_dir  # noqa: E402

pytestmark = pytest.mark.timeout(420)
NODE = dict(num_cpus=1, object_store_memory=80 << 20, include_dashboard=False)


@pytest.fixture
def nodes():
    """A head without CPUs (the driver and Serve's controller) and three one-CPU nodes."""
    cluster = RayNodes(initialize_head=True, head_node_args=dict(NODE, num_cpus=0))
    workers = [cluster.add_node(**NODE) for _ in range(3)]
    cluster.wait_for_nodes(timeout=120)
    try:
        yield cluster, workers
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_replicas_on_different_nodes_and_a_session_survives_its_node(nodes, tmp_path):
    ray_nodes, workers = nodes
    write_hf_dir(tmp_path / "tiny", "llama", seed=5)
    turns = [prompt(60, 3 * BLOCK_TOKENS + 2), prompt(61, 10)]
    with Cluster(model=str(tmp_path / "tiny"), workers=2, store_config=CONFIG, shared_dir=tmp_path / "shared",
                 address=ray_nodes.address, call_timeout_s=120, failover_timeout_s=180) as cluster:
        placed = [cluster.open(f"n{k}") for k in range(2)]
        for k, session in enumerate(placed):
            session.extend(prompt(70 + k, 20))
        node_of = {s.session_id: s.stats()["node_id"] for s in placed}
        assert len(set(node_of.values())) == 2  # one replica per node
        session = cluster.open("moving")
        session.extend(turns[0])
        session.generate(NEW_TOKENS)
        session.save()  # its sealed blocks are in the shared tier
        home_node = session.stats()["node_id"]
        ray_nodes.remove_node(next(n for n in workers if n.node_id == home_node))
        session.extend(turns[1])
        session.generate(NEW_TOKENS)
        after = session.stats()
        assert after["node_id"] != home_node and session.failovers >= 1
        assert after["reused_tokens"] >= 3 * BLOCK_TOKENS
    with Session(load_model(str(tmp_path / "tiny")), CONFIG) as reference:
        assert session.tokens == converse(reference, turns)
