"""Starting Ray as a new user would after an earlier Ray died uncleanly: a stale current-cluster
file in place. The embedded default starts its own instance; joining a dead cluster is an error
that names its address, within the timeout. Each Ray start runs in a child process whose Ray temp
directory (RAY_TMPDIR) is a fresh one, so the machine's own /tmp/ray is never touched."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from runtime.actors import probe_cluster, start_ray

CHILD_TIMEOUT_S = 180


def _dead_address() -> str:
    """127.0.0.1 and an ephemeral port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def stale_ray_tmp():
    """A short RAY_TMPDIR (Ray's socket paths are length-limited) whose ray/ray_current_cluster
    names a dead cluster; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (root / "ray").mkdir()
    stale = _dead_address()
    (root / "ray" / "ray_current_cluster").write_text(stale + "\n")
    yield root, stale
    shutil.rmtree(root, ignore_errors=True)


def _run_child(root: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_TMPDIR=str(root), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)


def test_default_starts_its_own_instance_despite_a_stale_cluster_file(stale_ray_tmp):
    root, stale = stale_ray_tmp
    result = _run_child(root, """
        import time, ray
        from runtime.actors import start_ray
        start_s = time.perf_counter()
        address = start_ray(num_cpus=1)
        assert ray.get(ray.put(41)) + 1 == 42
        print("ADDRESS", address, "SECONDS", round(time.perf_counter() - start_s, 1))
        ray.shutdown()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("ADDRESS"))
    assert line.split()[1] != stale


def test_joining_the_stale_cluster_is_an_error_naming_it(stale_ray_tmp):
    root, stale = stale_ray_tmp
    result = _run_child(root, """
        import time
        from runtime.actors import start_ray
        for address in ("auto", %r):
            start_s = time.perf_counter()
            try:
                start_ray(address, timeout_s=2.0)
            except ConnectionError as err:
                print("ERROR", round(time.perf_counter() - start_s, 1), err)
            else:
                raise SystemExit("joined a dead cluster")
    """ % stale)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2
    for line in errors:
        assert stale in line
        assert float(line.split()[1]) < 10


def test_ray_address_env_is_an_explicit_join(stale_ray_tmp):
    root, _ = stale_ray_tmp
    dead = _dead_address()
    result = _run_child(root, """
        import os
        from runtime.actors import start_ray
        os.environ["RAY_ADDRESS"] = %r
        try:
            start_ray(timeout_s=1.0)
        except ConnectionError as err:
            print("ERROR", err)
    """ % dead)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ERROR the Ray cluster at '{dead}'" in result.stdout


def test_bad_arguments():
    with pytest.raises(ValueError, match="host:port"):
        probe_cluster("not-an-address", timeout_s=0.5)
    with pytest.raises(ValueError, match="timeout_s"):
        start_ray("local", timeout_s=0)
    with pytest.raises(TypeError, match="address"):
        start_ray(5)
