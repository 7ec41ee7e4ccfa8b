"""``sparse-hetconv demo`` (``make demo``): the library's main job on its built-in default.

Builds ``vgg16_cifar`` in the published masked form with
random weights, converts it with :func:`sparse_hetconv.to_sparse`, and reports per-layer and total
parameters before and after, the largest output difference on a random batch, and the forward
latency of both forms.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from .._checks import check_int
from .._files import atomic_write, check_output_file
from ..convert import to_masked, to_sparse
from ..masked import MaskedHetConv2d
from ..models import vgg16_cifar
from ..profiling import measure_latency, parameter_bytes
from . import positive_int

__all__ = ["add_parser", "format_demo", "run", "run_demo"]


def run_demo(part: int = 4, batch: int = 32, repeats: int = 10, seed: int = 0) -> dict:
    """Convert a random masked ``vgg16_cifar(part)`` to sparse form and measure both.

    Args:
        part (int): HetConv ``P`` (must divide 64).
        batch (int): size of the random batch (>= 1).
        repeats (int): timed forward passes per form (>= 1).
        seed (int): seed of the weights and the batch (>= 0).

    Returns:
        dict: ``layers`` (name, channels, masked / sparse parameters), totals, bytes,
        ``max_abs_diff`` and ``latency_ms`` of both forms.

    Raises:
        TypeError / ValueError: an argument of the wrong type or value, before any work.
    """
    check_int("part", part)
    check_int("batch", batch)
    check_int("repeats", repeats)
    check_int("seed", seed, 0)
    torch.manual_seed(seed)
    # The published layout: masked form, NCHW, as a checkpoint of the published script loads.
    masked = vgg16_cifar(part=part, form="masked", memory_format=None).eval()
    sparse = to_sparse(masked)  # what this library ships: sparse form, channels-last
    masked_cl = to_masked(sparse)  # the masked form in the same (channels-last) layout
    sparse_modules = dict(sparse.named_modules())
    layers = []
    for name, module in masked.named_modules():
        if isinstance(module, MaskedHetConv2d):
            new = sparse_modules[name]
            layers.append({
                "name": name,
                "channels": f"{module.in_channels}->{module.out_channels}",
                "masked_params": sum(p.numel() for p in module.parameters()),
                "sparse_params": sum(p.numel() for p in new.parameters()),
                "sparse_type": type(new).__name__,
            })
    x = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        diff = (masked(x) - sparse(x)).abs().max().item()
        forms = {"masked": masked, "masked_channels_last": masked_cl, "sparse": sparse}
        times: dict[str, list[float]] = {label: [] for label in forms}
        for label, model in forms.items():  # warm-up
            measure_latency(lambda m=model: m(x), warmup=2, repeats=1)
        for _ in range(repeats):  # interleaved, so that machine noise hits every form alike
            for label, model in forms.items():
                times[label].append(measure_latency(lambda m=model: m(x), warmup=0, repeats=1)["median_ms"])
        latency = {label: statistics.median(values) for label, values in times.items()}
    return {
        "model": f"vgg16_cifar(part={part})",
        "batch": batch,
        "threads": torch.get_num_threads(),
        "layers": layers,
        "masked_params": sum(p.numel() for p in masked.parameters()),
        "sparse_params": sum(p.numel() for p in sparse.parameters()),
        "masked_bytes": parameter_bytes(masked),
        "sparse_bytes": parameter_bytes(sparse),
        "max_abs_diff": diff,
        "latency_ms": latency,
        "repeats": repeats,
    }


def format_demo(result: dict) -> str:
    """The demo's result as a plain-text table."""
    lines = [f"{result['model']}: masked (published form) -> sparse, random weights", "",
             f"{'layer':<14}{'channels':>12}{'masked params':>16}{'sparse params':>16}{'saved':>8}"]
    for row in result["layers"]:
        saved = 1 - row["sparse_params"] / row["masked_params"]
        lines.append(f"{row['name']:<14}{row['channels']:>12}{row['masked_params']:>16,}"
                     f"{row['sparse_params']:>16,}{saved:>8.1%}")
    total_saved = 1 - result["sparse_params"] / result["masked_params"]
    lines += [
        f"{'whole model':<26}{result['masked_params']:>16,}{result['sparse_params']:>16,}{total_saved:>8.1%}",
        "",
        f"parameter bytes: masked {result['masked_bytes'] / 2**20:.2f} MiB, "
        f"sparse {result['sparse_bytes'] / 2**20:.2f} MiB",
        f"max |masked(x) - sparse(x)| on a random batch of {result['batch']}: {result['max_abs_diff']:.3g}",
        f"forward latency (eval, batch {result['batch']}, {result['threads']} threads, median of "
        f"{result['repeats']} interleaved runs):",
    ]
    latency = result["latency_ms"]
    for label, text in (("masked", "masked, NCHW (the published layout)"),
                        ("masked_channels_last", "masked, channels-last"),
                        ("sparse", "sparse, channels-last (to_sparse's output)")):
        lines.append(f"  {text:<44}{latency[label]:8.1f} ms  "
                     f"({latency['masked'] / latency[label]:.2f}x the published layout's speed)")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="convert a masked VGG-16 (random weights) to sparse form")
    parser.add_argument("--part", type=positive_int, default=4, help="HetConv part P, a divisor of 64 (default 4)")
    parser.add_argument("--batch", type=positive_int, default=32, help="batch size of the latency run (default 32)")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="timed forward passes per form (default 10)")
    parser.add_argument("--out", type=Path, default=Path("demo_result.json"),
                        help="JSON file for the result (replaced if it exists; default %(default)s)")
    parser.set_defaults(func=run)


def run(args) -> int:
    check_output_file(args.out)  # before the work: a folder that is missing or not writable fails now
    result = run_demo(part=args.part, batch=args.batch, repeats=args.repeats)
    print(format_demo(result))
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(args.out, lambda file: file.write(text.encode()))
    print(f"\nsaved {args.out}")
    return 0
