"""`--calibrate` measures this machine with our store and model and writes a profile that loads."""

from __future__ import annotations

from runtime.simulate import load_profile
from runtime.simulate.calibrate import calibrate


def test_calibration_writes_a_usable_profile(tmp_path):
    said = []
    path = calibrate(tmp_path / "me.yaml", progress=said.append, prefill_tokens=(32, 96))
    profile = load_profile(str(path))
    assert profile.name == "cpu-local" and profile.model == "smollm2-135m"
    assert profile.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4  # SmolLM2-135M in fp32: layers x KV heads x dims
    assert profile.prefill_s_per_token > 0 and profile.prefill_overhead_s >= 0
    for link in profile.links.values():
        assert 1e5 < link.bytes_per_s < 1e13 and link.latency_s >= 0
    assert any("prefill" in line for line in said)
