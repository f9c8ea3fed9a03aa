"""Argument types the subcommands share."""

from __future__ import annotations

import argparse


def names(registry: dict):
    """An argparse type: comma-separated names, each a key of `registry`."""

    def parse(text: str) -> tuple[str, ...]:
        found = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in found if n not in registry]
        if unknown or not found:
            raise argparse.ArgumentTypeError(f"unknown names {unknown or [text]}; valid names: {sorted(registry)}")
        return found

    return parse
