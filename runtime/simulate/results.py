"""Results of a sweep: results.csv (one row per configuration) and a summary table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

SUMMARY = (
    ("workers", "workers", "{}"),
    ("device_blocks", "device", "{}"),
    ("host_blocks", "host", "{}"),
    ("disk_blocks", "disk", "{}"),
    ("eviction", "eviction", "{}"),
    ("write", "write", "{}"),
    ("routing", "routing", "{}"),
    ("profile", "profile", "{}"),
    ("hit_ratio", "hit ratio", "{:.4f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
    ("queue_mean_s", "queue mean s", "{:.3f}"),
)


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """Write `rows` (dicts with the same keys, in order) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    """Rows of a results.csv, numbers as int or float."""
    with Path(path).open(newline="") as file:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(file)]


def print_summary(rows: Sequence[dict], console: Console | None = None) -> None:
    """A table of the columns that matter most, one line per configuration."""
    options = {key for key, _, _ in SUMMARY[:8]}
    varying = {key for key in options if len({row[key] for row in rows}) > 1}
    table = Table(title=f"{len(rows)} configuration(s), {rows[0]['requests']} requests")
    columns = [(k, title, fmt) for k, title, fmt in SUMMARY if k in varying or k not in options]
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*(fmt.format(row[key]) for key, _, fmt in columns))
    (console or Console()).print(table)


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
