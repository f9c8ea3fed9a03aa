"""Plots of a sweep: hit ratio against a capacity per eviction policy, TTFT against host-tier size
per profile. Each is drawn only when the sweep varies what its x axis needs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CAPACITIES = ("device_blocks", "host_blocks", "disk_blocks")
CONFIG_KEYS = ("workers", "device_blocks", "host_blocks", "disk_blocks", "eviction", "write", "routing", "profile")


def swept(rows: Sequence[dict], key: str) -> bool:
    return len({row[key] for row in rows}) > 1


def plot_hit_ratio(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """Hit ratio against the swept capacity (host, else device, else disk), a line per policy
    and per any other option the sweep varies."""
    x_key = next((k for k in ("host_blocks", "device_blocks", "disk_blocks") if swept(rows, k)), None)
    if x_key is None:
        return None
    return _lines(rows, path, x_key, [("hit_ratio", "-", "")], "hit ratio", title)


def plot_ttft(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """TTFT p50 (solid) and p99 (dashed) against the host-tier size, a line per profile and per
    any other option the sweep varies."""
    if not swept(rows, "host_blocks"):
        return None
    series = [("ttft_p50_s", "-", " p50"), ("ttft_p99_s", "--", " p99")]
    return _lines(rows, path, "host_blocks", series, "time to first token (s)", title, log_y=True)


def _lines(rows, path, x_key, series, y_label, title, log_y=False) -> Path:
    others = [k for k in CONFIG_KEYS if k != x_key and swept(rows, k)]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in others)].append(row)
    fig, ax = plt.subplots(figsize=(8, 5))
    for group, members in groups.items():
        members = sorted(members, key=lambda r: r[x_key])
        label = ", ".join(f"{v}" for v in group) or "all"
        color = None
        for column, style, suffix in series:
            (line,) = ax.plot(
                [r[x_key] for r in members], [r[column] for r in members], style, marker="o", color=color,
                label=label + suffix,
            )
            color = line.get_color()
    ax.set_xlabel(f"{x_key.replace('_', ' ')} per {'worker' if x_key != 'disk_blocks' else 'cluster'}")
    ax.set_ylabel(y_label)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=", ".join(others) or None, title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_write(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """Bytes written down (device to host, and to the shared tier) against hit ratio, a line per
    write policy over the other options the sweep varies."""
    if not swept(rows, "write"):
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["write"]].append(row)
    for name, members in groups.items():
        members = sorted(members, key=lambda r: r["hit_ratio"])
        written = [(r["device_to_host_bytes"] + r["disk_write_bytes"]) / 2**40 for r in members]
        ax.plot(written, [r["hit_ratio"] for r in members], "-", marker="o", label=name)
        for x, r in zip(written, members):  # each point names the capacities it was run with
            ax.annotate(f"host {r['host_blocks']}", (x, r["hit_ratio"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    ax.set_xlabel("bytes written to lower tiers (TiB)")
    ax.set_ylabel("hit ratio")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
