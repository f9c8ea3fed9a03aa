"""Subcommands of `tiered`, by name. Each module has `register(add_parser, name)`, which adds its
parser and sets `func` to a function taking the parsed arguments and returning an exit code."""

from __future__ import annotations

from collections.abc import Callable

from . import experiment, inspect, run, serve, sessions, simulate

COMMANDS: dict[str, Callable] = {
    "run": run.register,
    "experiment": experiment.register,
    "inspect": inspect.register,
    "sessions": sessions.register,
    "simulate": simulate.register,
    "serve": serve.register,
}
