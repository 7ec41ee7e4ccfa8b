"""``sparse-hetconv train``: the published recipe on CIFAR-10, Fashion-MNIST or an image folder
(see :mod:`sparse_hetconv.training.trainer`)."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

from . import nonnegative_float, nonnegative_int, positive_float, positive_int

# Options that define a run (and its length and data); with --resume, the ones not given are read
# from the checkpoint.
_RECIPE_OPTIONS = ("model", "part", "form", "seed", "batch_size", "lr", "momentum", "weight_decay", "milestones",
                   "gamma", "crop_padding", "flip", "dataset", "train_subset", "test_subset", "epochs", "data")


def _milestones(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.replace(",", " ").split())
    except ValueError as error:
        raise ValueError(f"--milestones ({text!r}) must be epochs separated by commas, e.g. 50,140,210") from error


def add_parser(subparsers) -> None:
    from ..training import DATASETS, FASHION_MNIST_DEFAULT, TrainConfig

    d = TrainConfig()
    parser = subparsers.add_parser(
        "train", help="train a HetConv model with the published recipe (CIFAR-10, Fashion-MNIST, an image folder)",
        description="Train VGG-16 (or another registered model) with HetConv layers. The defaults are the "
                    "published CIFAR-10 recipe. CIFAR-10 is read from its python-pickle folder (cifar-10-batches-py), "
                    "Fashion-MNIST from its IDX files, an image folder with Pillow; nothing is downloaded. With "
                    "--resume, the settings not given are the checkpoint's.")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help=f"default {d.dataset}")
    parser.add_argument("--data", default=None,
                        help=f"where the data set is: CIFAR-10's folder or its parent (default data), Fashion-MNIST's "
                             f"IDX files (default {FASHION_MNIST_DEFAULT}, apt-get install dataset-fashion-mnist), "
                             "the image folder (one sub-folder per class)")
    parser.add_argument("--train-subset", type=positive_int, default=None,
                        help="train on this many images of a fixed class-balanced selection (default all)")
    parser.add_argument("--test-subset", type=positive_int, default=None,
                        help="test on this many images of a fixed class-balanced selection (default all)")
    parser.add_argument("--model", default=None, help=f"registered model (default {d.model})")
    parser.add_argument("--part", type=positive_int, default=None, help=f"HetConv part P (default {d.part})")
    parser.add_argument("--form", choices=("sparse", "masked"), default=None, help=f"layer form (default {d.form})")
    parser.add_argument("--epochs", type=positive_int, default=None, help=f"total epochs (default {d.epochs})")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--lr", type=positive_float, default=None, help=f"SGD learning rate (default {d.lr})")
    parser.add_argument("--momentum", type=nonnegative_float, default=None, help=f"default {d.momentum}")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=None, help=f"default {d.weight_decay}")
    parser.add_argument("--milestones", type=str, default=None,
                        help=f"MultiStepLR epochs, comma-separated (default {','.join(map(str, d.milestones))})")
    parser.add_argument("--gamma", type=nonnegative_float, default=None,
                        help=f"MultiStepLR factor (default {d.gamma})")
    parser.add_argument("--crop-padding", type=nonnegative_int, default=None,
                        help=f"padding of the random crop, 0 for none (default {d.crop_padding})")
    parser.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                        help="no random horizontal flips")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=nonnegative_int, default=None,
                        help=f"random seed, deterministic runs (default {d.seed})")
    parser.add_argument("--out", dest="out_dir", default=None,
                        help=f"folder for last.pt, best.pt, model_sparse.pt (default {d.out_dir}, or the folder "
                             "of --resume); a folder that holds a run needs --resume or --force")
    parser.add_argument("--force", action="store_true",
                        help="train into an --out that holds another run (its last.pt, best.pt and "
                             "model_sparse.pt are removed when training starts)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                        help=f"save last.pt every N epochs (default {d.checkpoint_every})")
    parser.add_argument("--resume", default=None, help="continue from a last.pt / best.pt checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --weights (or --resume)")
    parser.add_argument("--weights", default=None, help="model checkpoint to evaluate with --eval-only")
    parser.add_argument("--eval-batch-size", type=positive_int, default=d.eval_batch_size, help="default %(default)s")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def config_from_args(args):
    """The :class:`~sparse_hetconv.training.TrainConfig` for parsed arguments; with ``--resume``,
    the recipe options (and the run's length and data) not given on the command line come from the
    checkpoint."""
    from ..training import TrainConfig, config_from_checkpoint

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if values.get("milestones") is not None:
        values["milestones"] = _milestones(values["milestones"])
    stored = config_from_checkpoint(args.resume) if args.resume else {}
    if values.get("out_dir") is None:
        values["out_dir"] = str(Path(args.resume).parent) if stored and not args.eval_only else TrainConfig.out_dir
    for name in _RECIPE_OPTIONS:
        if values.get(name) is None:
            if name in stored:
                values[name] = tuple(stored[name]) if name == "milestones" else stored[name]
            else:
                values.pop(name, None)
    return TrainConfig(**values)


def run(args) -> int:
    from ..training import train

    config = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(config)
    if config.eval_only:
        print(f"test accuracy {100 * result.final_acc:.2f}% ; after conversion to {result.converted_form} form "
              f"{100 * result.converted_acc:.2f}% (max logit difference {result.max_logit_diff:.3g})")
        return 0
    print(f"best test accuracy {100 * result.best_acc:.2f}% at epoch {result.best_epoch}; final "
          f"{100 * result.final_acc:.2f}%; after conversion to {result.converted_form} form "
          f"{100 * result.converted_acc:.2f}% (max logit difference {result.max_logit_diff:.3g})")
    for label, path in result.files.items():
        print(f"{label}: {path}")
    return 0
