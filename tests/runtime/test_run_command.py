"""`tiered run`, the main job, end to end on a tiny model: one session in this process, and two
concurrent sessions over one document on a real local cluster of two replicas."""

from __future__ import annotations

import re

import pytest
import ray
from ray import serve

from runtime.cli import main as cli
from tiered import StoreConfig

from .tiny_models import write_hf_dir

BLOCK = StoreConfig().block_tokens  # what `tiered run` stores blocks of


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


def session_rows(out: str) -> dict[str, list[str]]:
    """The sessions table: name -> [replica, node, tokens, reused, computed, recomputed, prefill, decode, failovers]."""
    lines = out.split("\nsessions")[1].split("\nreplica ")[0].splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines if re.match(r"\s*[A-Z] ", line)}


@pytest.fixture
def local_ray():
    yield
    serve.shutdown()
    ray.shutdown()


def test_run_on_a_local_cluster_reuses_the_document(tiny_dir, tmp_path, capsys, local_ray):
    assert cli(run_args(tiny_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    for name in "AB":
        assert f"[{name} · turn 1]" in out and f"[{name} · turn 2]" in out
    # B's first turn reads the same document: all of its full blocks come from A's
    reused = [int(m) for m in re.findall(r"\[B · turn 1\][^\n]*\n[^\n]*\n\s*\((\d+) prompt tokens, (\d+) of them reused",
                                         out)[0]]
    assert reused[1] >= 2 * BLOCK, reused  # the system prompt and 120 document tokens fill 2 blocks
    rows = session_rows(out)
    assert set(rows) == {"A", "B"}
    assert int(rows["A"][3]) == 0 and int(rows["B"][3]) == reused[1]
    for row in rows.values():
        assert int(row[2]) == int(row[3]) + int(row[4])  # every token reused or computed
        assert re.fullmatch(r"[0-9a-z]+", row[0])  # the replica it ran on
    assert len(re.findall(r"^replica [0-9a-z]+ \(\d sessions\)", out, flags=re.MULTILINE)) == 2
    assert "saved; continue with: tiered run --resume" in out


def test_run_resumes_a_session_saved_by_the_cluster(tiny_dir, tmp_path, capsys, local_ray, monkeypatch):
    args = run_args(tiny_dir, tmp_path)
    args[args.index("--context-tokens") + 1] = "60"  # room for the follow-up in the tiny model's 256 positions
    options = tmp_path / "options.yaml"  # the cluster's options from the file, under the environment
    options.write_text("cluster:\n  workers: 2\n  max_sequences: 1\n")
    monkeypatch.setenv("TIERED_WORKERS", "1")
    assert cli(args + ["--sessions", "1", "--config", str(options)]) == 0
    out = capsys.readouterr().out
    assert "with 1 replicas" in out and len(re.findall(r"^replica [0-9a-z]+ \(", out, flags=re.MULTILINE)) == 1
    session_id = re.search(r"--resume (\w+)", out).group(1)
    serve.shutdown()
    ray.shutdown()
    held = len(list((tmp_path / "kv" / "blocks").rglob("*.blk")))
    assert held > 0  # sealed blocks outlived the run, in the shared directory
    assert cli(["run", "--model", str(tiny_dir), "--resume", session_id, "--disk-dir", str(tmp_path / "kv"),
                "--max-new-tokens", "3", "--device-mib", "1", "--host-mib", "1", "--disk-mib", "8"]) == 0
    out = capsys.readouterr().out
    tokens = int(re.search(rf"resuming session {session_id} \((\d+) tokens\)", out).group(1))
    row = session_rows(out)["A"]
    assert int(row[3]) == min(tokens // BLOCK * BLOCK, tokens - 1)  # every full block from the shared tier



def test_store_options_from_a_config_file_and_the_environment_under_the_options_given(tiny_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    config = tmp_path / "store.yaml"
    config.write_text("store:\n  device_bytes: 2MiB\n  host_bytes: 3MiB\n  disk_bytes: 16MiB\n")
    monkeypatch.setenv("TIERED_DISK_BYTES", "12MiB")  # over the file
    args = ["run", "--no-ray", "--model", str(tiny_dir), "--context-tokens", "60", "--max-new-tokens", "2",
            "--question", "Who?", "--config", str(config), "--host-mib", "1"]  # over both
    assert cli(args) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().split()[:1] in (["device"], ["host"], ["disk"])}
    assert [rows[tier][3] for tier in ("device", "host", "disk")] == ["2", "1", "12"]  # capacity, MiB
    config.write_text("store:\n  device_bytes: lots\n")
    assert cli(args) == 2
    assert "device_bytes" in capsys.readouterr().err
