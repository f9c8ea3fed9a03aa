"""Checking the command line's input before any work: argparse `type=` validators, a parser whose
errors are one line, and the error a command raises for input that only it can judge.

A validator returns the parsed value or raises argparse.ArgumentTypeError saying what was expected
and what it got; argparse prefixes the option, so a user reads one line such as
`tiered run: error: argument --device-mib: expected an integer >= 1, got '0'` and status 2.
Validators only look: they never create, open for writing or delete anything.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), then status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class UsageError(ValueError):
    """Bad input that no single option's validator can see (it depends on several, or on the model):
    `runtime.cli.main` prints it as argparse prints a bad option, and exits with status 2."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")
        self.option = option


def integer(minimum: int | None = None, maximum: int | None = None):
    """A validator of an int in [minimum, maximum] (either bound may be None: unbounded)."""
    if minimum is not None and maximum is not None:
        expected = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    elif maximum is not None:
        expected = f"an integer <= {maximum}"
    else:
        expected = "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = integer(minimum=1)
non_negative_int = integer(minimum=0)


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """A validator of a finite float between low and high; `*_open` excludes that end."""
    expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def readable_file(text: str) -> Path:
    """An existing file this process may read."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text!r} (expected an existing file)")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"expected a file, but {text!r} is a directory or a special file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"expected a readable file, but {text!r} may not be read (permissions)")
    return path


def existing_dir(text: str) -> Path:
    """An existing directory this process may read."""
    path = Path(text).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"expected an existing directory, but {text!r} {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"expected a readable directory, but {text!r} may not be read (permissions)")
    return path


def creatable_dir(text: str) -> Path:
    """A directory that exists and is writable, or that can be created: its nearest existing
    ancestor is a writable directory. Nothing is created here."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"expected a directory, but {text!r} is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"expected a writable directory, but {text!r} may not be written (permissions)")
        return path
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"expected a directory that can be created, but {str(ancestor)!r} "
                                         f"is not a writable directory")
    return path


def codec(spec: str) -> str:
    """A codec name or spec that tiered.make_codec accepts, such as int8 or int4:g32."""
    from tiered import make_codec

    try:
        make_codec(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def model(text: str) -> str:
    """A registered model name, or the path of an existing .gguf file or Hugging Face directory.
    Returns the text unchanged; a registered name's file is looked for only when the model loads."""
    from ..model.load import MODELS

    if text in MODELS:
        return text
    path = Path(text).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return text
    what = "no such file or directory" if not path.exists() else "neither a .gguf file nor a directory"
    raise argparse.ArgumentTypeError(f"expected one of {sorted(MODELS)}, a .gguf file or a Hugging Face "
                                     f"model directory, got {text!r} ({what})")


def one_of(registry):
    """A validator of one name among `registry`'s keys (a policy registry, a dict of models, ...)."""

    def parse(text: str) -> str:
        if text not in registry:
            raise argparse.ArgumentTypeError(f"expected one of {sorted(registry)}, got {text!r}")
        return text

    parse.__name__ = "one_of"
    return parse
