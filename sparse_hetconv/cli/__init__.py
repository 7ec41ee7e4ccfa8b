"""The ``sparse-hetconv`` command line: one subcommand per job.

Each subcommand lives in its own module with ``add_parser(subparsers)`` that registers it and
sets ``func`` (called with the parsed arguments, returning an exit status).

A user's mistake or the environment never shows a traceback: a bad argument, a missing, existing
or unwritable file, a full disk are one line ``sparse-hetconv CMD: error: FILE: reason`` and exit
status 2; Ctrl-C is exit status 130, quietly. Warnings are one line ``sparse-hetconv CMD:
warning: ...``. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import warnings

from .._checks import MissingExtraError

__all__ = ["build_parser", "describe_error", "main", "nonnegative_float", "nonnegative_int", "positive_float",
           "positive_int"]

# Modules that define subcommands; each has add_parser(subparsers).
_COMMANDS = ["sparse_hetconv.cli.demo", "sparse_hetconv.cli.train", "sparse_hetconv.cli.convert",
             "sparse_hetconv.cli.export"]
# What a user's input or the environment raises: reported in one line. OSError covers the
# file system (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, a full disk).
_USER_ERRORS = (ValueError, TypeError, OSError, MissingExtraError)  # an optional dependency that is not installed
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid <name> value" messages
    return parse


#: argparse types: an int >= 1 and an int >= 0, refused by the parser (exit status 2) otherwise.
positive_int = _integer(1)
nonnegative_int = _integer(0)


def _number(strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} 0, got {text}")
        return value

    parse.__name__ = "number"
    return parse


#: argparse types: a finite float > 0 and a finite float >= 0.
positive_float = _number(strict=True)
nonnegative_float = _number(strict=False)


def build_parser() -> argparse.ArgumentParser:
    import platform

    import torch

    from .. import __version__

    parser = argparse.ArgumentParser(prog="sparse-hetconv", description="HetConv layers for PyTorch")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (torch {torch.__version__}, "
                        f"Python {platform.python_version()})")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def describe_error(error: BaseException) -> str:
    """One line for an error: ``FILE: reason`` for a file system error that names its file, the
    message otherwise."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = os.fsdecode(error.filename)
        if error.filename2 is not None:
            where += f" -> {os.fsdecode(error.filename2)}"
        return f"{where}: {error.strerror}"
    text = " ".join(str(error).split())  # one line, whatever the message held
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for an error, 130 for Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage error (status 2) or the help (0)
        return stop.code if isinstance(stop.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    prefix = f"sparse-hetconv {args.command}"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # the reader of stdout went away (``| head``): nothing left to tell
            _silence_stdout()
            return EXIT_ERROR
        except MemoryError:
            print(f"{prefix}: error: out of memory", file=sys.stderr)
            return EXIT_ERROR
        except _USER_ERRORS as error:
            print(f"{prefix}: error: {describe_error(error)}", file=sys.stderr)
            return EXIT_ERROR


def _silence_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush does not fail too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
