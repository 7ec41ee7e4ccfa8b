"""``make reproduce``: the paper's accuracy-vs-P table on a real data set, trained with this library.

HetConv (Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120, Table 1) trains VGG-16 on
CIFAR-10 at P = 1 ... 64 and reports that accuracy holds as the MACs fall. CIFAR-10 cannot be
fetched here; Fashion-MNIST installs from the system's packages (``apt-get install
dataset-fashion-mnist``). This driver trains the same VGG-16 (``vgg16_cifar``, every layer 64 to
512 channels; the 28x28 grey images zero-padded to 32x32 and fed to its RGB stem) at every P with
one recipe (:data:`RECIPES`), three seeds at P = 1 and P = 4, and at P = 4 the published form
(``gwc + pwc`` with the gradients masked in the loop), the masked form and the sparse form from the
same initial weights and the same batches. Each run records test accuracy, MACs and parameters
(the paper's convention), seconds per epoch and images/s, and the machine. The trained P = 4
model then goes through the whole chain (checkpoint, ``to_masked``, ``to_sparse``, ONNX Runtime,
OpenVINO, int8) and must keep its accuracy within 0.5 points everywhere.

Writes ``benchmarks/results/reproduce.json`` (one record per run; a run already there is skipped,
so the table can be completed over several sittings), ``docs/reproduce.md`` with a plot
(:mod:`.reproduce_report`) and executes ``notebooks/05_reproduce.ipynb``. ``--quick`` is a small
run of every step (minutes; ``results/reproduce_quick.json``, its page in ``results/tmp/``);
``--report-only`` regenerates the page and the notebook from a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparse_hetconv import autotune, count_macs, count_params, to_masked, to_sparse
from sparse_hetconv.models import vgg16_cifar
from sparse_hetconv.training import evaluate, load_fashion_mnist, normalize, train_epoch

from . import RESULTS
from . import reproduce_report as report
from .harness.machine import machine_info, pin_mmap_threshold
from .harness.published import mask_gradients, published_from_masked

ROOT = RESULTS.parent.parent
INPUT = (3, 32, 32)
#: The recipe: the published one (SGD, momentum, weight decay, batch, crop and flip) with the
#: training set, the epochs and the schedule cut so that the full table fits in about two hours on
#: two cores. Sizing: make bench's training-step medians (docs/performance.md, 2 cores, batch 32)
#: summed over the 13 runs of the plan give 44 ms per training image (P = 1 three times at 5.5 ms,
#: P = 4 five times at 2.8-3.4 ms, the other P at 1.8-3.9 ms), so 12,000 images x 10 epochs is
#: about 88 min of training, plus about 10 min of testing, the autotuner's first timings and the
#: chain check. "quick" runs every step on a few images, with the autotuner's cost model instead of
#: its one-off timings (which would take most of a one-epoch run).
RECIPES = {
    "full": {"dataset": "fashion_mnist", "train_subset": 12000, "test_subset": None, "epochs": 10, "batch_size": 128,
             "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [6, 8], "gamma": 0.1,
             "crop_padding": 4, "flip": True, "calibration_images": 512, "seeds": 3, "autotune": "confirm"},
    # "short": the full plan on half the images and 6 epochs (about 35 min on 2 cores), the cost model
    # choosing backends; for a session without two quiet hours. Its page says it is not the full table.
    "short": {"dataset": "fashion_mnist", "train_subset": 6000, "test_subset": None, "epochs": 6, "batch_size": 128,
              "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [4, 5], "gamma": 0.1,
              "crop_padding": 4, "flip": True, "calibration_images": 512, "seeds": 3, "autotune": "model"},
    "quick": {"dataset": "fashion_mnist", "train_subset": 256, "test_subset": 500, "epochs": 1, "batch_size": 128,
              "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [], "gamma": 0.1,
              "crop_padding": 4, "flip": True, "calibration_images": 64, "seeds": 2, "autotune": "model"},
}
PARTS = (1, 2, 4, 8, 16, 32, 64)
CHAIN_PART, TOLERANCE_POINTS = 4, 0.5


def plan(recipe: dict) -> list[tuple[int, str, int]]:
    """(P, form, seed) of every run, the most informative first: the three forms at P = 4, every P
    once, then the other seeds at P = 1 and P = 4."""
    runs = [(4, "sparse", 0), (4, "masked", 0), (4, "published", 0)]
    runs += [(part, "standard" if part == 1 else "sparse", 0) for part in PARTS if part != 4]
    runs += [(part, "standard" if part == 1 else "sparse", seed)
             for seed in range(1, recipe["seeds"]) for part in (1, 4)]
    return runs


def build(part: int, form: str, seed: int):
    """The model of a run from one initialisation per (P, seed): the masked form's, converted exactly
    into the others, so the three forms at P = 4 start from the same weights. Returns the model,
    the hook the training loop calls after ``backward()`` and the model that is counted."""
    torch.manual_seed(seed)
    masked = vgg16_cifar(part=part, form="masked")
    if form == "published":  # NCHW, gwc + pwc, the gradients masked after backward: the seed's loop
        return published_from_masked(masked), mask_gradients, masked
    return (to_sparse(masked) if form == "sparse" else masked), None, masked


def train_run(part: int, form: str, seed: int, data, recipe: dict, machine: dict, log) -> tuple[dict, torch.nn.Module]:
    """Train one run and return its record and the trained model."""
    began_run = time.perf_counter()
    model, after_backward, counted = build(part, form, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                                weight_decay=recipe["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, recipe["milestones"], recipe["gamma"])
    history = []
    for epoch in range(recipe["epochs"]):
        lr = optimizer.param_groups[0]["lr"]
        began = time.perf_counter()
        loss, train_acc = train_epoch(model, optimizer, data, epoch, seed, recipe["batch_size"],
                                      recipe["crop_padding"], recipe["flip"], after_backward=after_backward)
        seconds = time.perf_counter() - began
        scheduler.step()
        history.append({"epoch": epoch + 1, "lr": lr, "loss": loss, "train_acc": train_acc, "seconds": seconds})
        log(f"  epoch {epoch + 1}/{recipe['epochs']}  loss {loss:.4f}  train {100 * train_acc:.2f}%  {seconds:.1f} s "
            f"({len(data.train_labels) / seconds:.0f} images/s)")
    accuracy = evaluate(model, data.test_images, data.test_labels, 500, mean=data.mean, std=data.std)
    per_epoch = statistics.median(h["seconds"] for h in history)
    record = {
        "dataset": recipe["dataset"], "form": form, "part": part, "seed": seed, "test_acc": accuracy,
        "macs": count_macs(counted, (1, *INPUT)), "params": count_params(counted),
        "params_stored": count_params(model, stored=True), "epochs": recipe["epochs"],
        "train_images": len(data.train_labels), "test_images": len(data.test_labels),
        "seconds_per_epoch": per_epoch, "images_per_s": len(data.train_labels) / per_epoch, "history": history,
        "memory_format": "NCHW" if form == "published" else "channels_last",
        "machine": machine, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_seconds": time.perf_counter() - began_run,  # building, training and testing
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the machine
    }
    log(f"  test accuracy {100 * accuracy:.2f}%, {per_epoch:.1f} s per epoch (median)")
    return record, model


def chain_check(model: torch.nn.Module, data, recipe: dict, work: Path, log) -> dict:
    """The trained model through a checkpoint, the converters and the deployment runtimes, each
    evaluated on the whole test split against the model as trained."""
    from sparse_hetconv import deploy
    from sparse_hetconv.checkpoint import load_model

    began = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "p4_sparse_seed0.pt"
    torch.save(model.state_dict(), checkpoint)
    loaded = load_model(checkpoint)[0].eval()  # form, part and classes read from the weights
    calibration = normalize(data.train_images[:recipe["calibration_images"]], data.mean, data.std)
    steps = {
        "sparse, as trained (PyTorch)": lambda: model.eval(),
        "checkpoint -> load_model (sparse)": lambda: loaded,
        "to_masked (PyTorch)": lambda: to_masked(loaded),
        "to_sparse(to_masked) (PyTorch)": lambda: to_sparse(to_masked(loaded)),
        "published gwc + pwc (PyTorch)": lambda: published_from_masked(to_masked(loaded)).eval(),
        "ONNX Runtime, float32": lambda: _session(deploy, loaded, work / "p4.onnx", "onnxruntime"),
        "OpenVINO, float32": lambda: _session(deploy, loaded, work / "p4_openvino.onnx", "openvino"),
        "int8 PT2E + Inductor": lambda: _int8_program(deploy, loaded, calibration),
        "int8 ONNX Runtime (QDQ)": lambda: _int8_session(deploy, loaded, calibration, work),
    }
    rows, reference = [], None
    for name, make in steps.items():
        try:
            predict = make()
        except ImportError as error:  # a runtime of the deploy extra that is not installed
            rows.append({"name": name, "skipped": str(error)})
            log(f"  {name}: skipped ({error})")
            continue
        accuracy, logits = evaluate(predict, data.test_images, data.test_labels, 500, return_logits=True,
                                    mean=data.mean, std=data.std)
        reference = (accuracy, logits) if reference is None else reference
        row = {"name": name, "test_acc": accuracy, "delta_points": 100 * (accuracy - reference[0]),
               "agreement": float((logits.argmax(1) == reference[1].argmax(1)).float().mean())}
        row["ok"] = abs(row["delta_points"]) <= TOLERANCE_POINTS
        rows.append(row)
        log(f"  {name}: {100 * accuracy:.2f}% ({row['delta_points']:+.2f} points, top-1 agreement "
            f"{100 * row['agreement']:.2f}%)")
    return {"part": CHAIN_PART, "form": "sparse", "seed": 0, "tolerance_points": TOLERANCE_POINTS, "rows": rows,
            "ok": all(r.get("ok", True) for r in rows), "seconds": time.perf_counter() - began}


def _session(deploy, model, path: Path, runtime: str):
    if not deploy.runtimes.available(runtime):
        raise ImportError(f"{runtime} is not installed")
    deploy.export_onnx(model, path, INPUT, runtime=runtime, check=(runtime,))
    session = deploy.runtimes.load(runtime, path)
    return lambda x: deploy.runtimes.run(session, x)


def _int8_program(deploy, model, calibration):
    compiled = deploy.compile_int8(deploy.quantize(model, calibration, input_size=INPUT), calibration[:2])
    return lambda x: compiled(x)  # an exported program refuses eval(), which evaluate() calls on modules


def _int8_session(deploy, model, calibration, work: Path):
    if not deploy.runtimes.available("onnxruntime"):
        raise ImportError("onnxruntime is not installed")
    if not (work / "p4.onnx").is_file():
        deploy.export_onnx(model, work / "p4.onnx", INPUT, check=("onnxruntime",))
    deploy.quantize_onnx(work / "p4.onnx", work / "p4_int8.onnx", calibration, INPUT)
    session = deploy.runtimes.load("onnxruntime", work / "p4_int8.onnx")
    return lambda x: deploy.runtimes.run(session, x)


def load_results(path: Path, name: str, recipe: dict) -> dict:
    """The results so far, or a new file; refuses a file of another recipe (its runs would mix)."""
    if not path.exists():
        return {"recipe_name": name, "recipe": recipe, "runs": [], "chain": None}
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a reproduce JSON ({error}); move it away to start a new table") from None
    if results.get("recipe") != recipe:
        raise ValueError(f"{path} holds runs of another recipe ({results.get('recipe_name')!r}: "
                         f"{results.get('recipe')}); pass another --json, or move it away to start again")
    return results


def save_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, path)


def execute_notebook(notebook: Path, results: Path, log) -> None:
    """Run the notebook on the results just written and save it with its outputs."""
    import nbclient
    import nbformat

    book = nbformat.read(notebook, as_version=4)
    # The kernel reads these results and imports this checkout's package.
    env = {"SPARSE_HETCONV_REPRODUCE": str(results.resolve()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(book, kernel_name="python3", timeout=1200,
                                resources={"metadata": {"path": str(notebook.parent)}}).execute()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    nbformat.write(book, notebook)
    log(f"wrote {notebook} (executed)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every step on a few images (minutes)")
    parser.add_argument("--short", action="store_true",
                        help="the whole plan on 6,000 images and 6 epochs (about 35 min on 2 cores); writes "
                             "reproduce_short.json and the page, labelled as such")
    parser.add_argument("--data", default=None, help="Fashion-MNIST's folder (default: where Debian's "
                                                     "dataset-fashion-mnist puts it)")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default benchmarks/results/reproduce.json, or reproduce_quick.json)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="the page to write (default docs/reproduce.md, or "
                             "benchmarks/results/tmp/reproduce_quick.md)")
    parser.add_argument("--notebook", type=Path, default=None,
                        help="the notebook to execute on the results (default notebooks/05_reproduce.ipynb for the "
                             "full run, none for --quick)")
    parser.add_argument("--work", type=Path, default=RESULTS / "tmp" / "reproduce",
                        help="for the P = 4 checkpoint and its ONNX files (default %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="regenerate the page (and notebook) from --json")
    args = parser.parse_args(argv)
    if args.quick and args.short:
        parser.error("--quick and --short are two recipes: pass one")
    name = "quick" if args.quick else "short" if args.short else "full"
    recipe = RECIPES[name]
    path = args.json or RESULTS / ("reproduce.json" if name == "full" else f"reproduce_{name}.json")
    docs = args.docs or (RESULTS / "tmp" / "reproduce_quick.md" if args.quick else ROOT / "docs" / "reproduce.md")
    notebook = args.notebook or (None if args.quick else ROOT / "notebooks" / "05_reproduce.ipynb")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.report_only:
            results = json.loads(path.read_text())
        else:
            results = load_results(path, name, recipe)
            data = load_fashion_mnist(args.data).subset(recipe["train_subset"], recipe["test_subset"])
    except (OSError, ValueError) as error:
        print(f"python -m benchmarks.reproduce: error: {error}", file=sys.stderr)
        return 2
    if not args.report_only:
        pin_mmap_threshold()
        machine = {key: value for key, value in machine_info().items()
                   if key in ("cpu", "isa", "isa_flags", "cores", "threads", "torch", "python")}
        done = {(r["part"], r["form"], r["seed"]) for r in results["runs"]}
        todo = [run for run in plan(recipe) if run not in done]
        log(f"{len(done)} runs recorded in {path}, {len(todo)} to go; {machine['cpu']} ({machine['isa']}), "
            f"{machine['threads']} threads")
        for index, (part, form, seed) in enumerate(todo, 1):
            log(f"[{index}/{len(todo)}] P = {part}, {form}, seed {seed}")
            with autotune.mode(recipe["autotune"]):
                record, model = train_run(part, form, seed, data, recipe, machine, log)
            results["runs"].append(record)
            if (part, form, seed) == (CHAIN_PART, "sparse", 0):
                log("checking the trained model through the conversion and deployment chain")
                results["chain"] = chain_check(model, data, recipe, args.work, log)
            save_results(results, path)  # after each run: an interruption loses at most the run under way
        log(f"wrote {path}")
    source = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    for written in report.write(results, docs, "python -m benchmarks.reproduce" + (f" --{name}" if name != "full" else ""),
                                str(source)):
        log(f"wrote {written}")
    if notebook is not None:
        execute_notebook(notebook, path, log)
    chain = results.get("chain")
    if chain is not None and not chain["ok"]:
        log("the chain check failed: a form or runtime moved the test accuracy by more than "
            f"{TOLERANCE_POINTS} points (see {docs})" + ("; a quick run's barely trained model on a few test images "
                                                         "says little about it" if args.quick else ""))
        return 0 if results["recipe_name"] == "quick" else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
