"""RoutingTable, the cluster router's state and decisions, without Ray: session affinity, prefix-aware
placement through policies.routing, load as the override, and replicas that die."""

from __future__ import annotations

import pytest

from policies.routing import make_routing
from runtime.cluster.table import RoutingTable

DOC = [f"d{i}" for i in range(16)]  # a document's block hashes


def test_a_session_follows_its_home_while_it_lives():
    table = RoutingTable()
    table.set_replicas(["a", "b"])
    table.record("s", "b", DOC[:2])
    assert table.route("s", ["a", "b"]) == "b"
    table.remove_replica("b")
    assert table.home_of("s") is None
    assert table.route("s", ["a"]) == "a"


def test_a_new_session_goes_to_the_longest_cached_prefix():
    table = RoutingTable()
    table.set_replicas(["a", "b"])
    table.record("s1", "a", DOC[:1])
    table.record("s2", "b", DOC[:8])
    table.record("s3", "b", ["other"])  # b is busier, within the policy's max_imbalance
    assert table.route("new", ["a", "b"], DOC[:8] + ["question"], place=True) == "b"
    assert table.prefix_blocks("b", DOC) == 8 and table.prefix_blocks("a", DOC) == 1


def test_placements_routed_at_once_see_each_others_load():
    """Serve routes concurrent calls before the first reaches its replica (on_request_routed):
    each placement counts as its replica's load from the moment it is routed."""
    from runtime.cluster.cluster import routing_policy

    table = RoutingTable(routing_policy("prefix-affinity", shared=True))
    table.set_replicas(["a", "b"])
    table.record("reader", "a", DOC)  # "a" holds the document
    table.forget("reader")
    placed = [table.route(f"s{k}", ["a", "b"], DOC, place=True) for k in range(8)]  # no record in between
    assert placed.count("a") == placed.count("b") == 4
    assert table.home_of("s0") == placed[0]
    assert table.route("s0", ["a", "b"], DOC, place=True) == placed[0]  # placed again: its own load is not counted


def test_under_overload_affinity_gives_way():
    table = RoutingTable()
    table.set_replicas(["a", "b"])
    for i in range(8):
        table.record(f"s{i}", "b", DOC)
    assert table.route("new", ["a", "b"], DOC, place=True) == "a"


def test_no_cached_prefix_goes_to_the_least_loaded():
    table = RoutingTable()
    table.set_replicas(["a", "b", "c"])
    table.record("s1", "a", DOC[:2])
    table.record("s2", "b", ["x"])
    assert table.route("new", ["a", "b", "c"], ["y"], place=True) == "c"


def test_replicas_that_leave_take_their_state():
    table = RoutingTable()
    table.set_replicas(["a", "b"])
    table.record("s", "a", DOC)
    table.set_replicas(["b", "c"])
    assert table.home_of("s") is None and table.prefix_blocks("a", DOC) == 0
    assert list(table.snapshot()) == ["b", "c"]
    table.record("t", "c")
    table.forget("t")
    assert table.snapshot()["c"]["sessions"] == []


def test_other_policies_by_name_and_bad_input():
    table = RoutingTable("round-robin")
    assert [table.route(None, ["a", "b"], place=True) for _ in range(3)] == ["a", "b", "a"]
    assert RoutingTable(make_routing("least-loaded")).route(None, ["a"]) == "a"
    with pytest.raises(ValueError, match="round-robin"):
        RoutingTable("nearest")
    with pytest.raises(TypeError):
        RoutingTable(3)
    with pytest.raises(ValueError, match="no replica"):
        RoutingTable().route("s", [])


def test_with_a_shared_tier_affinity_follows_the_prefix_only_among_the_least_loaded():
    from runtime.cluster.cluster import routing_policy

    for shared, expected in ((False, ["a", "a", "a"]), (True, ["a", "b", "a"])):
        table = RoutingTable(routing_policy("prefix-affinity", shared=shared))
        table.record("reader", "a", DOC)  # "a" holds the document
        table.forget("reader")
        placed = []
        for k in range(3):  # sessions over the document, each staying open
            placed.append(table.route(f"s{k}", ["a", "b"], DOC, place=True))
            table.record(f"s{k}", placed[-1], DOC)
        assert placed == expected, shared
