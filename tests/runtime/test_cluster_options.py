"""A Cluster's options from a YAML file's `cluster:` section and TIERED_* variables, checked by the
constructor's one mechanism (tiered.checked) before Ray starts."""

from __future__ import annotations

import pytest
import ray

from runtime.cluster import Cluster
from tiered import StoreConfig


def test_options_from_the_file_then_the_environment(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text("store:\n  host_bytes: 3MiB\ncluster:\n  workers: 3\n  step_tokens: 128\n  routing: round-robin\n")
    env = {"TIERED_WORKERS": "4", "TIERED_CALL_TIMEOUT_S": "2.5", "TIERED_HOST_BYTES": "1MiB"}
    assert Cluster.options(path, env) == {"workers": 4, "step_tokens": 128, "routing": "round-robin",
                                          "call_timeout_s": 2.5}
    assert StoreConfig.load(path, env={}, device="cpu").host_bytes == 3 << 20  # the store's section, beside it
    assert Cluster.options(None, {}) == {}


def test_bad_files_and_values_are_refused_with_the_option_named(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text("cluster:\n  worker: 3\n")
    with pytest.raises(ValueError, match=r"options\.yaml \(cluster\): unknown options \['worker'\]; valid options"):
        Cluster.options(path, {})
    path.write_text("cluster: [1, 2]\n")
    with pytest.raises(ValueError, match="expected a mapping of options, got list"):
        Cluster.options(path, {})
    path.write_text("cluster:\n  workers: [\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        Cluster.options(path, {})
    for env, error, words in (
        ({"TIERED_WORKERS": "two"}, TypeError, r"Cluster: workers must be int, got 'two' \(str\)"),
        ({"TIERED_WORKERS": "0"}, ValueError, r"Cluster: workers must be > 0, got 0"),
        ({"TIERED_MAX_SEQUENCES": "true"}, TypeError, r"Cluster: max_sequences must be int, got True \(bool\)"),
        ({"TIERED_FAILOVER_TIMEOUT_S": "-1"}, ValueError, r"Cluster: failover_timeout_s must be > 0, got -1"),
    ):
        with pytest.raises(error, match=words):
            Cluster(model="smollm2-135m", **Cluster.options(None, env))
    assert not ray.is_initialized()  # refused before Ray was started


def test_a_recorder_is_checked_before_ray_starts(tmp_path):
    from runtime.trace_recorder import TraceRecorder

    with TraceRecorder(tmp_path / "trace.jsonl", block_tokens=16) as recorder, \
            pytest.raises(ValueError, match="recorder counts blocks of 16 tokens, the store 64"):
        Cluster(model="smollm2-135m", store_config=StoreConfig(device="cpu", block_tokens=64), recorder=recorder)
    with pytest.raises(TypeError, match="Cluster: recorder"):
        Cluster(model="smollm2-135m", recorder=str(tmp_path / "trace.jsonl"))
    assert not ray.is_initialized()
