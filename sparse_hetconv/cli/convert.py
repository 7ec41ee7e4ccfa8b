"""``sparse-hetconv convert IN OUT``: a masked checkpoint to the sparse model's state_dict."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a masked (published-layout) checkpoint to the sparse form",
        description="Read a state_dict of the masked model (bare or wrapped in a dict, with or without "
                    "DataParallel's 'module.' prefix; loaded with torch.load(weights_only=True)), convert it "
                    "exactly and write the sparse model's state_dict. The part and number of classes are read "
                    "from the weights.")
    parser.add_argument("source", metavar="IN", help="masked checkpoint (.pt / .pth)")
    parser.add_argument("target", metavar="OUT", help="file for the sparse state_dict")
    parser.add_argument("--model", default="vgg16_cifar", help="registered model of the weights (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import convert_checkpoint

    report = convert_checkpoint(args.source, args.target, model=args.model, force=args.force)
    print(report)
    return 0
