"""``make bench``: the latency and memory benchmark into ``benchmarks/results/``, then ``docs/performance.md``.

``python -m benchmarks.bench [--quick] [options]`` (:mod:`benchmarks.harness.run`): ``bench.json``
is rewritten after every timed set, so a stopped run keeps what it measured. docs/performance.md is
regenerated when ``--out`` is ``benchmarks/results`` (the default) or ``--docs`` names a page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import RESULTS, docs_page
from .harness import options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    options.bench(parser)
    parser.add_argument("--docs", type=Path, help="the page to regenerate (default docs/performance.md when --out "
                        "is benchmarks/results)")
    args = parser.parse_args(argv)
    from .harness.run import execute, summary

    try:
        result, written = execute(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(summary(result, written))
    docs = args.docs or (docs_page.DOCS if args.out.resolve() == RESULTS.resolve() else None)
    if docs is not None:
        for path in docs_page.write(result, docs, args.out / "latency_vs_p.png"):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
