"""`tiered sessions DIR`: the sessions saved in a disk tier directory (`tiered run --resume ID` continues one)."""

from __future__ import annotations

import argparse
import time

from rich.table import Table

from .. import saved
from .checks import existing_dir
from .tables import print_table


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="list the sessions saved in a disk tier directory")
    parser.add_argument("directory", type=existing_dir, metavar="DIR", help="the disk tier directory (StoreConfig.disk_dir)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    records = saved.listing(args.directory)
    if not records:
        print(f"no saved sessions in {args.directory}")
        return 0
    table = Table(box=None, header_style="bold")
    table.add_column("session", no_wrap=True, min_width=max(len(record.session_id) for record in records))
    for column in ("tokens", "mode", "saved", "model"):
        table.add_column(column, justify="right" if column == "tokens" else "left", no_wrap=True)
    for record in records:
        summary = record.summary()
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["saved_at_s"]))
        table.add_row(summary["session_id"], str(summary["tokens"]), summary["mode"], when, summary["fingerprint"][:12])
    print_table(table)
    return 0
