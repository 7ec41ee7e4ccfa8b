"""The page of ``make reproduce`` (:mod:`.reproduce`): tables, verdicts and one figure, all from its JSON.

Nothing here is measured: every number on the page is read from the results file, and every
verdict is computed from those numbers with the criterion written beside it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from sparse_hetconv.counting import PAPER_VGG16_CIFAR10_MMACS

#: The seed repository's CIFAR-10 column (the paper's Table 1) where issue 24 quotes it, in %.
PAPER_CIFAR10_ACC = {1: 94.06, 4: 93.93, 64: 93.42}
PUBLISHED = {"epochs": 330, "train_subset": "all (50,000)", "milestones": [50, 140, 210, 240, 270, 300],
             "gamma": 0.2}


def _series(runs: list[dict], form: str | None = None) -> dict[int, list[dict]]:
    """Runs by P: the sparse form (the standard convolution at P = 1), or one form."""
    out: dict[int, list[dict]] = {}
    for run in runs:
        if (form is None and run["form"] in ("sparse", "standard")) or run["form"] == form:
            out.setdefault(run["part"], []).append(run)
    return dict(sorted(out.items()))


def _acc(runs: list[dict]) -> str:
    """Accuracy in %: one run's, or the mean [range] over seeds."""
    values = [100 * r["test_acc"] for r in runs]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} [{min(values):.2f}–{max(values):.2f}] ({len(values)} seeds)"


def _machines(runs: list[dict]) -> list[str]:
    seen = []
    for run in runs:
        m = run["machine"]
        text = f"{m['cpu']} ({m['isa']}), {m['threads']} torch threads, torch {m['torch']}"
        if text not in seen:
            seen.append(text)
    return seen


def _duration(results: dict) -> str:
    runs, chain = results["runs"], results.get("chain") or {}
    if not runs or "run_seconds" not in runs[0]:
        return ""
    total = sum(r["run_seconds"] for r in runs) + chain.get("seconds", 0)
    loads = [r["load_average"] for r in runs if r.get("load_average") is not None]
    return (f"The {len(runs)} runs took {sum(r['run_seconds'] for r in runs) / 60:.0f} min (building, training, "
            f"testing) and the chain check {chain.get('seconds', 0) / 60:.0f} min: {total / 3600:.2f} h in all"
            + (f"; the machine's 1-minute load average at the end of each run was {min(loads):.1f}–{max(loads):.1f} "
               f"on {runs[0]['machine']['cores']} cores (above the thread count: other work shared the cores)"
               if loads else "") + ".")


def verdicts(results: dict) -> list[str]:
    """The claims the page tests, each with its criterion and what the numbers say."""
    runs, lines = results["runs"], []
    sparse = _series(runs)
    if len(sparse.get(1, [])) >= 2 and sparse.get(4):
        p1 = [100 * r["test_acc"] for r in sparse[1]]
        p4 = statistics.mean(100 * r["test_acc"] for r in sparse[4])
        floor = min(p1) - 0.5
        lines.append(f"* **P = 4 against P = 1** (criterion: the P = 4 mean is at least the lowest P = 1 seed minus "
                     f"0.5 points, {floor:.2f} %): P = 4 {p4:.2f} %, P = 1 seeds {min(p1):.2f}–{max(p1):.2f} % — "
                     f"**{'holds' if p4 >= floor else 'does not hold'}**.")
    at4 = {form: _series(runs, form).get(4, []) for form in ("sparse", "masked", "published")}
    if all(at4.values()):
        seeds = [100 * r["test_acc"] for r in at4["sparse"]]
        low, high = min(seeds) - 0.5, max(seeds) + 0.5
        inside = all(low <= 100 * r["test_acc"] <= high for form in ("masked", "published") for r in at4[form])
        lines.append(f"* **The three forms at P = 4** (criterion: the masked and published runs within the sparse "
                     f"seeds' range ± 0.5 points, {low:.2f}–{high:.2f} %): in %, "
                     + ", ".join(f"{form} {_acc(at4[form])}" for form in at4)
                     + f" — **{'holds' if inside else 'does not hold'}**.")
        same_seed = {form: next((r for r in at4[form] if r["seed"] == 0), None) for form in at4}
        if all(same_seed.values()):
            times = {form: r["seconds_per_epoch"] for form, r in same_seed.items()}
            fastest = min(times, key=times.get)
            lines.append(f"* **Epoch time at P = 4** (seed 0, median epoch): sparse {times['sparse']:.1f} s, masked "
                         f"{times['masked']:.1f} s, published {times['published']:.1f} s; the sparse form's epoch "
                         f"takes {times['sparse'] / times['published']:.2f}x the published form's time and "
                         f"{times['sparse'] / times['masked']:.2f}x the masked form's — the fastest of the three: "
                         f"**{'yes' if fastest == 'sparse' else f'no ({fastest} is)'}**.")
    chain = results.get("chain")
    if chain:
        checked = [r for r in chain["rows"] if "test_acc" in r]
        worst = max(checked[1:] or checked, key=lambda r: abs(r["delta_points"]))  # (the first is the reference)
        lines.append(f"* **Conversion and deployment chain** (criterion: every form and runtime within "
                     f"{chain['tolerance_points']} points of the trained model): largest change "
                     f"{worst['delta_points']:+.2f} points ({worst['name']}) — "
                     f"**{'holds' if chain['ok'] else 'fails'}**"
                     + (f"; skipped: {', '.join(r['name'] for r in chain['rows'] if 'skipped' in r)}"
                        if len(checked) < len(chain["rows"]) else "") + ".")
    return lines


def figure(results: dict, path: Path) -> Path:
    """Accuracy vs P, accuracy vs MACs and epoch time vs P, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    sparse = _series(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    parts = list(sparse)
    means = [statistics.mean(100 * r["test_acc"] for r in sparse[p]) for p in parts]
    macs = [sparse[p][0]["macs"] / 1e6 for p in parts]
    for ax, xs in ((axes[0], parts), (axes[1], macs)):
        ax.plot(xs, means, "o-", color="C0", label="sparse form (P = 1: standard), mean of seeds")
        for x, p in zip(xs, parts):
            ax.scatter([x] * len(sparse[p]), [100 * r["test_acc"] for r in sparse[p]], color="C0", s=12, alpha=0.5)
        for i, form in enumerate(("masked", "published"), 1):
            for r in _series(runs, form).get(4, []):
                x = 4 if ax is axes[0] else r["macs"] / 1e6
                ax.scatter([x], [100 * r["test_acc"]], marker="^s"[i - 1], color=f"C{i}", zorder=3,
                           label=f"{form} form, P = 4")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("P")
    axes[0].set_title(f"{results['recipe']['dataset']}: accuracy vs P")
    axes[1].set_xlabel("MACs (M, the paper's convention)")
    axes[1].set_title("accuracy vs MACs")
    axes[0].legend(fontsize=8)
    for i, form in enumerate(("sparse", "masked", "published")):
        series = _series(runs) if form == "sparse" else _series(runs, form)
        xs = list(series)
        axes[2].plot(xs, [statistics.median(r["seconds_per_epoch"] for r in series[p]) for p in xs],
                     ["o-", "^", "s"][i], color=f"C{i}",
                     label=f"{form} form" + (" (P = 1: standard)" if form == "sparse" else ""))
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("P")
    axes[2].set_ylabel("seconds per epoch (median)")
    axes[2].set_title("training epoch time vs P")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def page(results: dict, image: str | None, command: str, source: str) -> str:
    recipe, runs = results["recipe"], results["runs"]
    quick = results.get("recipe_name") == "quick"
    lines = ["# Accuracy vs P on a real data set, trained with this library", "",
             f"Generated by `{command}` from `{source}`; "
             "do not edit by hand (`make reproduce` regenerates it, `--report-only` from the JSON alone).", ""]
    if quick:
        from .reproduce import RECIPES

        full = RECIPES["full"]
        lines += ["> **Quick run**: every step of `make reproduce` on a few hundred images and one epoch, to check the "
                  "pipeline. Its accuracies and times say nothing about HetConv. `make reproduce` (about two hours "
                  f"on two cores) writes the real table here: {full['train_subset']:,} training images, "
                  f"{full['epochs']} epochs (lr x {full['gamma']} after epochs "
                  f"{', '.join(map(str, full['milestones']))}), seeds 0–{full['seeds'] - 1} at P = 1 and P = 4, the "
                  "whole test set, the autotuner's confirm mode; the rest as below.", ""]
    if results.get("recipe_name") == "short":
        from .reproduce import RECIPES

        full = RECIPES["full"]
        lines += ["> **Short run** (`--short`): the whole plan on fewer images and epochs than `make reproduce`'s "
                  f"full recipe ({recipe['train_subset']:,} instead of {full['train_subset']:,} training images, "
                  f"{recipe['epochs']} instead of {full['epochs']} epochs, the autotuner's cost model instead of its "
                  "confirm mode), run where two quiet hours were not available. Accuracies are lower than the full "
                  "recipe's; how they move with P and between the forms is the question. `make reproduce` writes "
                  "the full table here.", ""]
    lines += [
        "HetConv (Singh et al., CVPR 2019, [arXiv 1903.04120](https://arxiv.org/abs/1903.04120)) reports that VGG-16's "
        "accuracy on CIFAR-10 holds as P grows while the MACs fall. CIFAR-10 cannot be installed here, so this page "
        "trains the same network on Fashion-MNIST (70,000 28x28 grey images of 10 kinds of clothing; "
        "`apt-get install dataset-fashion-mnist`), at every P with one recipe, and at P = 4 in the three forms.", "",
        "## Recipe", "",
        "| setting | this table | the published CIFAR-10 recipe |", "|---|---|---|",
        "| network | `vgg16_cifar(part=P)`: 13 convolutions of 64–512 channels (the first standard), BatchNorm, "
        "512-512-10 classifier | the same |",
        "| input | Fashion-MNIST, 28x28 zero-padded to 32x32, the grey channel repeated into the 3 RGB inputs; "
        "normalised with the training images' mean and std | CIFAR-10, 32x32 RGB |",
        f"| training images | {recipe['train_subset'] or 'all'} (a fixed class-balanced selection, the same for "
        f"every run) | {PUBLISHED['train_subset']} |",
        f"| test images | {recipe['test_subset'] or 'all 10,000'} | all 10,000 |",
        f"| optimiser | SGD, lr {recipe['lr']}, momentum {recipe['momentum']}, weight decay {recipe['weight_decay']}, "
        f"batch {recipe['batch_size']} | the same |",
        f"| augmentation | random 32x32 crop of the {recipe['crop_padding']}-pixel zero-padded image"
        f"{', horizontal flip' if recipe['flip'] else ''} | the same |",
        f"| schedule | {recipe['epochs']} epoch{'s' * (recipe['epochs'] > 1)}, "
        + (f"lr x {recipe['gamma']} after epochs {', '.join(map(str, recipe['milestones']))}" if recipe["milestones"]
           else "constant lr")
        + f" | {PUBLISHED['epochs']} epochs, lr x {PUBLISHED['gamma']} after epochs "
        f"{', '.join(map(str, PUBLISHED['milestones']))} |",
        f"| seeds | {', '.join(map(str, range(recipe['seeds'])))} at P = 1 and P = 4 (sparse form), 0 elsewhere; the "
        "seed sets the initial weights and the batches | one run |",
        "| forms | sparse (`SparseHetConv2d`, channels-last, `backend=\"auto\"`) at every P; at P = 4 also masked "
        "(`MaskedHetConv2d`, channels-last) and published (`gwc + pwc`, NCHW, `pwc`'s gradient masked after "
        "`backward()`), all three from the same initial weights (the masked form's, converted exactly) | "
        "published |",
        f"| backend choice | `backend=\"auto\"` in its `{recipe['autotune']}` mode "
        + ("(one-off timings on this machine)" if recipe["autotune"] == "confirm" else "(the cost model, no timing)")
        + " | — |", "",
        ("What a quick run reduces further: " if quick else "What was reduced to fit the run's time on two cores: ")
        + f"the training set ({recipe['train_subset']:,} of "
        f"Fashion-MNIST's 60,000 images) and the epochs ({recipe['epochs']}, the schedule compressed to them). Not "
        "reduced: the network and its channel widths (every HetConv layer has 64 or more input channels, which P = 64 "
        "needs), the input size, the optimiser and the augmentation, so the MACs column is exactly what `count_macs` "
        "gives for the paper's network. Accuracies are therefore below Fashion-MNIST's published VGG-16 baseline "
        "(93.5 % with the whole training set); the question here is how they move with P.", "",
        "## Machine", ""] + [f"* {m}" for m in _machines(runs)] + [
        "", "Times are wall-clock seconds of the training passes of one epoch (median over the epochs; evaluation not "
        "included), measured while the run trained; a machine shared with other work makes them noisier than "
        "`make bench`'s interleaved timings. " + _duration(results), ""]
    sparse = _series(runs)
    lines += ["## Accuracy, MACs and time vs P", "",
              "Sparse form (at P = 1 the standard convolution, which every form is there). Accuracy: mean [range] "
              "over the seeds, in %.", "",
              "| P | test accuracy, Fashion-MNIST (%) | paper, CIFAR-10 (%) | MACs (M) | paper's MACs (M) | parameters "
              "| s / epoch | images / s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for part, group in sparse.items():
        paper = PAPER_CIFAR10_ACC.get(part)
        lines.append(f"| {part} | {_acc(group)} | {f'{paper:.2f}' if paper else '—'} | "
                     f"{group[0]['macs'] / 1e6:.2f} | "
                     f"{PAPER_VGG16_CIFAR10_MMACS.get(part, float('nan')):.2f} | {group[0]['params']:,} | "
                     f"{statistics.median(r['seconds_per_epoch'] for r in group):.1f} | "
                     f"{statistics.median(r['images_per_s'] for r in group):.0f} |")
    lines += ["", "The paper's CIFAR-10 accuracies are quoted where issue 24 quotes them (P = 1, 4, 64); they are "
              "for another data set and the full 330-epoch recipe, so compare how each column moves with P, not the "
              "values. MACs and parameters follow the paper's convention (`count_macs`, `count_params`: the kernels "
              "that exist, BatchNorm as one MAC per output); ours exceed the paper's by 0–0.5 % "
              "([counting_and_training.md](counting_and_training.md)).", ""]
    if image:
        lines += [f"![accuracy vs P, accuracy vs MACs, epoch time vs P]({image})", ""]
    at4 = [r for r in runs if r["part"] == 4 and r["seed"] == 0 and r["form"] in ("sparse", "masked", "published")]
    if at4:
        lines += ["## The three forms at P = 4", "",
                  "Same initial weights, same batches (seed 0); only the arithmetic differs.", "",
                  "| form | test accuracy (%) | final training loss | s / epoch | images / s | stored parameters |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(at4, key=lambda r: ("sparse", "masked", "published").index(r["form"])):
            lines.append(f"| {r['form']} | {100 * r['test_acc']:.2f} | {r['history'][-1]['loss']:.4f} | "
                         f"{r['seconds_per_epoch']:.1f} | {r['images_per_s']:.0f} | {r['params_stored']:,} |")
        lines.append("")
    chain = results.get("chain")
    if chain:
        lines += ["## The trained P = 4 model through conversion and deployment", "",
                  "The sparse model of P = 4, seed 0, saved as a checkpoint, loaded back with "
                  "`sparse_hetconv.checkpoint.load_model`, converted and deployed, and each result evaluated on "
                  "the same test images (int8: calibrated on "
                  f"{recipe['calibration_images']} training images).", "",
                  "| form or runtime | test accuracy (%) | change (points) | top-1 agreement with the trained model |",
                  "|---|---:|---:|---:|"]
        for r in chain["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['name']} | skipped: {r['skipped']} | | |")
            else:
                lines.append(f"| {r['name']} | {100 * r['test_acc']:.2f} | {r['delta_points']:+.2f} | "
                             f"{100 * r['agreement']:.2f} % |")
        lines.append("")
    lines += ["## What the numbers say", ""] + (["A quick run: the criteria are computed, but on one epoch of a few "
                                                 "hundred images the verdicts say nothing.", ""] if quick else [])
    lines += (verdicts(results) or ["* Not enough runs recorded yet."]) + [""]
    lines += ["## Every run", "",
              "| P | form | seed | test accuracy (%) | final loss | epochs | s / epoch | images / s | finished |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(runs, key=lambda r: (r["part"], r["form"], r["seed"])):
        lines.append(f"| {r['part']} | {r['form']} | {r['seed']} | {100 * r['test_acc']:.2f} | "
                     f"{r['history'][-1]['loss']:.4f} | {r['epochs']} | {r['seconds_per_epoch']:.1f} | "
                     f"{r['images_per_s']:.0f} | {r['finished']} |")
    lines += ["", "Rerun or complete the table with `make reproduce` (runs already in the JSON are skipped); "
              "`python -m benchmarks.reproduce --report-only` regenerates this page and "
              "`notebooks/05_reproduce.ipynb` from the JSON.", ""]
    return "\n".join(lines)


def write(results: dict, docs: Path, command: str, source: str) -> list[Path]:
    """The page and its figure (``<page stem>.png`` beside it); ``source`` names the JSON."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    written = []
    image = None
    if results["runs"]:
        written.append(figure(results, docs.with_suffix(".png")))
        image = docs.with_suffix(".png").name
    docs.write_text(page(results, image, command, source))
    return [docs, *written]
