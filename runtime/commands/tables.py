"""Printing the commands' tables with rich: at least 120 columns wide, so piped output is not cut."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

MIN_WIDTH = 120


def print_table(table: Table) -> None:
    console = Console()
    if console.width < MIN_WIDTH:
        console = Console(width=MIN_WIDTH)
    console.print(table)
