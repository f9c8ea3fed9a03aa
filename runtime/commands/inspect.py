"""`tiered inspect DIR [--verify]`: list a disk tier directory; with --verify, check every checksum.

The listing and verifying is tiered.disk.inspect_dir; this only formats it. Read-only: it may
run while a store has the directory open. Exit code 0, 1 when --verify found damage, 2 when DIR
is not a disk tier directory (checked here, not by argparse, so that main returns the code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tiered.disk import inspect_dir


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="list (and --verify) a disk tier directory")
    parser.add_argument("directory", type=Path, metavar="DIR", help="the disk tier directory (StoreConfig.disk_dir)")
    parser.add_argument("--verify", action="store_true", help="check every record's payload checksum too")
    parser.set_defaults(func=main)


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"


def main(args: argparse.Namespace) -> int:
    try:
        report = inspect_dir(args.directory, verify=args.verify)
    except ValueError as err:
        print(f"tiered inspect: error: argument DIR: {err}", file=sys.stderr)
        return 2
    ident = report.identity
    print(f"{report.directory}: format ok; fingerprint {ident.fingerprint or '(none)'!r}, "
          f"block_tokens {ident.block_tokens}, codec {ident.codec}, dtype {ident.dtype or '(not fixed yet)'}")
    print(f"index snapshot: {report.snapshot}")
    print(f"{'segment':<20} {'bytes':>12} {'live':>7} {'dead':>7} {'damaged':>8} {'live MiB':>9} {'ratio':>6}")
    for s in report.segments:
        ratio = s.live_logical_bytes / s.live_stored_bytes if s.live_stored_bytes else None
        note = "" if s.header_ok else "  (segment header damaged)"
        print(f"{s.file:<20} {s.file_bytes:>12} {s.live_records:>7} {s.dead_records:>7} {len(s.damaged):>8} "
              f"{s.live_logical_bytes / 2**20:>9.2f} {_ratio(ratio):>6}{note}")
    damaged = report.damaged
    print(f"total: {len(report.segments)} segments, {report.file_bytes} bytes, {report.live_records} live and "
          f"{report.dead_records} dead records, {len(damaged)} damaged; compression ratio "
          f"{_ratio(report.compression_ratio)} (live payloads)")
    for d in damaged:
        key = "" if d.key is None else f" ({d.key.namespace!r}, layer {d.key.layer}, index {d.key.index})"
        print(f"damaged: {d.file} offset {d.offset}, {d.length} bytes: {d.reason}{key}")
    if args.verify:
        print("verify: every checksum matches" if not damaged else f"verify: {len(damaged)} damaged stretches found")
        return 1 if damaged else 0
    return 0
