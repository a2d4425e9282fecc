"""The engine CLI: python -m engine {generate, train, eval, build-data, convert-openflamingo}.

Each subcommand lives in engine/commands/<name>.py with `add_parser(subparsers) -> parser`
and `run(args) -> int`. Exit codes: 0 ok, 2 a user's mistake (bad argument or input, reported on
stderr without a traceback), 1 an internal failure.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("generate", "train", "eval", "build_data", "convert_openflamingo")


class UserError(Exception):
    """A mistake in the user's arguments or input: printed, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Flamingo engine: generate, train, evaluate, build data, convert checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"engine.commands.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
