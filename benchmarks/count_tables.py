"""MACs and parameters of VGG-16 (CIFAR-10) and ResNet-18/34/50 (ImageNet) with HetConv layers.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. Counts every model with
:func:`sparse_hetconv.count_model` in both forms and writes ``count_tables.json`` and
``count_tables.md`` (the tables of ``docs/counting_and_training.md``):

* VGG-16 / CIFAR-10 (1x3x32x32) for P = 1 ... 64 beside the paper's Table 1 column: useful MACs
  (the paper's convention, BatchNorm counted as one MAC per output), conv + linear MACs only,
  convolution MACs only, executed MACs of the masked form, parameters of both forms.
* ResNet-18/34/50 (1x3x224x224) for P = 1, 2, 4, 8: the same columns.

The sparse form executes the masked count with its ``dense`` backend and the useful count with
the others; which one ``backend="auto"`` picks is the autotuner's (machine-dependent) choice, so the
tables leave it out and the JSON records it per model as ``sparse_backends_auto`` /
``executed_macs_sparse_auto``.

Counting is exact arithmetic on the layer shapes; nothing is timed. Run:
``python -m benchmarks.count_tables [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch import nn

from sparse_hetconv import count_model, to_sparse
from sparse_hetconv.counting import PAPER_VGG16_CIFAR10_MMACS
from sparse_hetconv.models import create_model

from . import RESULTS

VGG_PARTS = (1, 2, 4, 8, 16, 32, 64)
RESNET_PARTS = (1, 2, 4, 8)
RESNETS = ("resnet18", "resnet34", "resnet50")


def count_row(name: str, part: int, size: int) -> dict:
    """Counts of ``name(part)`` in masked and in sparse form on a ``1 x 3 x size x size`` input."""
    torch.manual_seed(0)
    masked = create_model(name, part=part, form="masked").eval()
    sparse = to_sparse(masked) if part > 1 else masked
    shape = (1, 3, size, size)
    m, s = count_model(masked, shape), count_model(sparse, shape)
    plain = count_model(masked, shape, norm=False)
    if m.useful_macs != s.useful_macs or m.params != s.params:
        raise RuntimeError(f"{name}(part={part}): the two forms count differently")
    backends = sorted({row.backend for row in s.layers if row.backend})
    conv = sum(row.useful_macs for row in plain.layers if not isinstance(masked.get_submodule(row.name), nn.Linear))
    return {"model": name, "part": part, "input": list(shape), "useful_macs": m.useful_macs,
            "conv_macs": conv, "conv_linear_macs": plain.useful_macs, "executed_macs_masked": m.executed_macs,
            "executed_macs_sparse_auto": s.executed_macs, "sparse_backends_auto": backends, "params": s.params,
            "stored_params_masked": m.stored_params, "stored_params_sparse": s.stored_params}


def vgg_table(rows: list[dict]) -> str:
    lines = [
        "| P | paper (M) | useful MACs (M) | vs paper | conv+linear (M) | vs paper | conv only (M) | vs paper "
        "| executed, masked (M) | params (useful = sparse stored) | params stored, masked |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paper = PAPER_VGG16_CIFAR10_MMACS[r["part"]]
        useful, plain, conv = r["useful_macs"] / 1e6, r["conv_linear_macs"] / 1e6, r["conv_macs"] / 1e6
        lines.append(
            f"| {r['part']} | {paper:.2f} | {useful:.2f} | {100 * (useful - paper) / paper:+.2f} % | {plain:.2f} "
            f"| {100 * (plain - paper) / paper:+.2f} % | {conv:.2f} | {100 * (conv - paper) / paper:+.2f} % "
            f"| {r['executed_macs_masked'] / 1e6:.2f} | {r['params']:,} | {r['stored_params_masked']:,} |")
    return "\n".join(lines)


def resnet_table(rows: list[dict]) -> str:
    lines = [
        "| model | P | useful MACs (G) | conv+linear MACs (G) | executed, masked (G) "
        "| params (useful = sparse stored) | params stored, masked |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['part']} | {r['useful_macs'] / 1e9:.3f} | {r['conv_linear_macs'] / 1e9:.3f} "
            f"| {r['executed_macs_masked'] / 1e9:.3f} | {r['params']:,} | {r['stored_params_masked']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown")
    args = parser.parse_args(argv)
    vgg = [count_row("vgg16_cifar", part, 32) for part in VGG_PARTS]
    resnet = [count_row(name, part, 224) for name in RESNETS for part in RESNET_PARTS]
    env = {"torch": torch.__version__, "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "count_tables.json").write_text(json.dumps({"env": env, "vgg16_cifar": vgg, "resnet": resnet},
                                                           indent=2) + "\n")
    markdown = (f"### VGG-16, CIFAR-10 (input 1x3x32x32)\n\n{vgg_table(vgg)}\n\n"
                f"### ResNet, ImageNet layout (input 1x3x224x224)\n\n{resnet_table(resnet)}\n\n"
                f"Generated by `python -m benchmarks.count_tables` (torch {env['torch']}). The sparse form "
                "executes the masked count with `backend=\"dense\"` and the useful count with `blocked`, "
                "`grouped` or `torch_sparse`.\n")
    (args.out / "count_tables.md").write_text(markdown)
    print(markdown)
    print(f"saved {args.out / 'count_tables.json'} and {args.out / 'count_tables.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
