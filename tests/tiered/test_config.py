"""StoreConfig's one configuration system: pydantic-checked options, a YAML file, TIERED_* variables,
errors naming option, value and expectation, and docs/CONFIG.md generated from the declarations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tiered import StoreConfig
from tiered.config import GiB, MiB, reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        ({"device_bytes": True}, TypeError, r"StoreConfig\.device_bytes must be int, got True \(bool\)"),
        ({"layers": 2.0}, TypeError, r"StoreConfig\.layers must be int or None, got 2\.0 \(float\)"),
        ({"layers": 0}, ValueError, r"StoreConfig\.layers must be > 0 \(or None\), got 0"),
        ({"disk_dir": 3}, TypeError, r"StoreConfig\.disk_dir must be a path or None, got 3 \(int\)"),
        ({"disk_zstd_level": 23}, ValueError, r"StoreConfig\.disk_zstd_level must be in \[1, 22\], got 23"),
        ({"disk_zstd_threads": -1}, ValueError, r"StoreConfig\.disk_zstd_threads must be >= 0, got -1"),
        ({"disk_compact_live_fraction": 1}, ValueError, r"must be in \[0, 1\), got 1"),
        ({"disk_compact_live_fraction": "half"}, TypeError, r"must be a number, got 'half' \(str\)"),
        ({"disk_durability": "always"}, ValueError, r"must be one of \['record', 'segment', 'never'\], got 'always'"),
        ({"fingerprint": "a\nb"}, ValueError, "fingerprint must be printable"),
        ({"block_tokens": "2"}, TypeError, r"block_tokens must be int, got '2' \(str\)"),  # never coerced
    ],
)
def test_bad_options_name_the_option_the_value_and_the_expectation(overrides, error, words):
    with pytest.raises(error, match=words):
        StoreConfig(device="cpu", **overrides)


def test_replace_checks_again_and_keeps_values_as_given(tmp_path):
    config = StoreConfig(device="cpu", disk_dir=tmp_path, disk_compact_live_fraction=0)
    assert config.disk_dir is tmp_path and type(config.disk_compact_live_fraction) is int  # nothing converted
    assert dataclasses.replace(config, host_bytes=2 * MiB).host_bytes == 2 * MiB
    with pytest.raises(ValueError, match="host_bytes must be > 0"):
        dataclasses.replace(config, host_bytes=0)


def test_load_from_yaml_then_environment_then_arguments(tmp_path):
    path = tmp_path / "tiered.yaml"
    path.write_text("store:\n  device: cpu\n  host_bytes: 512MiB\n  disk_dir: /tmp/kv\n  disk_codec: int8\n"
                    "  eviction_kwargs: {}\n  disk_write: back\n")
    env = {"TIERED_HOST_BYTES": "2 GiB", "TIERED_DISK_ZSTD_LEVEL": "3", "TIERED_LAYERS": "30",
           "TIERED_DISK_COMPACT_LIVE_FRACTION": "0.25", "TIERED_SHARED_DIR": "", "TIERED_FINGERPRINT": "123",
           "UNRELATED": "x"}
    config = StoreConfig.load(path, env=env, block_tokens=32)
    assert config.host_bytes == 2 * GiB  # the environment overrides the file
    assert (config.disk_dir, config.disk_codec, config.disk_write) == ("/tmp/kv", "int8", "back")
    assert (config.disk_zstd_level, config.layers, config.disk_compact_live_fraction) == (3, 30, 0.25)
    assert config.shared_dir is None and config.fingerprint == "123"  # text options stay text
    assert config.block_tokens == 32 and config.device_bytes == StoreConfig(device="cpu").device_bytes
    flat = tmp_path / "flat.yaml"
    flat.write_text("device: cpu\ndisk_bytes: 8GiB\n")
    assert StoreConfig.load(flat, env={}).disk_bytes == 8 * GiB
    assert StoreConfig.load(env={"TIERED_DEVICE": "cpu"}).device == "cpu"


def test_load_refuses_bad_files_and_variables(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("device: cpu\nhost_byte: 1024\n")
    with pytest.raises(ValueError, match=r"bad\.yaml \(StoreConfig\): unknown options \['host_byte'\]; valid options"):
        StoreConfig.load(path, env={})
    path.write_text("device: cpu\nhost_bytes: lots\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: host_bytes: StoreConfig\.host_bytes must be a size such as"):
        StoreConfig.load(path, env={})
    path.write_text("- device\n")
    with pytest.raises(ValueError, match="expected a mapping of options, got list"):
        StoreConfig.load(path, env={})
    path.write_text("device: [cpu\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        StoreConfig.load(path, env={})
    with pytest.raises(ValueError, match=r"TIERED_DEVICE_BYTES: StoreConfig\.device_bytes must be a size"):
        StoreConfig.load(env={"TIERED_DEVICE": "cpu", "TIERED_DEVICE_BYTES": "huge"})
    with pytest.raises(TypeError, match=r"StoreConfig\.disk_zstd_threads must be int, got 1\.5"):
        StoreConfig.load(env={"TIERED_DEVICE": "cpu", "TIERED_DISK_ZSTD_THREADS": "1.5"})
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        StoreConfig.load(env={"TIERED_DEVICE": "cpu", "TIERED_HOST_CODEC": "zip"})


def test_docs_config_is_generated_from_the_declarations():
    table = reference()
    assert (ROOT / "docs" / "CONFIG.md").read_text().startswith(table), "regenerate docs/CONFIG.md: python -m runtime.config_doc"
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [f.name for f in dataclasses.fields(StoreConfig)]
    units = {row.split("`")[1]: row.split(" | ")[4] for row in rows}
    assert units["host_bytes"] == units["shared_bytes"] == "bytes" and units["block_tokens"] == "tokens"
    assert all(f.metadata["doc"] for f in dataclasses.fields(StoreConfig))
