"""`tiered` command line: one subcommand per module in runtime/commands.

Bad input never ends in a traceback: options are checked as they are parsed (runtime/commands/checks.py)
and a bad one is one line on stderr and exit status 2. A ValueError, FileNotFoundError or
PermissionError that a command raises later (what the code says about input it was given) is one
line too, naming the error's type, with status 2; TIERED_DEBUG=1 shows its traceback. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from .commands import COMMANDS
from .commands.checks import Parser, UsageError

INPUT_ERRORS = (ValueError, FileNotFoundError, PermissionError)


def build_parser() -> Parser:
    parser = Parser(prog="tiered", description="A tiered KV cache runtime for LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, register in COMMANDS.items():
        register(subparsers.add_parser, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"tiered {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
    except INPUT_ERRORS as err:
        if os.environ.get("TIERED_DEBUG"):
            raise
        message = " ".join(str(err).split()) or "(no message)"
        print(f"{prog}: error: {type(err).__name__}: {message}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
