"""``sparse-hetconv convert IN OUT``: a HetConv checkpoint to the sparse model's state_dict."""

from __future__ import annotations

import json
import os
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a HetConv checkpoint (any published layout) to the sparse form",
        description="Read a checkpoint (a state_dict, bare or wrapped under 'state_dict', 'model', 'net', ...; "
                    "keys with or without DataParallel's 'module.' prefix; loaded with torch.load(weights_only=True)), "
                    "load it into the model it belongs to, convert every HetConv layer exactly (shifted-pattern "
                    "layers included, and the modules named by --probe, read from their responses), check the "
                    "result against the source model on a random batch and write the "
                    "sparse model's state_dict in the checkpoint's dtype. Load it with "
                    "sparse_hetconv.checkpoint.load_model(OUT, MODEL, model_kwargs=...). See docs/conversion.md.")
    parser.add_argument("source", metavar="IN", help="the checkpoint (.pt / .pth)")
    parser.add_argument("target", metavar="OUT", help="file for the sparse state_dict")
    parser.add_argument("--model", default="vgg16_cifar",
                        help="a registered model (part, form and classes read from the weights; default %(default)s) "
                             "or your factory as package.module:function (the current folder is on the import "
                             "path)")
    parser.add_argument("--model-kwargs", metavar="JSON", default=None,
                        help="keyword arguments of the model as a JSON object, e.g. '{\"num_classes\": 100}'")
    parser.add_argument("--model-arg", metavar="KEY=VALUE", action="append", default=[],
                        help="one keyword argument of the model (VALUE read as JSON, else as a string); repeatable")
    parser.add_argument("--input-size", metavar="C,H,W", default=None,
                        help="shape of the random test input (default: the first convolution's channels, 32x32)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert a checkpoint holding inf or NaN (with a warning) instead of refusing it")
    parser.add_argument("--probe", metavar="TARGET[,KEY=INT...]", action="append", default=[],
                        help="convert these modules by probing (any code that computes a HetConv up to a channel "
                             "permutation): a class as package.module:Class or a module path such as features.3, "
                             "optionally with in_channels, kernel_size, stride or part, e.g. "
                             "mynets:BranchHetConv,stride=2; repeatable")
    parser.set_defaults(func=run)


def model_kwargs(text: str | None, pairs: list[str]) -> dict:
    """``--model-kwargs`` and ``--model-arg`` merged into one dict (a key given twice is an error)."""
    kwargs = {}
    if text is not None:
        try:
            kwargs = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--model-kwargs ({text!r}) is not valid JSON: {error}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-kwargs ({text!r}) must be a JSON object, e.g. '{{\"num_classes\": 100}}'")
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"--model-arg ({pair!r}) must be KEY=VALUE with a Python name as KEY")
        if key in kwargs:
            raise ValueError(f"--model-arg {key} is given twice (or also in --model-kwargs)")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def probes(texts: list[str]) -> list:
    """``--probe`` values as :class:`~sparse_hetconv.probing.Probe` objects."""
    from ..probing import Probe

    settings = ("in_channels", "kernel_size", "stride", "part")
    found = []
    for text in texts:
        target, *pairs = text.split(",")
        kwargs = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in settings:
                raise ValueError(f"--probe ({text!r}): unknown setting {key!r}; expected {', '.join(settings)}")
            if not value.lstrip("-").isdigit():
                raise ValueError(f"--probe ({text!r}): {key} must be an int, got {value!r}")
            kwargs[key] = int(value)
        found.append(Probe(target, **kwargs))
    return found


def input_size(text: str | None) -> tuple[int, ...] | None:
    """``--input-size C,H,W`` (or ``C,D,H,W``) as a tuple of ints >= 1."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) not in (3, 4) or min(size) < 1:
        raise ValueError(f"--input-size ({text}) must be C,H,W (or C,D,H,W): comma-separated ints >= 1, e.g. 3,32,32")
    return size


def run(args) -> int:
    from ..checkpoint import convert_checkpoint

    if os.getcwd() not in sys.path:  # a factory in the user's project, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    report = convert_checkpoint(args.source, args.target, model=args.model, force=args.force,
                                model_kwargs=model_kwargs(args.model_kwargs, args.model_arg),
                                input_size=input_size(args.input_size), allow_nonfinite=args.allow_nonfinite,
                                probe=probes(args.probe) or None)
    print(report)
    return 0
