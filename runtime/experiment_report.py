"""Experiment results on disk: the replay's rows as CSV, and PNG plots drawn with matplotlib (Agg).

Plots are drawn on a matplotlib Figure with the Agg canvas directly, so no pyplot state or
display backend is touched.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from policies.trace.replay import COLUMNS


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """One line per row, with the replay's COLUMNS in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({name: row[name] for name in COLUMNS})
    return path


def plot_recall(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Attention-mass recall and top-k recall against the budget, one line per estimator."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    prefetch = rows[0]["prefetch"]  # recall does not depend on the prefetch policy
    for axes, metric, label in zip(
        fig.subplots(1, 2), ("mass_recall", "topk_recall"), ("attention-mass recall", "top-k recall")
    ):
        for name in _unique(r["importance"] for r in rows):
            points = sorted(
                (r["budget"], r[metric]) for r in rows if r["importance"] == name and r["prefetch"] == prefetch
            )
            axes.plot([100 * b for b, _ in points], [v for _, v in points], marker="o", label=name)
        axes.set(xlabel="budget (% of context tokens)", ylabel=label, ylim=(0, 1.02))
        axes.grid(alpha=0.3)
        axes.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_prefetch(rows: Sequence[dict], path: str | Path, importance: str, title: str) -> Path:
    """Prefetch hit rate and bytes moved against the budget, one line per prefetch policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    hit_axes, bytes_axes = fig.subplots(1, 2)
    for name in _unique(r["prefetch"] for r in rows):
        points = sorted(
            (r["budget"], r["hit_rate"], r["bytes_moved"])
            for r in rows
            if r["prefetch"] == name and r["importance"] == importance
        )
        budgets = [100 * b for b, _, _ in points]
        hit_axes.plot(budgets, [h for _, h, _ in points], marker="o", label=name)
        bytes_axes.plot(budgets, [m / 2**20 for _, _, m in points], marker="o", label=name)
    hit_axes.set(xlabel="budget (% of context tokens)", ylabel="hit rate (needed blocks already up)")
    hit_axes.set_ylim(top=1.005)
    bytes_axes.set(xlabel="budget (% of context tokens)", ylabel="MiB moved to the device")
    for axes in (hit_axes, bytes_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    fig.suptitle(f"{title} — blocks chosen by {importance}")
    fig.savefig(path, dpi=110)
    return Path(path)


def _unique(values) -> list:
    return list(dict.fromkeys(values))
