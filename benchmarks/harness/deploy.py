"""Deployment benchmark: a trained HetConv model in every runtime users ship it in, float32 and int8.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. Run by ``python -m
benchmarks.deploy`` (``make bench``). For VGG-16 / CIFAR-10 (3 x 32 x 32) and ResNet-18 (3 x 224 x 224),
P in {1, 2, 4, 8, 64}, every variant is built from the same weights (BatchNorm statistics of a few
random batches, so that folding them is not trivial), checked against the PyTorch model, then
timed at batch 1 and ``--batch`` in interleaved rounds (medians):

* ``eager`` — the shipped sparse model (``to_sparse``: channels-last, ``backend="auto"``);
* ``compiled`` — ``fuse_bn`` + ``torch.compile`` with Inductor's freezing;
* ``ort_published`` — the published form (gwc + pwc, NCHW) exported with a plain
  ``torch.onnx.export``, in ONNX Runtime: what a user ships without this library;
* ``ort`` / ``openvino`` — :func:`sparse_hetconv.deploy.export_onnx` for each runtime;
* ``int8_pt2e`` — :func:`~sparse_hetconv.deploy.quantize` (PT2E, X86 Inductor quantizer) and
  :func:`~sparse_hetconv.deploy.compile_int8`;
* ``int8_ort`` — :func:`~sparse_hetconv.deploy.quantize_onnx` of the ``ort`` export, in ONNX Runtime.

Calibration: 256 images of scikit-learn's digits resized to the input. Before that, the forms of the
HetConv layers (:data:`sparse_hetconv.deploy.FORMS`) are timed against each other in each runtime
(VGG-16, batch ``--batch``), the evidence behind :data:`sparse_hetconv.deploy.BEST_FORM`. FLOP-ideal
of a runtime: its time for the standard model (P = 1) times the useful-MAC ratio. ``deploy.json`` is
rewritten (atomically) after every timed set, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparse_hetconv._files import atomic_write, check_output_folder
from sparse_hetconv._frozen import FrozenCompiled
from sparse_hetconv.convert import to_sparse
from sparse_hetconv.counting import count_macs
from sparse_hetconv import fuse_bn
from sparse_hetconv.models import resnet18, vgg16_cifar
from sparse_hetconv.profiling.timing import interleaved_latency

from .machine import machine_info, pin_mmap_threshold
from .published import published_from_masked

MODELS = {"vgg16_cifar": (3, 32, 32), "resnet18": (3, 224, 224)}
PARTS = (1, 2, 4, 8, 64)
QUICK_PARTS = (1, 4)
VARIANTS = ("eager", "compiled", "ort_published", "ort", "openvino", "int8_pt2e", "int8_ort")
FORM_PARTS = (2, 4, 8, 64)


def _build(name: str, part: int, seed: int = 0):
    """The masked model of ``name`` with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    size = MODELS[name]
    if name == "vgg16_cifar":
        model = vgg16_cifar(part=part, form="masked", memory_format=None)
    else:
        model = resnet18(part=part, form="masked", num_classes=1000)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn((8,) + size))
    return model.eval()


def _onnx_session(model, size, runtime: str, form=None, plain: bool = False):
    from sparse_hetconv.deploy import export_onnx, runtimes
    from sparse_hetconv.deploy.onnx_export import onnx_bytes

    if plain:  # what a user does without this library: torch.onnx.export of the model as it is
        return runtimes.load(runtime, onnx_bytes(model.eval(), size))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, size, runtime=runtime, form=form, check=(runtime,))
        return runtimes.load(runtime, path.read_bytes())


def _callables(name: str, part: int, size, calibration, variants) -> tuple[dict, dict, torch.nn.Module]:
    """Each variant as ``f(x) -> output``; also what each is (its notes) and the eager model."""
    from sparse_hetconv.deploy import compile_int8, export_onnx, quantize, quantize_onnx, runtimes

    masked = _build(name, part)
    shipped = to_sparse(masked) if part > 1 else masked.to(memory_format=torch.channels_last)
    fns, notes = {}, {}

    def eager(x, m=shipped):
        with torch.no_grad():
            return m(x.contiguous(memory_format=torch.channels_last))

    fns["eager"] = eager
    if "compiled" in variants:
        compiled = FrozenCompiled(fuse_bn(shipped))

        def run_compiled(x, m=compiled):
            with torch.no_grad():
                return m(x.contiguous(memory_format=torch.channels_last))

        fns["compiled"] = run_compiled
    if "ort_published" in variants and runtimes.available("onnxruntime"):
        source = published_from_masked(masked) if part > 1 else masked
        session = _onnx_session(source, size, "onnxruntime", plain=True)
        fns["ort_published"] = lambda x, s=session: runtimes.run(s, x)
    if "ort" in variants and runtimes.available("onnxruntime"):
        session = _onnx_session(masked, size, "onnxruntime")
        fns["ort"] = lambda x, s=session: runtimes.run(s, x)
    if "openvino" in variants and runtimes.available("openvino"):
        session = _onnx_session(masked, size, "openvino")
        fns["openvino"] = lambda x, s=session: runtimes.run(s, x)
    if "int8_pt2e" in variants:
        quantized = quantize(masked, calibration, input_size=size)
        int8 = compile_int8(quantized, calibration[0][:1])

        def run_int8(x, m=int8):
            with torch.no_grad():
                return m(x)

        fns["int8_pt2e"] = run_int8
        notes["int8_pt2e"] = "torchao PT2E, X86InductorQuantizer, torch.compile (freezing)"
    if "int8_ort" in variants and runtimes.available("onnxruntime"):
        with tempfile.TemporaryDirectory() as tmp:
            float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            export_onnx(masked, float_path, size, check=("onnxruntime",))
            quantize_onnx(float_path, int8_path, calibration, size)
            session = runtimes.load("onnxruntime", int8_path.read_bytes())
        fns["int8_ort"] = lambda x, s=session: runtimes.run(s, x)
        notes["int8_ort"] = "onnxruntime.quantization.quantize_static, QDQ, per-channel weights"
    return fns, notes, shipped


def _check(fns: dict, reference, x) -> dict:
    """Per variant: the largest difference to eager (float: relative to the output's magnitude) or,
    for int8, the top-1 agreement with eager on ``x``."""
    with torch.no_grad():
        expected = reference(x).float()
    scale = float(expected.abs().max().clamp(min=1e-12))
    out = {}
    for name, fn in fns.items():
        got = fn(x).float()
        if name.startswith("int8"):
            out[name] = {"top1_agreement": float((got.argmax(1) == expected.argmax(1)).float().mean())}
        else:
            out[name] = {"max_rel_diff": float((got - expected).abs().max()) / scale}
    return out


def run_forms(args, parts, progress=None) -> list[dict]:
    """The HetConv export forms against each other in each runtime (VGG-16, batch ``args.batch``)."""
    from sparse_hetconv.deploy import FORMS, runtimes

    rows = []
    size = MODELS["vgg16_cifar"]
    x = torch.randn((args.batch,) + size, generator=torch.Generator().manual_seed(1))
    for part in [p for p in FORM_PARTS if p in parts]:
        masked = _build("vgg16_cifar", part)
        for runtime in runtimes.RUNTIMES:
            if not runtimes.available(runtime):
                continue
            fns = {}
            for form in FORMS:
                if form == "shifted" and part > 8:
                    continue  # P - 1 rotated copies of every layer's input: measured far behind from P = 8
                session = _onnx_session(masked, size, runtime, form=form)
                fns[form] = lambda s=session: runtimes.run(s, x)
            stats = interleaved_latency(fns, warmup=args.warmup, repeats=args.repeats)
            base = stats["masked"]["times_ms"]
            for form, s in stats.items():
                ratio = statistics.median(a / b for a, b in zip(s["times_ms"], base))
                rows.append({"part": part, "runtime": runtime, "form": form, "median_ms": s["median_ms"],
                             "vs_masked": ratio})
            if progress:
                progress(f"forms P={part} {runtime}: " + ", ".join(f"{f} {s['median_ms']:.1f} ms"
                                                                  for f, s in stats.items()))
    return rows


def run_ort_profile(args, calibration, part: int = 4, runs: int = 10) -> dict | None:
    """ONNX Runtime's own profile of VGG-16 at ``part``, batch ``args.batch``: the published model's
    plain export, the shipped export (float32) and its QDQ int8 version; milliseconds per run by
    operator, grouped convolutions apart (what the ONNX Runtime targets' misses are made of). None
    where ONNX Runtime is not installed."""
    from sparse_hetconv.deploy import export_onnx, quantize_onnx, runtimes
    from sparse_hetconv.deploy.onnx_export import onnx_bytes

    if not runtimes.available("onnxruntime"):
        return None
    import onnx
    import onnxruntime as ort

    size = MODELS["vgg16_cifar"]
    masked = _build("vgg16_cifar", part)
    x = torch.randn((args.batch,) + size, generator=torch.Generator().manual_seed(4)).numpy()
    out = {"part": part, "batch": args.batch, "runs": runs, "ms": {}, "run_ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(masked, tmp / "float32.onnx", size, check=("onnxruntime",))
        quantize_onnx(tmp / "float32.onnx", tmp / "int8.onnx", calibration, size)
        (tmp / "published.onnx").write_bytes(onnx_bytes(published_from_masked(masked).eval(), size))
        for name in ("published", "float32", "int8"):
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # (the optimized file's "hardware specific" warning)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.optimized_model_filepath = str(tmp / f"{name}.optimized.onnx")  # its node names
            options.enable_profiling = True
            options.profile_file_prefix = str(tmp / name)
            session = ort.InferenceSession(str(tmp / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x}
            warmup = max(args.warmup, 1)
            for _ in range(warmup + runs):
                session.run(None, feed)
            events = json.loads(Path(session.end_profiling()).read_text())
            whole = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
            timed_from = whole[warmup][0] if len(whole) > warmup else 0  # the warm-up runs are not counted
            out["run_ms"][name] = statistics.median(dur / 1e3 for _, dur in whole[warmup:]) if whole[warmup:] else None
            kinds = {}
            for node in onnx.load(tmp / f"{name}.optimized.onnx").graph.node:
                grouped = any(a.name == "group" and a.i > 1 for a in node.attribute)
                kinds[node.name] = node.op_type + (" (grouped)" if grouped else "")
            per_run = {}
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed_from:
                    op = kinds.get(e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?"))
                    per_run[op] = per_run.get(op, 0.0) + e["dur"] / 1e3 / runs
            out["ms"][name] = dict(sorted(per_run.items(), key=lambda kv: -kv[1]))
    return out


def train_on_digits(model: torch.nn.Module, size, epochs: int = 6, seed: int = 0) -> torch.nn.Module:
    """Train ``model`` on the digits train split (SGD with momentum, batch 64, cosine schedule)."""
    from sparse_hetconv.deploy import digits

    torch.manual_seed(seed)
    images, labels = digits(size, "train", seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(labels) + 63) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            index = order[start:start + 64]
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images[index].contiguous(memory_format=torch.channels_last)),
                                              labels[index]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def predictions(fn, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def run_accuracy(args) -> dict:
    """VGG-16 (P = 4) trained on the digits train split; float32, PT2E int8 and ONNX Runtime int8
    accuracy on the test split, and the int8 models' top-1 agreement with float32."""
    from sparse_hetconv.deploy import compile_int8, digits, export_onnx, quantize, quantize_onnx, runtimes

    size = MODELS["vgg16_cifar"]
    epochs = 2 if args.quick else 6
    model = train_on_digits(vgg16_cifar(part=4, num_classes=10), size, epochs)
    test, labels = digits(size, "test")
    train, _ = digits(size, "train")
    calibration = list(train[:256].split(32))
    reference = predictions(lambda x: model(x.contiguous(memory_format=torch.channels_last)), test)
    result = {"description": f"vgg16_cifar(part=4, num_classes=10) trained {epochs} epochs on the digits train "
                             f"split (1437 images, upsampled to 32 x 32); calibration: 256 train images; "
                             f"test split: {len(labels)} images.",
              "float32": float((reference == labels).float().mean())}
    quantized = compile_int8(quantize(model, calibration, input_size=size), calibration[0][:1])
    int8 = predictions(quantized, test)
    result["int8_pt2e"] = {"accuracy": float((int8 == labels).float().mean()),
                           "agreement": float((int8 == reference).float().mean())}
    if runtimes.available("onnxruntime"):
        with tempfile.TemporaryDirectory() as tmp:
            float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            export_onnx(model, float_path, size, check=("onnxruntime",))
            quantize_onnx(float_path, int8_path, calibration, size)
            session = runtimes.load("onnxruntime", int8_path.read_bytes())
        ort = predictions(lambda x: runtimes.run(session, x), test)
        result["int8_ort"] = {"accuracy": float((ort == labels).float().mean()),
                              "agreement": float((ort == reference).float().mean())}
    return result


def execute(args, progress=None) -> tuple[dict, list[Path]]:
    """Run the deployment benchmark; write ``deploy.json`` and ``deploy.md`` into ``args.out``.
    ``progress``: called with one line per timed set (the command line prints them)."""
    from sparse_hetconv.deploy import calibration_batches, runtimes

    check_output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    pin_mmap_threshold()
    start = time.time()
    parts = tuple(args.parts) if args.parts else (QUICK_PARTS if args.quick else PARTS)
    models = args.models or (("vgg16_cifar",) if args.quick else tuple(MODELS))
    variants = tuple(args.deploy_variants or VARIANTS)
    info = machine_info()
    info["runtimes"] = {r: runtimes.available(r) for r in runtimes.RUNTIMES}
    info["versions"] = _versions()
    # oneDNN / MKL capped (benchmarks/auto_isa.py's AVX2 run): PyTorch's kernels run that ISA.
    info["isa_cap"] = os.environ.get("ONEDNN_MAX_CPU_ISA")
    result = {"command": " ".join(["python -m benchmarks.deploy"] + sys.argv[1:]), "machine": info, "seconds": 0.0,
              "config": {"parts": parts, "models": models, "batch": args.batch, "repeats": args.repeats,
                         "warmup": args.warmup, "variants": variants, "quick": args.quick},
              "finished": False, "rows": [], "checks": [], "forms": [], "accuracy": None, "ort_profile": None}
    rows, checks = result["rows"], result["checks"]
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # atomically: a run stopped at any moment leaves the last complete state
        result["seconds"] = time.time() - start
        add_ratios(rows)
        text = json.dumps(result, indent=1) + "\n"
        atomic_write(args.out / "deploy.json", lambda file: file.write(text.encode()))

    save()
    if not args.no_forms:
        result["forms"] = run_forms(args, parts, progress)
        save()
    if not args.no_accuracy:
        result["accuracy"] = run_accuracy(args)
        save()
    if "int8_ort" in variants and 4 in parts and "vgg16_cifar" in models:
        result["ort_profile"] = run_ort_profile(args, calibration_batches("digits", MODELS["vgg16_cifar"], batch=16,
                                                                          count=256))
    for name in models:
        size = MODELS[name]
        calibration = calibration_batches("digits", size, batch=16, count=128 if args.quick else 256)
        for part in parts:
            fns, notes, shipped = _callables(name, part, size, calibration, variants)
            probe = torch.randn((2,) + size, generator=torch.Generator().manual_seed(2))
            check = _check(fns, lambda x: fns["eager"](x), probe)
            checks.append({"model": name, "part": part, **{k: v for k, v in check.items()}})
            useful = count_macs(shipped, (1,) + size, norm=False)
            for batch in (1, args.batch):
                x = torch.randn((batch,) + size, generator=torch.Generator().manual_seed(3))
                stats = interleaved_latency({v: (lambda f=f: f(x)) for v, f in fns.items()}, warmup=args.warmup,
                                            repeats=args.repeats)
                for variant, s in stats.items():
                    rows.append({"model": name, "part": part, "batch": batch, "variant": variant,
                                 "median_ms": s["median_ms"], "q1_ms": s["q1_ms"], "q3_ms": s["q3_ms"],
                                 "useful_macs": useful * batch, "note": notes.get(variant, "")})
                save()
                if progress:
                    progress(f"{name} P={part} batch {batch}: " + ", ".join(f"{v} {s['median_ms']:.1f}"
                                                                             for v, s in stats.items()))
            del fns
    result["finished"] = True
    save()
    from . import deploy_report

    return result, [args.out / "deploy.json", *deploy_report.write_all(result, args.out)]


def add_ratios(rows: list) -> None:
    """Per (model, P, batch): speed-up of each variant over ``eager``; per runtime its FLOP-ideal
    (the same variant at P = 1 x the useful-MAC ratio)."""
    index = {(r["model"], r["part"], r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        eager = index.get((r["model"], r["part"], r["batch"], "eager"))
        r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
        standard = index.get((r["model"], 1, r["batch"], r["variant"])) or index.get(
            (r["model"], 1, r["batch"], r["variant"].replace("_published", "")))
        if standard:
            r["ideal_ms"] = standard["median_ms"] * r["useful_macs"] / standard["useful_macs"]
            r["over_ideal"] = r["median_ms"] / r["ideal_ms"]


def _versions() -> dict:
    found = {"torch": torch.__version__}
    for module in ("onnx", "onnxruntime", "openvino", "torchao"):
        try:
            found[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            found[module] = None
    return found
