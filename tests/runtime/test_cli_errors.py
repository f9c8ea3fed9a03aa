"""`tiered` answers bad input with one line on stderr and exit status 2, never a traceback.

The `test_run_refuses_*` group at the end waits for runtime/commands/run.py to use the validators
of runtime/commands/checks.py; every other test covers commands that already do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli import main
from runtime.commands import checks

from .tiny_models import write_hf_dir

TIERED = Path(sys.executable).parent / "tiered"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `tiered ARGV` run in this process."""
    capsys.readouterr()
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line(status: int, err: str, command: str, option: str) -> str:
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tiered {command}: error: " if command else "tiered: error: "), lines[0]
    assert option in lines[0] and "Traceback" not in err
    return lines[0]


# --- the validators ---------------------------------------------------------------------------


def test_integer_bounds_and_messages():
    assert checks.positive_int("3") == 3 and checks.non_negative_int("0") == 0
    assert checks.integer(2, 5)("5") == 5
    for parse, text, expected in [
        (checks.positive_int, "0", "an integer >= 1"),
        (checks.positive_int, "1.5", "an integer >= 1"),
        (checks.non_negative_int, "-1", "an integer >= 0"),
        (checks.integer(2, 5), "6", "an integer in [2, 5]"),
        (checks.integer(maximum=4), "9", "an integer <= 4"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError) as error:
            parse(text)
        assert str(error.value) == f"expected {expected}, got '{text}'"


def test_number_in_a_range():
    fraction = checks.number(0, 1, low_open=True)
    assert fraction("1") == 1.0 and fraction("0.25") == 0.25
    for text in ("0", "1.01", "nan", "inf", "half"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected a number in \(0, 1\]"):
            fraction(text)
    assert checks.number(0, 1, high_open=True)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 1\)"):
        checks.number(0, 1, high_open=True)("1")


def test_paths(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("hello")
    assert checks.readable_file(str(file)) == file
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        checks.readable_file(str(tmp_path / "missing.txt"))
    with pytest.raises(argparse.ArgumentTypeError, match="expected a file"):
        checks.readable_file(str(tmp_path))
    assert checks.existing_dir(str(tmp_path)) == tmp_path
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        checks.existing_dir(str(tmp_path / "missing"))
    with pytest.raises(argparse.ArgumentTypeError, match="is not a directory"):
        checks.existing_dir(str(file))
    assert checks.creatable_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # validators never create anything
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        checks.creatable_dir(str(file))
    with pytest.raises(argparse.ArgumentTypeError, match="not a writable directory"):
        checks.creatable_dir(str(file / "below"))


def test_names_codecs_and_models(tmp_path):
    assert checks.one_of({"lru": 1})("lru") == "lru"
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected one of \['lru'\], got 'mru'"):
        checks.one_of({"lru": 1})("mru")
    assert checks.codec("int4:g32") == "int4:g32"
    with pytest.raises(argparse.ArgumentTypeError):
        checks.codec("int3")
    assert checks.model("smollm2-135m") == "smollm2-135m" and checks.model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(argparse.ArgumentTypeError, match="no such file or directory"):
        checks.model(str(tmp_path / "model.gguf"))


# --- the commands that use them ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, option",
    [
        (["sessions", "/nonexistent/kv"], "DIR"),
        (["sessions"], "DIR"),
        (["inspect", "/nonexistent/kv"], "DIR"),
        (["simulate", "--synthetic", "--conversations", "0"], "--conversations"),
        (["simulate", "--synthetic", "--seed", "-1"], "--seed"),
        (["simulate", "--trace", "/nonexistent.jsonl"], "--trace"),
        (["simulate", "--synthetic", "--out", "/proc/version/out"], "--out"),
        (["simulate", "--synthetic", "--workers", "two"], "--workers"),
        (["experiment", "--synthetic", "--steps", "0"], "--steps"),
        (["experiment", "--synthetic", "--layers", "-2"], "--layers"),
        (["experiment", "--synthetic", "--block-tokens", "x"], "--block-tokens"),
        (["experiment", "--synthetic", "--sink-blocks", "-1"], "--sink-blocks"),
        (["experiment", "--synthetic", "--window-blocks", "1.5"], "--window-blocks"),
        (["experiment", "--synthetic", "--out", "/proc/version/out"], "--out"),
        (["experiment", "--capture", "--document", "/nonexistent.txt"], "--document"),
        (["experiment", "--capture", "--model", "/nonexistent/model.gguf"], "--model"),
        (["experiment", "--synthetic", "--budgets", "0.5,3"], "--budgets"),
    ],
)
def test_bad_options_get_one_line_naming_them(capsys, argv, option):
    status, out, err = cli(capsys, *argv)
    assert_one_line(status, err, argv[0], option)
    assert out == ""


def test_unknown_commands_and_options_get_one_line(capsys):
    status, _, err = cli(capsys, "serve-everything")
    assert_one_line(status, err, "", "invalid choice")
    status, _, err = cli(capsys, "sessions", ".", "--colour")
    assert_one_line(status, err, "", "unrecognized arguments: --colour")


def test_an_input_error_raised_after_parsing_is_one_line_naming_its_type(capsys, tmp_path):
    argv = ["experiment", "--synthetic", "--prompt-tokens", "1", "--out", str(tmp_path / "out")]
    status, _, err = cli(capsys, *argv)
    line = assert_one_line(status, err, "experiment", "ValueError: SyntheticConfig.observe_steps")
    assert "prompt_tokens" in line


def test_tiered_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TIERED_DEBUG", "1")
    with pytest.raises(ValueError, match="observe_steps"):
        main(["experiment", "--synthetic", "--prompt-tokens", "1", "--out", str(tmp_path / "out")])


def test_good_input_still_runs(capsys, tmp_path):
    status, out, err = cli(capsys, "sessions", str(tmp_path))
    assert status == 0 and f"no saved sessions in {tmp_path}" in out and err == ""


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    for argv, option in [(["sessions", str(tmp_path / "missing")], "DIR"),
                         (["simulate", "--synthetic", "--workers", "0"], "--workers")]:
        done = subprocess.run([str(TIERED), *argv], check=False, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TIERED_DEBUG": ""})
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert_one_line(done.returncode, done.stderr, argv[0], option)


# --- tiered run: these wait for run.py to use checks.py (see the module docstring) --------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-cli-errors")
    write_hf_dir(directory, "llama", seed=2)
    return directory


def run_argv(tiny_dir, *overrides: str) -> list[str]:
    """A small in-process `tiered run` on the tiny model; later options override earlier ones."""
    return ["run", "--no-ray", "--model", str(tiny_dir), "--context-tokens", "60", "--max-new-tokens", "2",
            "--question", "Who?", "--device-mib", "1", "--host-mib", "1", "--disk-mib", "8", *overrides]


def test_run_refuses_a_context_longer_than_the_model_holds(capsys):
    # SmolLM2-135M holds 8,192 tokens: refused before any work (no model load, no prefill)
    status, out, err = cli(capsys, "run", "--no-ray", "--context-tokens", "100000", "--max-new-tokens", "1",
                           "--question", "Who?")
    line = assert_one_line(status, err, "run", "--context-tokens")
    assert "8192" in line.replace(",", "")
    assert out == ""


@pytest.mark.parametrize(
    "overrides, option",
    [
        (["--device-mib", "0"], "--device-mib"),
        (["--host-mib", "-1"], "--host-mib"),
        (["--disk-mib", "0"], "--disk-mib"),
        (["--document", "/nonexistent"], "--document"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--chunk-tokens", "0"], "--chunk-tokens"),
        (["--context-tokens", "0"], "--context-tokens"),
        (["--budget-tokens", "0", "--mode", "sparse"], "--budget-tokens"),
        (["--importance", "magic"], "--importance"),
        (["--prefetch", "eager"], "--prefetch"),
        (["--eviction", "mru"], "--eviction"),
        (["--model", "/nonexistent/model.gguf"], "--model"),
        (["--disk-dir", "/proc/version/kv"], "--disk-dir"),
    ],
)
def test_run_refuses_bad_options_before_any_work(tiny_dir, capsys, overrides, option):
    status, out, err = cli(capsys, *run_argv(tiny_dir, *overrides))
    assert_one_line(status, err, "run", option)
    assert out == ""


def test_run_refuses_bad_input_from_the_installed_command(tmp_path):
    done = subprocess.run([str(TIERED), "run", "--no-ray", "--device-mib", "0"], check=False, capture_output=True,
                          text=True, timeout=300)
    assert_one_line(done.returncode, done.stderr, "run", "--device-mib")


@pytest.mark.parametrize("content, env, option, words", [
    ("store:\n  block_tokens: two\n", {}, "--config", "StoreConfig.block_tokens must be int, got 'two'"),
    ("cluster:\n  workers: two\n", {}, "--config", "Cluster: workers must be int, got 'two'"),
    ("cluster:\n  replicas: 2\n", {}, "--config", "unknown options ['replicas']"),
    (None, {"TIERED_MAX_SEQUENCES": "0"}, "TIERED_* variables", "Cluster: max_sequences must be > 0, got 0"),
    (None, {"TIERED_DISK_ZSTD_LEVEL": "30"}, "TIERED_* variables", "StoreConfig.disk_zstd_level must be in [1, 22], got 30"),
])
def test_run_refuses_bad_options_of_the_file_and_the_environment_before_any_work(
        tiny_dir, capsys, monkeypatch, tmp_path, content, env, option, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = run_argv(tiny_dir)
    argv.remove("--no-ray")  # on the cluster, whose options are checked before Ray starts
    if content is not None:
        (tmp_path / "options.yaml").write_text(content)
        argv += ["--config", str(tmp_path / "options.yaml")]
    status, out, err = cli(capsys, *argv)
    line = assert_one_line(status, err, "run", option)
    assert words in line and out == ""
