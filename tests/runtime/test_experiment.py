"""`tiered experiment`: run for real, as a user would, on a small synthetic trace in a fresh directory."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from policies import IMPORTANCE, PREFETCH
from policies.trace.replay import COLUMNS
from runtime.cli import main
from runtime.traces import load_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--layers", "2", "--prompt-tokens", "256", "--steps", "12", "--budgets", "0.25,0.5"]


def tiered(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "experiment", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def read_csv(path) -> list[dict]:
    with path.open() as file:
        return list(csv.DictReader(file))


def check_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = imread(path).shape
    assert height > 200 and width > 400


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    done = tiered("--synthetic", "--out", str(out / "results"), *SMALL, cwd=out)
    assert done.returncode == 0, done.stderr
    return out / "results", done


def test_synthetic_writes_a_csv_plots_and_its_trace(synthetic_run):
    out, done = synthetic_run
    rows = read_csv(out / "results.csv")
    assert tuple(rows[0]) == COLUMNS
    assert {(r["importance"], r["prefetch"], float(r["budget"])) for r in rows} == {
        (i, p, b) for i in IMPORTANCE for p in PREFETCH for b in (0.25, 0.5)
    }
    oracle = [r for r in rows if r["importance"] == "oracle"]
    assert all(float(r["topk_recall"]) == 1.0 for r in oracle)
    check_png(out / "recall.png")
    check_png(out / "prefetch.png")
    trace = load_trace(out / "trace.npz")
    assert trace.layers == 2 and trace.steps - trace.observe_steps == 12
    assert "attention-mass recall" in done.stdout and "wrote" in done.stdout


def test_replaying_the_saved_trace_gives_the_same_results(synthetic_run, tmp_path):
    out, _ = synthetic_run
    done = tiered("--trace", str(out / "trace.npz"), "--out", str(tmp_path), "--budgets", "0.25,0.5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_csv(tmp_path / "results.csv") == read_csv(out / "results.csv")
    check_png(tmp_path / "recall.png")


def test_policy_subsets(tmp_path):
    out = tmp_path / "sub"
    args = ["--synthetic", "--out", str(out), "--importance", "quest,recency", "--prefetch", "none", *SMALL]
    assert main(["experiment", *args]) == 0
    assert {(r["importance"], r["prefetch"]) for r in read_csv(out / "results.csv")} == {
        ("quest", "none"),
        ("recency", "none"),
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--synthetic", "--importance", "quest,magic"], "valid names"),
        (["--synthetic", "--prefetch", "eager"], "valid names"),
        (["--synthetic", "--budgets", "0.25,2"], "fractions in"),
        (["--synthetic", "--trace", "x.npz"], "not allowed with"),
        ([], "one of the arguments --trace --synthetic --capture is required"),
    ],
)
def test_bad_arguments_exit_with_a_usage_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["experiment", *args])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_trace_file_is_refused(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"nope")
    for name, message in [("bad.npz", "not a readable trace file"), ("missing.npz", "no trace file")]:
        assert main(["experiment", "--trace", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
