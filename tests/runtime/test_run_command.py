"""`tiered run`, the main job, end to end on a tiny model: in this process, and on a real local Ray worker."""

from __future__ import annotations

import re

import pytest

from runtime.cli import main as cli

from .tiny_models import write_hf_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-run")
    write_hf_dir(directory, "llama", seed=2)
    return directory


def run_args(tiny_dir, tmp_path) -> list[str]:
    return [
        "run", "--model", str(tiny_dir), "--context-tokens", "120", "--max-new-tokens", "5",
        "--question", "Who speaks?", "--question", "Why?", "--device-mib", "1", "--host-mib", "1",
        "--disk-mib", "8", "--disk-dir", str(tmp_path / "kv"),
    ]


def check_report(out: str) -> None:
    assert "[turn 1] Who speaks?" in out and "[turn 2] Why?" in out
    assert len(re.findall(r"prompt tokens at \d+ tok/s", out)) == 2
    session = re.search(r"session: (\d+) tokens; prefill \d+ tok/s, decode [\d.]+ tok/s", out)
    assert session and int(session.group(1)) > 120
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().split()[:1] in (["device"], ["host"], ["disk"])}
    assert set(rows) == {"device", "host", "disk"}
    assert int(rows["device"][1]) > 0  # blocks on the device tier
    assert int(rows["device"][6]) > 0  # reads served by it


def test_run_in_process(tiny_dir, tmp_path, capsys):
    assert cli(run_args(tiny_dir, tmp_path) + ["--no-ray"]) == 0
    check_report(capsys.readouterr().out)


def test_run_on_a_local_ray_worker(tiny_dir, tmp_path, capsys):
    import ray

    try:
        assert cli(run_args(tiny_dir, tmp_path)) == 0
        check_report(capsys.readouterr().out)
    finally:
        ray.shutdown()
