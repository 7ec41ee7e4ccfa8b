"""``python -m sparse_hetconv.backends --build``: compile the fused backend's CPU kernels ahead of
first use (``make install`` does it once; without a C++ compiler the stock backends serve).

A package ``__main__`` rather than ``python -m sparse_hetconv.backends.fused``: the package imports
``fused`` itself, and running an already-imported module as ``__main__`` executes it twice."""

from __future__ import annotations

import argparse

from . import _cpu_build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_hetconv.backends",
                                     description="Build the fused backend's CPU kernels ahead of first use.")
    parser.add_argument("--build", action="store_true", help="compile (or find) the kernels and say where they are")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    lib = _cpu_build.load()
    if lib is None:
        print(f"fused backend unavailable: {_cpu_build.reason()}")
        return 1
    print(f"fused backend: {lib.isa} kernels at {lib.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
