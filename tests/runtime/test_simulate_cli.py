"""`tiered simulate` as a user runs it: results.csv, plots, sweeps, and one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli import main
from runtime.simulate import load_profile, read_trace, shipped_profiles

from .test_simulate import reference_hit_ratio

DATA = Path(__file__).parent.parent / "data"
HEAD = DATA / "mooncake_conversation_head.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiered(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "simulate", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def in_process(capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of `tiered simulate ARGS` run in this process."""
    capsys.readouterr()
    try:
        status = main(["simulate", *args])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def read_rows(path: Path) -> list[dict]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_one_worker_one_tier_is_lru_of_that_capacity(tmp_path):
    done = tiered(
        "--trace", str(HEAD), "--workers", "1", "--device-blocks", "300", "--host-blocks", "0",
        "--disk-blocks", "0", "--eviction", "lru", "--out", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 1
    expected = reference_hit_ratio(read_trace(HEAD), "lru", 300)
    assert 0 < expected < 1
    assert float(rows[0]["hit_ratio"]) == pytest.approx(expected, abs=1e-12)
    assert "hit ratio" in done.stdout and "results.csv" in done.stdout


def test_a_sweep_writes_a_row_per_combination_and_the_plots(tmp_path):
    done = tiered(
        "--trace", str(HEAD), "--workers", "2", "--device-blocks", "100", "--host-blocks", "0,200,800",
        "--eviction", "lru,arc", "--profile", "h100-pcie5,h200-nvlink-c2c", "--routing", "round-robin",
        "--out", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 3 * 2 * 2
    combos = {(r["host_blocks"], r["eviction"], r["profile"]) for r in rows}
    assert len(combos) == 12
    for row in rows:
        assert 0 <= float(row["hit_ratio"]) <= 1
        assert float(row["ttft_p50_s"]) <= float(row["ttft_p90_s"]) <= float(row["ttft_p99_s"])
        for column in ("tokens_recomputed", "host_to_device_bytes", "device_to_host_bytes", "queue_p99_s"):
            assert column in row
    by = {(r["host_blocks"], r["eviction"], r["profile"]): float(r["hit_ratio"]) for r in rows}
    assert by[("800", "lru", "h100-pcie5")] > by[("0", "lru", "h100-pcie5")]
    # with routing blind to load, the hardware changes time only
    assert by[("800", "lru", "h100-pcie5")] == by[("800", "lru", "h200-nvlink-c2c")]
    for name in ("hit_ratio.png", "ttft.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_synthetic_trace_is_saved_and_simulated(tmp_path):
    done = tiered("--synthetic", "--conversations", "20", "--device-blocks", "64", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trace = read_trace(tmp_path / "trace.jsonl")
    rows = read_rows(tmp_path / "results.csv")
    assert int(rows[0]["requests"]) == len(trace.requests) >= 20
    assert float(rows[0]["hit_ratio"]) > 0.2


@pytest.mark.parametrize(
    "args, option",
    [
        (["--device-blocks", "-3"], "--device-blocks"),
        (["--device-blocks", "many"], "--device-blocks"),
        (["--workers", "0"], "--workers"),
        (["--eviction", "lru,random"], "--eviction"),
        (["--write", "write-around"], "--write"),
        (["--routing", "sticky"], "--routing"),
        (["--profile", "tpu-v9"], "--profile"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_bad_options_get_one_line_and_status_2(tmp_path, capsys, args, option):
    status, stderr = in_process(capsys, "--trace", str(HEAD), *args, "--out", str(tmp_path))
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert option in stderr and "Traceback" not in stderr


def test_bad_traces_get_one_line_naming_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = {"timestamp": 5, "input_length": 600, "output_length": 1, "hash_ids": [1, 2]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "timestamp": 1}) + "\n")
    status, stderr = in_process(capsys, "--trace", str(bad), "--out", str(tmp_path))
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert "bad.jsonl:2:" in stderr and "earlier" in stderr
    status, stderr = in_process(capsys, "--trace", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path))
    assert status == 2 and "no such file" in stderr
    status, stderr = in_process(capsys, "--device-blocks", "4", "--out", str(tmp_path))
    assert status == 2 and "--trace" in stderr
    assert not (tmp_path / "results.csv").exists()


def test_shipped_profiles_load():
    names = set(shipped_profiles())
    assert {"h100-pcie5", "h200-nvlink-c2c", "cpu-local"} <= names
    for name in names:
        profile = load_profile(name)
        assert profile.prefill_s_per_token > 0 and profile.block_bytes(512) == 512 * profile.kv_bytes_per_token
    h100, h200 = load_profile("h100-pcie5"), load_profile("h200-nvlink-c2c")
    assert h200.links["host_device"].bytes_per_s > h100.links["host_device"].bytes_per_s


def test_bad_profiles_say_what_is_wrong(tmp_path):
    path = tmp_path / "p.yaml"
    text = load_profile("h100-pcie5").to_yaml()
    path.write_text(text)
    assert load_profile(str(path)) == load_profile("h100-pcie5")
    path.write_text(text.replace("kv_bytes_per_token: 131072", "kv_bytes_per_token: -1"))
    with pytest.raises(ValueError, match="kv_bytes_per_token must be a positive int"):
        load_profile(str(path))
    path.write_text(text.replace("  disk:", "  floppy:"))
    with pytest.raises(ValueError, match=r"missing link\(s\) \['disk'\]"):
        load_profile(str(path))
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        load_profile("nope")
