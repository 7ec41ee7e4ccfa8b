"""``make bench`` (second part): the deployment benchmark into ``benchmarks/results/``.

``python -m benchmarks.deploy [--quick] [options]`` (:mod:`benchmarks.harness.deploy`): writes
``deploy.json``, ``deploy.md`` and ``deploy.png``; when ``--out`` is ``benchmarks/results`` (the
default) docs/performance.md follows them (``python -m benchmarks.docs_page`` does it by hand).
"""

from __future__ import annotations

import argparse
import sys

from . import RESULTS, docs_page
from .harness import options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__.split("\n\n")[0])
    options.deploy(parser)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    from .harness import deploy

    try:
        result, written = deploy.execute(args, progress=lambda line: print(line, file=sys.stderr))
    except (ValueError, OSError) as error:
        parser.error(str(error))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if args.out.resolve() == RESULTS.resolve():  # the repository's results: the docs page follows them
        for path in docs_page.write_deploy(result, docs_page.DOCS):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
