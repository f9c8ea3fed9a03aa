"""How benchmarks report repeated runs: the median, with the range of the runs beside it."""

from __future__ import annotations

import statistics


def spread(values: list[float], form: str = "{:.2f}") -> str:
    """The median of `values`, with their range when there are several: "1.50 (1.20-1.90)"."""
    median = form.format(statistics.median(values))
    return median if len(values) == 1 else f"{median} ({form.format(min(values))}-{form.format(max(values))})"
