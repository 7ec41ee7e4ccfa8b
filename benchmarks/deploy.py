"""``make bench`` (second part): the deployment benchmark into ``benchmarks/results/``.

``python -m benchmarks.deploy [sparse-hetconv bench --deploy options]``: writes ``deploy.json``,
``deploy.md`` and ``deploy.png``; ``python -m benchmarks.docs_page`` puts them into
docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys

from sparse_hetconv.cli.bench import add_arguments
from sparse_hetconv.profiling.bench import deploy

from . import RESULTS, docs_page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(out=RESULTS, deploy=True)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    result, written = deploy.execute(args, progress=lambda line: print(line, file=sys.stderr))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if args.out.resolve() == RESULTS.resolve():  # the repository's results: the docs page follows them
        for path in docs_page.write_deploy(result, docs_page.DOCS):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
