"""``sparse-hetconv demo``: the library's main job on its built-in default."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="convert a masked VGG-16 (random weights) to sparse form")
    parser.add_argument("--part", type=int, default=4, help="HetConv part P (default 4)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the latency run (default 32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per form (default 10)")
    parser.add_argument("--out", type=Path, default=Path("demo_result.json"), help="JSON file for the result")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .demo import format_demo, run_demo

    result = run_demo(part=args.part, batch=args.batch, repeats=args.repeats)
    print(format_demo(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {args.out}")
    return 0
