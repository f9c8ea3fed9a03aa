"""A Cluster as a new user starts it, in a fresh process whose Ray temp directory holds a stale
current-cluster file: it starts its own Ray, serves a session, and stops Serve and Ray on exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from .test_cluster_start import _dead_address
from .tiny_models import write_hf_dir

pytestmark = pytest.mark.timeout(300)


def test_a_cluster_that_started_ray_stops_it(tmp_path):
    write_hf_dir(tmp_path / "tiny", "llama", seed=4)
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        (root / "ray").mkdir()
        (root / "ray" / "ray_current_cluster").write_text(_dead_address() + "\n")
        code = textwrap.dedent(f"""
            import ray
            from runtime import Cluster
            from tiered import StoreConfig
            config = StoreConfig(device="cpu", device_bytes=1 << 20, host_bytes=1 << 20, block_tokens=16)
            with Cluster(model={str(tmp_path / "tiny")!r}, workers=1, store_config=config, num_cpus=2) as cluster:
                session = cluster.open()
                session.extend(list(range(5, 40)))
                print("TOKENS", len(session.generate(4)), cluster.stats()["workers"])
            print("RAY_UP", ray.is_initialized())
        """)
        env = dict(os.environ, RAY_TMPDIR=str(root), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = next(line.split() for line in result.stdout.splitlines() if line.startswith("TOKENS"))
    assert 0 <= int(tokens[1]) <= 4 and tokens[2] == "1"  # generation may stop early at a stop token
    assert "RAY_UP False" in result.stdout
