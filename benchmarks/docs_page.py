"""docs/performance.md, regenerated from a benchmark run (``make bench``).

``python -m benchmarks.docs_page benchmarks/results/bench.json [--docs docs/performance.md]``
re-renders it, and the markdown reports and plot beside the JSON, without timing anything again.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .harness import deploy_report as D
from .harness import report as R

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

NET = ("network", "vgg16_cifar")


def _layer_row(result, shape, part, mode, variant):
    return R._index(result["rows"]).get(("layer", shape, part, mode, variant))


def _first_layer_note(result) -> str:
    """How far the grouped k x k convolution of the first HetConv layer is from its FLOP-ideal."""
    batch = result["config"]["batch"]
    shape = "64->64 @32x32"
    lines = []
    for part in (2, 4):
        row = _layer_row(result, shape, part, f"forward_b{batch}", "sparse_auto_cl")
        if row and row.get("over_ideal"):
            lines.append(f"P={part}: {row['median_ms']:.2f} ms, {row['over_ideal']:.2f}x its FLOP-ideal")
    return "; ".join(lines) if lines else "(layer shapes not measured in this run)"


def _train_note(result) -> str:
    batch = result["config"]["batch"]
    shape, parts = "64->64 @32x32", []
    for part in (2, 4, 8):
        cl = _layer_row(result, shape, part, f"train_b{batch}", "sparse_auto_cl")
        nchw = _layer_row(result, shape, part, f"train_b{batch}", "published")
        if cl and nchw and "median_ms" in cl and "median_ms" in nchw:
            parts.append(f"P={part}: {cl['median_ms']:.1f} ms channels-last vs {nchw['median_ms']:.1f} ms published NCHW")
    return "; ".join(parts) if parts else "layer shapes not measured in this run"


def _ratio_text(result, mode: str, variant: str, base: str, parts) -> str:
    index = R._index(result["rows"])
    cells = []
    for p in parts:
        a, b = index.get((*NET, p, mode, variant)), index.get((*NET, p, mode, base))
        if a and b and "median_ms" in a and "median_ms" in b:
            cells.append(f"P={p}: {a['median_ms'] / b['median_ms']:.2f}")
    return ", ".join(cells) or "not measured"


def _layer_ideal(result, part: int) -> str:
    batch = result["config"]["batch"]
    cells = []
    for shape in ("64->64 @32x32", "64->128 @16x16", "128->128 @16x16", "512->512 @2x2"):
        row = _layer_row(result, shape, part, f"forward_b{batch}", "sparse_auto_cl")
        if row and row.get("over_ideal"):
            cells.append(f"{shape} {row['over_ideal']:.2f}x")
    return ", ".join(cells) or "not measured"


def _kernel_efficiency(result, part: int, mode: str) -> str:
    """The fused kernel's effective GFLOP/s per layer shape, and as a share of the GEMM peak."""
    peak = result["machine"].get("sgemm_gflops")
    cells = []
    for shape in dict.fromkeys(r["shape"] for r in result["rows"] if r["level"] == "layer"):
        row = _layer_row(result, shape, part, mode, "sparse_fused_cl")
        if row and row.get("gflops"):
            cells.append(f"{shape} {row['gflops']:.0f}" + (f" ({row['gflops'] / peak:.0%})" if peak else ""))
    return ", ".join(cells) or "not measured"


def _bound(result, parts=(4, 8, 16, 32, 64)) -> str:
    """Useful MACs over the masked form's (k = 3): what computing only the existing kernels saves
    at equal speed per MAC, (9m + M - m) / (9m + M) = (P + 8) / (P + 9)."""
    measured = set(result["config"]["parts"])
    return ", ".join(f"P={p}: {(p + 8) / (p + 9):.3f}" for p in parts if p in measured) or "not measured"


def _misses(result) -> list[str]:
    batch = result["config"]["batch"]
    fwd, train = f"forward_b{batch}", f"train_b{batch}"
    peak = result["machine"].get("sgemm_gflops")
    peak_text = f"{peak:.0f} GFLOP/s" if peak else "not measured in this run"
    return [
        "* **How far skipping the zeros alone goes.** The masked form multiplies N (9 M / P + M) weights per "
        "pixel, N M / P of them zeros; the useful ones are N (9 M / P + M - M / P). At equal speed per "
        f"multiply-accumulate the HetConv layers' time ratio is at best {_bound(result)}: the masked form "
        "wastes little, so every ratio below that bound is the fused kernel running faster per useful MAC than "
        "oneDNN's grouped and 1 x 1 convolutions, and BatchNorm, ReLU, pooling (and in training the optimizer) "
        "do not shrink at all. The fused forward's effective GFLOP/s per layer at P = 4, "
        f"{fwd} (in brackets the share of this machine's float32 GEMM peak, {peak_text}, the faster of MKL's torch.mm and oneDNN's 1 x 1 convolution): "
        f"{_kernel_efficiency(result, 4, fwd)}; at P = 64: {_kernel_efficiency(result, 64, fwd)}. Where the share "
        "is high, a faster kernel has little left to find; where it is low (few filters per group at P = 64, "
        "the 2 x 2 and 4 x 4 layers), each loaded value feeds too few multiplies.",
        "* **Inference vs the masked form** (shipped / masked_cl: "
        f"{_ratio_text(result, fwd, 'sparse_auto_cl', 'masked_cl', (4, 8, 16, 32, 64))}). The fused kernel "
        "multiplies only the useful weights, but at P = 4 the masked form wastes only 1/12 of its "
        "multiply-accumulates (N M / P zeros per pixel against N (9 M / P + M - M / P) useful ones), so most "
        "of the gain must come from running faster than oneDNN per useful MAC; that happens where oneDNN's "
        "grouped convolutions are slow (few channels per group, large P) and where the side taps run by "
        "input column (groups of 16 or 32 filters at stride 1), and less where a group of 8 filters at "
        "P < 16 leaves half of each 16-lane vector idle under the group masks (64->64 at P = 8, 128->128 at "
        "P = 16: `layers.md`). BatchNorm, ReLU and pooling are the same in both forms and do not shrink.",
        "* **Training step vs the masked form** (shipped / masked_cl: "
        f"{_ratio_text(result, train, 'sparse_auto_cl', 'masked_cl', (4, 8, 16, 32, 64))}). The backward is two "
        "more passes of the same size (input gradient: the forward kernel on the transposed layer; weight "
        "gradient: one BLAS product for the centre rows and a tiled reduction over pixels for the side taps). "
        "The side-tap reduction of narrow groups is broadcast-bound (one 16-lane multiply per input value "
        "loaded) and the training step also runs BatchNorm, ReLU and pooling backward and the optimizer, "
        "which do not shrink with P; `auto` keeps `dense` for the few training signatures where it is faster.",
        "* **Training step vs the published form** (published / shipped: "
        f"{_ratio_text(result, train, 'published', 'sparse_auto_cl', (4, 8))}). On this CPU oneDNN trains a "
        "standard convolution faster in NCHW than in channels-last (standard_cl / standard_nchw: "
        f"{_ratio_text(result, train, 'standard_cl', 'standard_nchw', (1,))}), so the published NCHW code loses "
        "nothing to its layout in training, and the shipped model gains only what its HetConv layers compute "
        "faster.",
        f"* **Per-layer forward vs the FLOP-ideal.** At P = 4: {_layer_ideal(result, 4)}; at P = 64: "
        f"{_layer_ideal(result, 64)}. The ideal is the standard convolution's time scaled by the useful-MAC "
        "ratio; the standard convolution runs near the CPU's peak on wide layers, while a HetConv layer with "
        "few filters per group (P = 64: 1 to 8) has too little work per loaded value to reach it, and the "
        "small 2 x 2 and 4 x 4 layers beat it because the standard convolution itself is slow there.",
        "* **Batch 1** (shipped / published, forward_b1: "
        f"{_ratio_text(result, 'forward_b1', 'sparse_auto_cl', 'published', (2, 4, 8, 64))}). Nothing derived "
        "from the weights is cached between calls (no write to them can be missed). Calls of at most 64 output "
        "pixels (the last layers at batch 1) read the weights where they lie, a dot product per output; larger "
        "calls lay the weights out into the kernel's panels first, about the parameters read and written once "
        "per call, which is a visible share of a mid-size layer's time at batch 1.",
    ]


def _bf16_units(result) -> str:
    """What runs oneDNN's bfloat16 kernels on the benchmark's CPU."""
    flags = result["machine"].get("isa_flags", [])
    if "amx_bf16" in flags or "AMX" in result["machine"].get("isa", ""):
        return "AMX here"
    if "avx512_bf16" in flags:
        return "AVX-512-BF16 here"
    return "this CPU has no bfloat16 instructions"


def _profile(result, part, mode, variant) -> str:
    for p in result.get("profiles", []):
        if p["part"] == part and p["mode"] == mode and p["variant"] == variant:
            return "```\n" + p["table"].rstrip() + "\n```"
    return "(not profiled in this run)"


GPU_REPORT = Path(__file__).resolve().parent / "results" / "gpu" / "gpu_check.md"


def _gpu_section() -> list[str]:
    """What was (or was not) measured on a GPU: the committed ``make gpu-check`` report, if any."""
    out = ["## On a GPU", ""]
    if GPU_REPORT.is_file():
        card = next((line for line in GPU_REPORT.read_text().splitlines() if line.startswith("Card:")), "")
        out += [f"`make gpu-check` results: `benchmarks/results/gpu/gpu_check.md` ({card.rstrip('.')}).", ""]
    else:
        out += ["Not measured. Every figure on this page is from the CPU named above; the `triton` backend "
                "(one fused kernel that computes only the kernels that exist) has been checked for "
                "correctness only, under Triton's CPU interpreter in the test suite. `make gpu-check` "
                "(`python -m benchmarks.gpu_check`) runs the CUDA tests and times VGG-16 on a GPU, per layer "
                "against the FLOP-ideal and per backward kernel choice, and writes its report to "
                "`benchmarks/results/gpu/`; no GPU was available to run it yet.", ""]
    return out


def page(result, image_name: str | None, layers_image: str | None = None) -> str:
    batch = result["config"]["batch"]
    fwd, train = f"forward_b{batch}", f"train_b{batch}"
    quick = " (quick run: fewer parts, shapes and repeats)" if result["config"]["quick"] else ""
    out = [
        "# Performance: HetConv's FLOP savings in wall-clock time",
        "",
        "Generated by `make bench` (`python -m benchmarks.bench`, then `benchmarks/docs_page.py`) from "
        f"`benchmarks/results/bench.json`{quick}. Per-layer tables: `benchmarks/results/layers.md`; "
        "profiles: `benchmarks/results/profiles.md`.",
        "",
        f"* **Machine:** {R.machine_line(result)}.",
        f"* **Command:** `{result['command']}` ({result['seconds'] / 60:.1f} min).",
        f"* **Method:** VGG-16 / CIFAR-10 (and each of its HetConv layer shapes), float32, batch {batch} "
        "(and 1 for inference). For each P every variant is built from the same weights, their outputs "
        "are checked against the published form, then they are warmed up and timed in "
        f"{result['config']['repeats']} interleaved rounds (rotating order); medians. A training step is "
        "forward, cross-entropy, backward and SGD (momentum 0.9, weight decay 5e-4); the published form "
        "masks `pwc.weight.grad` after backward, as its training script does. FLOP-ideal = the standard "
        "convolution's channels-last time x useful MACs(P) / MACs(P=1). Effective GFLOP/s = useful MACs "
        "x 2 / time (x 3 for a training step).",
        "",
        "Variants: `published` (gwc(x) + pwc(x), NCHW, gradient masking after backward: the code of the "
        "paper), `masked_*` (`MaskedHetConv2d`, mask inside forward), `sparse_<backend>_cl` "
        "(`SparseHetConv2d` pinned to a backend), `sparse_auto_cl` (what `vgg16_cifar(part)` and "
        "`to_sparse` ship: channels-last, `backend=\"auto\"`), `*_fused` (after `fuse_bn`), `*_compiled` "
        "(`fuse_bn` + `torch.compile` with inductor freezing), `standard_*` (P = 1).",
        "",
    ]
    if image_name:
        out += [f"![latency vs P]({image_name})", ""]
    for mode, title in ((fwd, "Inference"), (train, "Training step"), ("forward_b1", "Inference, batch 1")):
        out += [f"## {title}: whole network, {mode} (ms; in brackets the speed-up over the published form)", "",
                R.latency_table(result, *NET, mode), "", "Shipped model (`sparse_auto_cl`):", "",
                R.efficiency_table(result, *NET, mode), ""]
    out += [
        "## Targets", "", R.targets_table(result), "",
        *_gpu_section(),
        "## Memory: training step, whole network", "",
        "MiB, each variant in a fresh process: the peak of live tensor bytes during a training step "
        "(exact: every operator's outputs tracked until freed; model, gradients and optimizer state "
        "included) / the peak resident memory above the process baseline (what the OS sees; allocator "
        "overhead included, a few percent of run-to-run noise) / parameter + gradient + optimizer state "
        "(+ buffers over 0.1 MiB: the published form's float masks). The sparse form's training state is exactly 3 x 4 bytes x the HetConv parameter count "
        "(checked in the targets table); the masked forms carry N M / P zero weights per layer, each "
        "with a gradient and a momentum buffer.", "",
        R.memory_table(result), "",
        "## What `backend=\"auto\"` picks", "",
        "On the CPU, `auto` proposes the compiled `fused` kernel (`sparse_hetconv/backends/fused.py`, design "
        "§11) for every eager float32 2-D call it computes, and in its default mode "
        "(`autotune.set_mode(\"confirm\")`) keeps it only where a one-off timing on this machine confirms it "
        "beats `dense` (the masked form's own oneDNN kernels); elsewhere the stock cost model decides between "
        "`dense` and `grouped`. The choice is made once per call signature (shape, P, batch, dtype, memory "
        "format, training), so a CPU with other vector units or core counts makes its own (`python -m "
        "benchmarks.auto_isa` runs the model with oneDNN, MKL and the fused kernels capped to AVX2). bfloat16 "
        f"and autocast calls stay on oneDNN's bfloat16 kernels ({_bf16_units(result)}); on a CPU without bfloat16 "
        "instructions PyTorch's bfloat16 is itself many times slower than float32 (a training step 14x, `python -m "
        "benchmarks.bf16_step` capped to AVX2: README, \"bfloat16\"), so run float32 there; graph capture records "
        "stock operators. `layer.resolved_backend` shows what a layer used; `autotune.resolve_backends(model, x)` "
        "lists them (`pin=True` fixes them); `\"measure\"` times every candidate, `\"model\"` trusts the cost "
        "model alone. Per layer, against the fastest backend measured in this run (an entry in brackets "
        "names a faster backend and auto's loss):", "",
        R.auto_table(result), "",
        "## Where the time goes (misses explained)", "",
        *([f"![forward time per layer]({layers_image})", "",
           f"Forward time of each VGG-16 layer shape ({fwd}, log scale): the stock formulation (`sparse_dense_cl`: "
           "oneDNN's grouped k x k plus a dense 1 x 1 over the scattered values), the masked form, the `fused` "
           "kernel and the FLOP-ideal.", ""] if layers_image else []),
        *_misses(result),
        "", f"Profile of the shipped model, P = 4, {train} (3 steps):", "",
        _profile(result, 4, train, "sparse_auto_cl"), "",
        f"Profile of the masked form in channels-last, P = 4, {train} (3 steps):", "",
        _profile(result, 4, train, "masked_cl"), "",
        f"Profile of the shipped model, P = 4, {fwd} (3 calls):", "",
        _profile(result, 4, fwd, "sparse_auto_cl"), "",
    ]
    return "\n".join(out)


def deploy_section(deploy: dict | None, image_name: str | None, capped: dict | None = None) -> list[str]:
    """The deployment results (``benchmarks/deploy.py``), or a line saying they were not run;
    ``capped``: a second run with PyTorch's oneDNN / MKL capped to AVX2 (``deploy_avx2/deploy.json``)."""
    out = ["## Deployment: ONNX Runtime, OpenVINO and int8", ""]
    if deploy is None:
        return out + ["Not measured in this run (`python -m benchmarks.deploy`, part of `make bench`).", ""]
    batch = deploy["config"]["batch"]
    out += [f"From `benchmarks/results/deploy.json`: `{deploy['command']}` ({deploy['seconds'] / 60:.1f} min) on "
            f"{D.machine_line(deploy)}. Each variant is built from the same weights (BatchNorm statistics of "
            "random batches, so folding them is not trivial) and checked against the PyTorch model; medians of "
            f"{deploy['config']['repeats']} interleaved rounds; in brackets the speed-up over the shipped model in "
            "PyTorch eager. `ort_published` is the published form (gwc + pwc, NCHW) exported with a plain "
            "`torch.onnx.export`; `ort` and `openvino` are `sparse_hetconv.deploy.export_onnx` for that runtime; "
            "`int8_pt2e` is `deploy.quantize` (torchao PT2E, X86InductorQuantizer) + `compile_int8`; `int8_ort` is "
            "`deploy.quantize_onnx` (QDQ, per-channel weights) of the `ort` file. Calibration: scikit-learn's "
            "digits resized to the input.", ""]
    if image_name:
        out += [f"![deployment latency]({image_name})", ""]
    for model in deploy["config"]["models"]:
        for b in (1, batch):
            out += [f"### {model}, batch {b} (ms)", "", D.latency_table(deploy, model, b), ""]
    out += [f"### Targets (VGG-16 / CIFAR-10, P = 4, batch {batch})", "", D.targets_table(deploy), "",
            "### The export forms of the HetConv layers, per runtime (VGG-16; ms and ratio to `masked`)", "",
            D.forms_table(deploy), "", f"### ONNX Runtime's profile, VGG-16 P = 4, batch {batch}", "",
            D.ort_profile_table(deploy), "", "### Misses explained", "", *(D.misses(deploy) or ["None in this run."]),
            "", "### Checks against PyTorch", "", D.checks_table(deploy), ""]
    if capped is not None:
        cap = capped["machine"].get("isa_cap")
        out += [f"### PyTorch's oneDNN / MKL capped to {cap}", "",
                f"From `benchmarks/results/deploy_avx2/deploy.json`: `ONEDNN_MAX_CPU_ISA={cap} "
                f"MKL_ENABLE_INSTRUCTIONS={cap} SPARSE_HETCONV_MAX_ISA={str(cap).lower()} {capped['command']}` "
                f"({capped['seconds'] / 60:.1f} min), the same machine. The cap reaches PyTorch's kernels (eager, "
                "compiled, int8 PT2E) and OpenVINO's CPU plugin, which reads the same oneDNN variable (compare its "
                "P = 1 row with the native run's); ONNX Runtime's MLAS chooses its kernels by the CPU it finds, so "
                "its rows are this CPU's own.", ""]
        for model in capped["config"]["models"]:
            out += [f"{model}, batch {capped['config']['batch']} (ms):", "",
                    D.latency_table(capped, model, capped["config"]["batch"]), ""]
        out += ["Targets:", "", D.targets_table(capped), "", *D.misses(capped), ""]
    return out


def write(result, path: Path, image: Path | None, deploy: dict | None = None) -> list[Path]:
    """Write ``path`` (and copy the plots beside it); returns the files written. ``deploy``: the
    deployment results (default: ``benchmarks/results/deploy.json`` if it exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    image_name = None
    if image is not None and Path(image).is_file():
        image_name = "performance_latency_vs_p.png"
        shutil.copyfile(image, path.parent / image_name)
        written.append(path.parent / image_name)
    layers_image = None
    if image is not None and (Path(image).parent / "layers.png").is_file():
        layers_image = "performance_layers.png"
        shutil.copyfile(Path(image).parent / "layers.png", path.parent / layers_image)
        written.append(path.parent / layers_image)
    if deploy is None and (RESULTS_DIR / "deploy.json").is_file():
        deploy = json.loads((RESULTS_DIR / "deploy.json").read_text())
    deploy_image = None
    if deploy is not None and (RESULTS_DIR / "deploy.png").is_file():
        deploy_image = "performance_deploy.png"
        shutil.copyfile(RESULTS_DIR / "deploy.png", path.parent / deploy_image)
        written.append(path.parent / deploy_image)
    capped_path = RESULTS_DIR / "deploy_avx2" / "deploy.json"
    capped = json.loads(capped_path.read_text()) if deploy is not None and capped_path.is_file() else None
    text = (page(result, image_name, layers_image) + "\n"
            + "\n".join(deploy_section(deploy, deploy_image, capped)) + "\n")
    path.write_text(text)
    written.append(path)
    return written


def write_deploy(deploy: dict, path: Path) -> list[Path]:
    """Regenerate ``path`` with new deployment results (the latency results from bench.json)."""
    bench = RESULTS_DIR / "bench.json"
    if not bench.is_file():
        return []
    return write(json.loads(bench.read_text()), path, RESULTS_DIR / "latency_vs_p.png", deploy)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a bench.json written by python -m benchmarks.bench")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the page to write (default docs/performance.md)")
    args = parser.parse_args(argv)
    result = json.loads(args.json.read_text())
    for path in R.write_all(result, args.json.parent):  # bench.md, layers.md, profiles.md, the plot
        print(f"wrote {path}")
    for path in write(result, args.docs, args.json.parent / "latency_vs_p.png"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
