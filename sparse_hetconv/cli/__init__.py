"""The ``sparse-hetconv`` command line: one subcommand per job.

Each subcommand lives in its own module with ``add_parser(subparsers)`` that registers it and
sets ``func`` (called with the parsed arguments, returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define subcommands; each has add_parser(subparsers).
_COMMANDS = ["sparse_hetconv.cli.demo", "sparse_hetconv.cli.train", "sparse_hetconv.cli.convert",
             "sparse_hetconv.cli.bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-hetconv", description="HetConv layers for PyTorch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"sparse-hetconv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
