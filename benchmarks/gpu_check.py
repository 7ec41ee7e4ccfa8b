"""GPU readiness check of the operator's Triton kernel: the CUDA tests, then VGG-16 timings on one GPU.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. Run from the repository root::

    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR           # make gpu-check
    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR --dry-run # CPU: everything before CUDA

Steps (about 8 minutes on one H200):

1. ``pytest -q -m "not slow"`` on the CUDA-parametrised tests (``-k cuda``) and on
   ``tests/backends/test_triton.py``, with ``TRITON_INTERPRET`` removed so the kernels run on CUDA.
2. VGG-16 / CIFAR-10 (``P = 4``, batch 128, channels-last, float32 and bfloat16 autocast), four
   variants built from one masked model: the published code (NCHW ``gwc + pwc``,
   ``cudnn.benchmark``, ``pwc.weight.grad *= mask`` after backward), ``form="masked"``, the sparse
   model with ``backend="auto"`` and with every HetConv layer on the triton backend. Each is
   checked against the masked form in float32 (eval output, input gradient of a training loss;
   under bfloat16 within twice the masked form's own bfloat16 error) before it is timed: forward
   (eval, no_grad) and a training step (forward, cross-entropy, backward, SGD step), interleaved
   rounds with CUDA synchronisation, medians; then its peak training memory.
3. Each HetConv layer shape of VGG-16: the triton forward against the FLOP-ideal, a cuDNN
   ``nn.Conv2d(M, N, 3)`` of that shape times useful / standard MACs (useful MACs per pixel
   ``N (k^2 m + M - m)``).

4. The backward's choice, measured: for each layer shape, a forward + backward of the operator
   with ``impl="triton"`` (the Triton input gradient at stride 1) and with ``impl="stock"`` (cuDNN
   and cuBLAS throughout), interleaved, after checking the gradients agree; the faster per layer is
   reported beside what ``impl="auto"`` runs (Triton), so the default can be set from data.

Writes ``gpu_check.json`` and ``gpu_check.md``. Needs torch, triton, pytest, hypothesis and the
package on ``PYTHONPATH``; ``--dry-run`` (or no CUDA) builds the models and variants on the CPU
and writes the report with "not run" entries.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d, ops, to_sparse
from sparse_hetconv.models import vgg16_cifar
from sparse_hetconv.profiling import interleaved_latency
from benchmarks.harness.published import PublishedHetConv, mask_gradients, published_from_masked

ROOT = Path(__file__).resolve().parent.parent

CL = torch.channels_last
MODES = ("float32", "bfloat16")  # bfloat16: float32 parameters under torch.autocast
# Optional packages the GPU machine does not have: the CUDA test files must collect without them
# (tests/benchmarks/test_gpu_check.py checks that on the CPU by blocking these imports).
BARE_MACHINE_MISSING = ("numpy", "scipy", "spconv", "cumm", "tqdm", "matplotlib", "onnx", "onnxruntime",
                        "onnxscript", "fvcore", "ptflops", "nbclient", "nbformat", "sklearn")


def cuda_test_files() -> list[str]:
    """The test files with CUDA cases (they mention "cuda"), the triton backend's file apart."""
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
                   if "cuda" in p.read_text() and p.name != "test_triton.py")
    return files


def test_runs() -> dict[str, list[str]]:
    return {"cuda-parametrised tests": ["-k", "cuda", *cuda_test_files()],
            "triton backend tests": ["tests/backends/test_triton.py"]}


# Smallest accepted relative (L2) error against the reference: TF32 convolutions / bfloat16 rounding.
TOLERANCE = {"float32": 1e-2, "bfloat16": 3e-2}


def pin_triton(model: nn.Module) -> tuple[nn.Module, str]:
    """Every HetConv layer of ``model`` (in place) on the triton backend; says how it was done."""
    for module in model.modules():
        if isinstance(module, SparseHetConv2d):
            module.backend = "triton"
    return model, "backend='triton'"


def build_variants(part: int) -> tuple[dict[str, dict], str]:
    """The four VGG-16 variants, one set of weights: name -> {model, channels_last, masks}."""
    torch.manual_seed(0)
    masked = vgg16_cifar(part, form="masked")
    triton_model, how = pin_triton(to_sparse(masked, backend="auto"))
    variants = {
        "published": {"model": published_from_masked(masked), "channels_last": False, "masks": True},
        "masked": {"model": masked, "channels_last": True, "masks": False},
        "sparse_auto": {"model": to_sparse(masked, backend="auto"), "channels_last": True, "masks": False},
        "sparse_triton": {"model": triton_model, "channels_last": True, "masks": False},
    }
    return variants, how


def layer_shapes(model: nn.Module) -> list[dict]:
    """The distinct HetConv layer shapes of ``model`` (a CPU forward of two images with hooks)."""
    shapes: list[dict] = []

    def hook(module, inputs, output):
        x = inputs[0]
        shape = {"in_channels": module.in_channels, "out_channels": module.out_channels, "part": module.part,
                 "size": x.shape[-1], "stride": module.stride[0]}
        if shape not in shapes:
            shapes.append(shape)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MaskedHetConv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32).contiguous(memory_format=CL))
    for h in handles:
        h.remove()
    for s in shapes:
        m = s["in_channels"] // s["part"]
        s["useful_over_standard"] = (9 * m + s["in_channels"] - m) / (9 * s["in_channels"])
    return shapes


def describe(variant: dict) -> dict:
    modules = list(variant["model"].modules())
    return {"channels_last": variant["channels_last"], "gradient_masking": variant["masks"],
            "hetconv_layers": sum(isinstance(m, (MaskedHetConv2d, SparseHetConv2d, PublishedHetConv)) for m in modules),
            "triton_layers": sum(getattr(m, "backend", None) == "triton"
                                 for m in modules)}


# -- step 1: tests --------------------------------------------------------------------------------
def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def run_tests(timeout: float) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    results = {}
    for name, args in test_runs().items():
        command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *args]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as stopped:
            output, code = _text(stopped.stdout) + _text(stopped.stderr) + f"\ntimed out after {timeout:.0f} s", None
        found = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", line)]
        last = output.strip().splitlines()[-1:] or ["no output"]
        results[name] = {"command": " ".join(command[1:]), "returncode": code,
                         "summary": (found or last)[-1].strip("= "),
                         "seconds": round(time.perf_counter() - start, 1), "tail": output[-4000:]}
    return results


# -- step 2: the network --------------------------------------------------------------------------
def _autocast(mode: str, device: str = "cuda"):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bfloat16")


def _closures(variant: dict, x: torch.Tensor, target: torch.Tensor, mode: str):
    model = variant["model"]
    inp = x.contiguous(memory_format=CL) if variant["channels_last"] else x.contiguous()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def forward():
        model.eval()
        with torch.no_grad(), _autocast(mode):
            return model(inp)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(mode):
            loss = F.cross_entropy(model(inp), target)
        loss.backward()
        if variant["masks"]:
            mask_gradients(model)
        optimizer.step()

    return forward, train


def _input_grad(variant: dict, x: torch.Tensor, target: torch.Tensor, mode: str) -> torch.Tensor:
    model = copy.deepcopy(variant["model"]).train()
    inp = x.clone(memory_format=CL if variant["channels_last"] else torch.contiguous_format).requires_grad_()
    with _autocast(mode):
        loss = F.cross_entropy(model(inp), target)
    loss.backward()
    return inp.grad.float()


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the L2 norm."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@contextlib.contextmanager
def _ieee_float32():
    """cuDNN and cuBLAS in IEEE float32 (no TF32) inside the block."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def network(variants: dict, batch: int, mode: str, warmup: int, repeats: int) -> dict[str, dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device="cuda", generator=gen)
    target = torch.randint(0, 10, (batch,), device="cuda", generator=gen)
    # The reference is the masked form in float32. Under bfloat16 a variant may differ from it by
    # up to twice what the masked form itself does in bfloat16 (through 13 layers and train-mode
    # BatchNorm that is far more than one layer's rounding), and always by TOLERANCE[mode].
    masked = variants["masked"]
    with _ieee_float32():  # so that the float32 bound below grows with the variants' own TF32 error
        reference = _closures(masked, x, target, "float32")[0]().float(), _input_grad(masked, x, target, "float32")
    own = (_rel_error(_closures(masked, x, target, mode)[0](), reference[0]),
           _rel_error(_input_grad(masked, x, target, mode), reference[1]))
    bounds = [max(2 * e, TOLERANCE[mode]) for e in own]
    results: dict[str, dict] = {}
    forwards, trains = {}, {}
    for name, variant in variants.items():
        entry = results[name] = {"tolerance_output": bounds[0], "tolerance_input_grad": bounds[1]}
        try:
            forward, train = _closures(variant, x, target, mode)
            entry["rel_error_output"] = _rel_error(forward(), reference[0])
            entry["rel_error_input_grad"] = _rel_error(_input_grad(variant, x, target, mode), reference[1])
            entry["correct"] = entry["rel_error_output"] <= bounds[0] and entry["rel_error_input_grad"] <= bounds[1]
        except Exception as error:  # noqa: BLE001 -- one failing variant must not hide the others
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
            continue
        if entry["correct"]:
            forwards[name], trains[name] = forward, train
        else:
            entry["error"] = "not timed: differs from the masked form"
    for kind, fns in (("forward_ms", forwards), ("train_ms", trains)):
        if fns:
            for name, stats in interleaved_latency(fns, warmup=warmup, repeats=repeats).items():
                results[name][kind] = stats["median_ms"]
    for name, train in trains.items():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        train()
        torch.cuda.synchronize()
        results[name]["peak_train_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return results


# -- step 3: the layers ---------------------------------------------------------------------------
def layers(shapes: list[dict], batch: int, mode: str, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for s in shapes:
        row = dict(s)
        try:
            torch.manual_seed(0)
            sparse = SparseHetConv2d(s["in_channels"], s["out_channels"], s["part"], 3, s["stride"]).cuda().to(
                memory_format=CL)
            masked = sparse.to_masked().to(memory_format=CL)
            dense = nn.Conv2d(s["in_channels"], s["out_channels"], 3, s["stride"], 1, bias=False).cuda().to(
                memory_format=CL)
            x = torch.randn(batch, s["in_channels"], s["size"], s["size"]).contiguous(memory_format=CL)

            def call(fn):
                def run():
                    with torch.no_grad(), _autocast(mode):
                        return fn(x)
                return run

            fns = {"triton": call(lambda t: _op(sparse, t, "triton")),
                   "standard": call(dense), "masked": call(masked), "sparse_auto": call(sparse)}
            row["rel_error"] = _rel_error(fns["triton"](), fns["masked"]())
            if row["rel_error"] > TOLERANCE[mode]:
                row["error"] = "not timed: differs from the masked form"
                rows.append(row)
                continue
            notes = []
            for name in ("standard", "sparse_auto"):  # context only: a failure drops that column
                try:
                    fns[name]()
                except Exception as error:  # noqa: BLE001
                    notes.append(f"{name} failed: {type(error).__name__}: {error}"[:300])
                    del fns[name]
            times = interleaved_latency(fns, warmup=warmup, repeats=repeats)
            row.update({f"{k}_ms": v["median_ms"] for k, v in times.items()})
            if "standard_ms" in row:
                row["ideal_ms"] = row["standard_ms"] * s["useful_over_standard"]
                row["triton_over_ideal"] = row["triton_ms"] / row["ideal_ms"]
            if notes:
                row["error"] = "; ".join(notes)
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        rows.append(row)
    return rows


def _op(layer, x, impl: str):
    """The operator on a SparseHetConv2d's parameters with kernel ``impl``."""
    return ops.het_conv2d(x, layer.weight_kxk, layer.weight_1x1, None, tuple(layer.stride), layer.padding, (1, 1),
                          layer.part, impl)


# -- step 4: the backward's choice -----------------------------------------------------------------
BACKWARD_PAIRS = ("triton", "stock")
SHIPPED_PAIR = "triton"


def backward_choices(shapes: list[dict], batch: int, mode: str, warmup: int, repeats: int,
                     device: str = "cuda") -> list[dict]:
    """Forward + backward of the operator per layer shape with each of :data:`BACKWARD_PAIRS`.

    Each one's gradients (input, k x k and 1 x 1 weights) are checked against the stock one's before
    anything is timed; one that differs is reported and not timed.
    """
    rows = []
    for s in shapes:
        row = dict(s)
        try:
            torch.manual_seed(0)
            layer = SparseHetConv2d(s["in_channels"], s["out_channels"], s["part"], 3, s["stride"]).to(device)
            x = torch.randn(batch, s["in_channels"], s["size"], s["size"], device=device)
            x = x.contiguous(memory_format=CL).requires_grad_(True)
            grad = None

            def step(impl):
                def run():
                    nonlocal grad
                    with _autocast(mode, device):
                        y = _op(layer, x, impl)
                    if grad is None:
                        grad = torch.randn_like(y)
                    return torch.autograd.grad(y, (x, layer.weight_kxk, layer.weight_1x1), grad)
                return run

            fns = {impl: step(impl) for impl in BACKWARD_PAIRS}
            reference = fns["stock"]()
            errors = {}
            for name, fn in fns.items():
                got = fn()
                errors[name] = max(_rel_error(a.float(), b.float()) for a, b in zip(got, reference))
            row["rel_error"] = errors
            bad = [name for name, e in errors.items() if e > TOLERANCE[mode]]
            for name in bad:
                del fns[name]
            if bad:
                row["error"] = "not timed (gradients differ from stock): " + ", ".join(bad)
            times = interleaved_latency(fns, warmup=warmup, repeats=repeats)
            row["ms"] = {name: t["median_ms"] for name, t in times.items()}
            row["fastest"] = min(row["ms"], key=row["ms"].get)
            if SHIPPED_PAIR in row["ms"]:
                row["shipped_over_fastest"] = row["ms"][SHIPPED_PAIR] / row["ms"][row["fastest"]]
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        rows.append(row)
    return rows


# -- report ---------------------------------------------------------------------------------------
def environment(argv: list[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.is_available()
    return {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_check", *argv]), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or "none",
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "no CUDA device"}


def _ms(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def _variant_text(name: str, v: dict) -> str:
    layout = "channels-last" if v["channels_last"] else "NCHW"
    masking = ", gradient masking" if v["gradient_masking"] else ""
    return f"{name} ({v['hetconv_layers']} HetConv layers, {v['triton_layers']} on triton, {layout}{masking})"


def markdown(report: dict) -> str:
    env = report["environment"]
    out = ["# GPU check: triton backend", "",
           f"Card: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
           f"cuDNN {env['cudnn']}, Python {env['python']}.", "", f"Command: `{env['command']}`", "",
           f"Triton layers wired as: {report['triton_wiring']}.", "",
           "Variants: " + "; ".join(_variant_text(name, v) for name, v in report["variants"].items()) + ".", "",
           "## Tests", ""]
    for name, t in report["tests"].items():
        out.append(f"- {name}: {t}" if isinstance(t, str) else
                   f"- {name}: `{t['summary']}` (exit {t['returncode']}, {t['seconds']} s; `{t['command']}`)")
    out += ["", f"## VGG-16 / CIFAR-10, P = {report['part']}, batch {report['batch']}", ""]
    for mode, results in report.get("network", {}).items():
        out += [f"### {mode}", ""]
        if isinstance(results, str):
            out += [results, ""]
            continue
        out += ["Relative L2 errors against the masked form in float32 (tolerances in the JSON).", "",
                "| variant | forward ms | train step ms | peak train MiB | rel. error out / input grad | note |",
                "|---|---|---|---|---|---|"]
        for name, r in results.items():
            errors = f"{_ms(r.get('rel_error_output', '-'))} / {_ms(r.get('rel_error_input_grad', '-'))}"
            out.append(f"| {name} | {_ms(r.get('forward_ms', '-'))} | {_ms(r.get('train_ms', '-'))} | "
                       f"{_ms(r.get('peak_train_mib', '-'))} | {errors} | {r.get('error', '')} |")
        out.append("")
    out += ["## Per-layer forward (triton vs FLOP-ideal)", "",
            "Ideal = cuDNN `nn.Conv2d(M, N, 3)` time x useful / standard MACs.", ""]
    for mode, rows in report.get("layers", {}).items():
        if isinstance(rows, str):
            out += [f"### {mode}", "", rows, ""]
            continue
        out += [f"### {mode}", "", "| M | N | size | stride | useful/std | triton ms | ideal ms | triton/ideal | "
                "standard ms | masked ms | sparse auto ms | note |", "|---" * 12 + "|"]
        for r in rows:
            out.append(f"| {r['in_channels']} | {r['out_channels']} | {r['size']} | {r['stride']} | "
                       f"{r['useful_over_standard']:.3f} | {_ms(r.get('triton_ms', '-'))} | "
                       f"{_ms(r.get('ideal_ms', '-'))} | {_ms(r.get('triton_over_ideal', '-'))} | "
                       f"{_ms(r.get('standard_ms', '-'))} | {_ms(r.get('masked_ms', '-'))} | "
                       f"{_ms(r.get('sparse_auto_ms', '-'))} | {r.get('error', '')} |")
        out.append("")
    pairs = list(BACKWARD_PAIRS)
    out += ["## Backward: which kernels compute the gradients", "",
            "Forward + backward of the operator per layer, ms, with `impl=\"triton\"` (Triton input gradient at "
            f"stride 1) and `impl=\"stock\"` (`impl=\"auto\"` runs `{SHIPPED_PAIR}`).", ""]
    for mode, rows in report.get("backward", {}).items():
        if isinstance(rows, str):
            out += [f"### {mode}", "", rows, ""]
            continue
        out += [f"### {mode}", "", "| M | N | size | stride | " + " | ".join(pairs) + " | fastest | shipped/fastest | note |",
                "|---" * (7 + len(pairs)) + "|"]
        for r in rows:
            ms = r.get("ms", {})
            out.append(f"| {r['in_channels']} | {r['out_channels']} | {r['size']} | {r['stride']} | "
                       + " | ".join(_ms(ms.get(p, '-')) for p in pairs)
                       + f" | {r.get('fastest', '-')} | {_ms(r.get('shipped_over_fastest', '-'))} | {r.get('error', '')} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="build everything on the CPU, time nothing")
    parser.add_argument("--part", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--test-timeout", type=float, default=150.0, help="seconds per pytest run")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    reason = "not run: --dry-run" if torch.cuda.is_available() else "not run: no CUDA"
    variants, how = build_variants(args.part)
    shapes = layer_shapes(variants["masked"]["model"])
    report = {"environment": environment(argv), "part": args.part, "batch": args.batch, "triton_wiring": how,
              "variants": {name: describe(v) for name, v in variants.items()}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every step: a run cut short still reports what it did
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(report) + "\n")

    def step(key: str, mode: str, work) -> None:
        try:
            report.setdefault(key, {})[mode] = work()
        except Exception as error:  # noqa: BLE001 -- one failing step must not lose the others
            report.setdefault(key, {})[mode] = f"failed: {type(error).__name__}: {error}"[:800]
        save()

    if args.skip_tests:
        report["tests"] = {name: "not run: --skip-tests" for name in test_runs()}
    else:
        report["tests"] = run_tests(args.test_timeout) if cuda else {name: reason for name in test_runs()}
    save()
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the published training script does
        for mode in MODES:
            def timed_network(mode=mode):
                fresh = build_variants(args.part)[0]  # each precision gets fresh variants: timing trains them
                for v in fresh.values():
                    v["model"].cuda()
                return network(fresh, args.batch, mode, args.warmup, args.repeats)
            step("network", mode, timed_network)
        del variants
        for mode in MODES:
            step("layers", mode, lambda mode=mode: layers(shapes, args.batch, mode, args.warmup, args.repeats))
        for mode in MODES:
            step("backward", mode, lambda mode=mode: backward_choices(shapes, args.batch, mode, args.warmup,
                                                                      args.repeats))
    else:  # the closures are built (optimizers, layouts) but not called
        for v in variants.values():
            _closures(v, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), "float32")
        report["network"] = {mode: reason for mode in MODES}
        report["layers"] = {mode: [dict(s, error=reason) for s in shapes] for mode in MODES}
        report["backward"] = {mode: [dict(s, error=reason) for s in shapes] for mode in MODES}
        save()
    sys.stdout.write(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}\n")
    if not cuda and not args.dry_run:
        sys.stderr.write("no CUDA device: nothing was tested or timed (see the report)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
