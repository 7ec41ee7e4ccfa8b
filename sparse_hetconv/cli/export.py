"""``sparse-hetconv export CHECKPOINT --out FILE``: a trained HetConv model to ONNX or a PT2 program."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .._checks import MissingExtraError
from .convert import input_size, model_kwargs

_SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a HetConv checkpoint to ONNX (ONNX Runtime, OpenVINO) or a torch.export program",
        description="Load a checkpoint (any HetConv form: masked, published gwc/pwc, sparse; see `convert`), "
                    "fold its BatchNorms, write its HetConv layers as the stock operators measured fastest for "
                    "the runtime, check the result against the PyTorch model on a random batch in every runtime "
                    "installed, and write it atomically. --int8 quantizes it (post-training static, per-channel "
                    "weights) on calibration data: QDQ int8 for ONNX Runtime, PT2E with the X86 Inductor "
                    "quantizer for --format pt2. See docs/deploy.md.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="the checkpoint (.pt / .pth)")
    parser.add_argument("--out", metavar="FILE", required=True, help="the file to write: .onnx or .pt2")
    parser.add_argument("--format", choices=tuple(_SUFFIX), default=None,
                        help="default: read from FILE's suffix (.onnx: onnx, .pt2: pt2)")
    parser.add_argument("--int8", action="store_true", help="quantize to int8 (needs --calibration)")
    parser.add_argument("--calibration", metavar="DIR_OR_NAME", default=None,
                        help="calibration images for --int8: a folder of .npy/.pt arrays or images, or 'digits' "
                             "(scikit-learn's handwritten digits, resized to the input: no download)")
    parser.add_argument("--input-size", metavar="C,H,W", default=None, help="one input's shape (default: the first "
                        "convolution's channels, 32x32)")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default=None,
                        help="the runtime the ONNX file is for (picks the form of its HetConv layers; default "
                             "onnxruntime)")
    parser.add_argument("--model", default="vgg16_cifar",
                        help="a registered model (part, form and classes read from the weights; default %(default)s) "
                             "or your factory as package.module:function")
    parser.add_argument("--model-kwargs", metavar="JSON", default=None, help="keyword arguments of the model (JSON)")
    parser.add_argument("--model-arg", metavar="KEY=VALUE", action="append", default=[],
                        help="one keyword argument of the model; repeatable")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.set_defaults(func=run)


def _check_runtime(args) -> None:
    """Before any work: what the requested export needs is installed (one line naming the extra)."""
    needs = []
    if args.format == "onnx":
        needs += ["onnx", "onnxscript", "onnxruntime"] + (["openvino"] if args.runtime == "openvino" else [])
    elif args.int8:
        needs.append("torchao")
    if args.int8 and args.calibration == "digits":
        needs.append("sklearn")
    missing = []
    for module in needs:
        try:
            __import__(module)
        except ImportError:
            missing.append("scikit-learn" if module == "sklearn" else module)
    if missing:
        raise MissingExtraError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                          "pip install 'sparse_hetconv[deploy]'")


def _check_options(args) -> None:
    """Before any work: the options fit together (--format and --out's suffix, what is read when)."""
    suffix = Path(args.out).suffix.lower()
    by_suffix = next((f for f, s in _SUFFIX.items() if s == suffix), None)
    if by_suffix is None:
        raise ValueError(f"--out ({args.out}) must end in .onnx or .pt2")
    if args.format not in (None, by_suffix):
        raise ValueError(f"--out ({args.out}) ends in {suffix!r} but --format is {args.format}: name the file "
                         f"{Path(args.out).with_suffix(_SUFFIX[args.format]).name} or pass --format {by_suffix}")
    args.format = by_suffix
    if args.runtime is not None and args.format != "onnx":
        raise ValueError(f"--runtime is only read with --format onnx (the format here is {args.format})")
    args.runtime = args.runtime or "onnxruntime"
    if args.int8 and args.calibration is None:
        raise ValueError("--int8 needs --calibration (a folder of arrays or images, or 'digits')")
    if args.calibration is not None and not args.int8:
        raise ValueError("--calibration is only read with --int8")


def run(args) -> int:
    import torch

    from .._files import check_output_file
    from ..checkpoint import _existing_file, _input_size, _outputs_on, load_model
    from ..deploy import calibration_batches, onnx_export

    out = check_output_file(args.out, args.force)
    _check_options(args)
    _existing_file(args.checkpoint)
    _check_runtime(args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    net, info = load_model(args.checkpoint, args.model, model_kwargs=model_kwargs(args.model_kwargs, args.model_arg))
    layers = onnx_export.count_hetconv(net)
    if layers == 0:
        raise ValueError(f"{args.checkpoint}: not a HetConv model (model {args.model} as loaded from it has no "
                         f"HetConv layer; part {info.get('part')})")
    size = _input_size(net, input_size(args.input_size))
    if len(size) != 3:
        raise ValueError(f"--input-size ({args.input_size}) must be C,H,W (export supports 2-D models)")
    net = net.float().eval()
    _outputs_on(torch.randn((2,) + size), args.model, net)  # a model that does not take this input: one line
    if args.int8:  # unreadable or wrongly sized calibration data, before any work
        calibration_batches(args.calibration, size, count=256)
    if args.format == "onnx":
        print(_onnx(net, out, size, args))
    else:
        print(_pt2(net, out, size, args, torch))
    return 0


def _onnx(net, out: Path, size, args) -> str:
    from ..deploy import export_onnx, quantize_onnx, runtimes

    if not args.int8:
        return str(export_onnx(net, out, size, runtime=args.runtime, force=True))
    import tempfile

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        float_file = Path(tmp) / "float.onnx"
        result = export_onnx(net, float_file, size, runtime=args.runtime, force=True)
        quantize_onnx(float_file, out, args.calibration, size, force=True)
    session = runtimes.load("onnxruntime", out)
    agreement = _agreement(net, lambda x: runtimes.run(session, x), size, args.calibration)
    return (f"wrote {out}: int8 QDQ ({result.layers} HetConv layers as '{result.form}'); top-1 agreement with the "
            f"float32 model on the calibration data {agreement:.1%}")


def _agreement(net, run, size, calibration) -> float:
    """How often ``run(x)`` (the int8 model) picks the float32 ``net``'s top class on the
    calibration data (up to 256 images)."""
    import torch

    from ..deploy import calibration_batches

    same = total = 0
    for x in calibration_batches(calibration, size, count=256):
        with torch.no_grad():
            same += int((torch.as_tensor(run(x)).argmax(1) == net(x).argmax(1)).sum())
        total += len(x)
    return same / total


def _pt2(net, out: Path, size, args, torch) -> str:
    from .._files import atomic_write
    from ..deploy import export_form, quantize
    from ..deploy.onnx_export import TOLERANCE, _difference

    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.randn((2,) + tuple(size), generator=torch.Generator().manual_seed(0))
    model = quantize(net, args.calibration, input_size=size) if args.int8 else export_form(net)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        got, float32 = program.module()(example), net(example)
        reference = model(example) if args.int8 else float32  # int8: the quantized model it was exported from
    if not _difference(got, reference) <= TOLERANCE:
        raise ValueError(f"the exported program computes differently from the {'quantized' if args.int8 else 'float32'}"
                         f" model: largest difference {_difference(got, reference):.3g} of the output's magnitude; "
                         f"nothing was written to {out}")
    atomic_write(out, lambda file: torch.export.save(program, file))
    against = f"largest difference to the float32 model {_difference(got, float32):.1e} of the output's magnitude"
    if not args.int8:
        return f"wrote {out}: torch.export program, float32; {against}"
    agreement = _agreement(net, program.module(), size, args.calibration)
    return (f"wrote {out}: torch.export program, int8 (PT2E, X86 Inductor quantizer: torch.compile it); {against} "
            f"(int8 rounding), top-1 agreement with it on the calibration data {agreement:.1%}")
