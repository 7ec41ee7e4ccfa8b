"""``make bench``: the package's benchmark into ``benchmarks/results/``, then ``docs/performance.md``.

``python -m benchmarks.bench [sparse-hetconv bench options]``: the options are those of
``sparse-hetconv bench`` (``--quick`` for a short run); ``--out`` defaults to
``benchmarks/results`` and ``--docs`` to ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparse_hetconv.cli.bench import add_arguments
from sparse_hetconv.profiling.bench.run import execute, summary

from . import RESULTS, docs_page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--docs", type=Path, default=docs_page.DOCS, help="the page to regenerate")
    parser.set_defaults(out=RESULTS)
    args = parser.parse_args(argv)
    result, written = execute(args)
    print(summary(result, written))
    for path in docs_page.write(result, args.docs, args.out / "latency_vs_p.png"):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
