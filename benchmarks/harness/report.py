"""Markdown tables, target verdicts and the plot from a ``bench.json`` written by :mod:`.run`.

:func:`write_all` re-renders them without timing anything again (the repository's
``python -m benchmarks.docs_page RESULTS/bench.json`` does, and docs/performance.md with them).
"""

from __future__ import annotations

from pathlib import Path

MIB = 2 ** 20
NETWORK_ORDER = ("standard_nchw", "standard_cl", "published", "masked_nchw", "masked_cl", "sparse_dense_cl",
                 "sparse_grouped_cl", "sparse_blocked_cl", "sparse_torch_sparse_cl", "sparse_fused_cl", "sparse_auto_nchw",
                 "sparse_auto_cl", "standard_cl_fused", "sparse_auto_cl_fused", "standard_cl_compiled",
                 "sparse_auto_cl_compiled", "loop")
PLOT_VARIANTS = ("published", "masked_nchw", "masked_cl", "sparse_fused_cl", "sparse_auto_cl", "sparse_auto_cl_fused",
                 "standard_cl")


def _index(rows):
    table = {}
    for row in rows:
        table[(row["level"], row["shape"], row["part"], row["mode"], row["variant"])] = row
    return table


def _modes(result):
    batch = result["config"]["batch"]
    return ("forward_b1", f"forward_b{batch}", f"train_b{batch}")


def _cell(row, ratio="vs_published"):
    if row is None:
        return ""
    if "median_ms" not in row:
        return "skipped"
    value = row.get(ratio)
    text = f"{row['median_ms']:.2f}" if row["median_ms"] < 10 else f"{row['median_ms']:.1f}"
    return text + (f" ({value:.2f}x)" if value else "")


def latency_table(result, level, shape, mode) -> str:
    """Variants x P: median ms and, in brackets, speed-up over the published form."""
    parts = result["config"]["parts"]
    index = _index(result["rows"])
    present = [v for v in NETWORK_ORDER if any((level, shape, p, mode, v) in index for p in parts)]
    lines = ["| variant | " + " | ".join(f"P={p}" for p in parts) + " |",
             "|---|" + "---:|" * len(parts)]
    for variant in present:
        lines.append(f"| {variant} | " + " | ".join(_cell(index.get((level, shape, p, mode, variant)))
                                                    for p in parts) + " |")
    ideal = [index.get((level, shape, p, mode, "standard_cl"), {}).get("ideal_ms") for p in parts]
    lines.append("| FLOP-ideal | " + " | ".join(f"{v:.2f}" if v else "" for v in ideal) + " |")
    return "\n".join(lines)


def efficiency_table(result, level, shape, mode, variant="sparse_auto_cl") -> str:
    parts = result["config"]["parts"]
    index = _index(result["rows"])
    head = "| metric | " + " | ".join(f"P={p}" for p in parts) + " |\n|---|" + "---:|" * len(parts)
    out = [head]
    for key, label, fmt in (("gflops", "effective GFLOP/s (useful MACs x 2 / time)", "{:.0f}"),
                            ("over_ideal", "time / FLOP-ideal time", "{:.2f}"),
                            ("vs_standard", "speed-up over standard conv (NCHW)", "{:.2f}"),
                            ("vs_published", "speed-up over the published form", "{:.2f}")):
        cells = []
        for p in parts:
            row = index.get((level, shape, p, mode, variant)) or index.get((level, shape, p, mode, "standard_cl"))
            cells.append(fmt.format(row[key]) if row and row.get(key) is not None else "")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _ratio(index, key_a, key_b):
    a, b = index.get(key_a), index.get(key_b)
    if not a or not b or "median_ms" not in a or "median_ms" not in b:
        return None
    return a["median_ms"] / b["median_ms"]


def targets(result) -> list[dict]:
    """Each target of the CPU compute issue (#16) with its measured value and a verdict.

    Ratios are of medians of one interleaved run. The "as a user runs it" targets (NCHW input,
    alternating ``train()`` / ``eval()``) and the AVX2-capped run are measured by
    ``benchmarks/auto_isa.py``.
    """
    parts = [p for p in result["config"]["parts"] if p > 1]
    index = _index(result["rows"])
    batch = result["config"]["batch"]
    fwd, train = f"forward_b{batch}", f"train_b{batch}"
    out = []
    net = ("network", "vgg16_cifar")
    big = [p for p in parts if p >= 4]
    for mode, goal in ((fwd, 0.80), (train, 0.90)):
        values = {p: _ratio(index, (*net, p, mode, "sparse_auto_cl"), (*net, p, mode, "masked_cl")) for p in big}
        out.append(_verdict(f"shipped sparse / masked, cl, {mode}", values, lambda v, g=goal: v <= g, f"<= {goal:.2f}"))
        values = {p: _ratio(index, (*net, p, mode, "sparse_auto_nchw"), (*net, p, mode, "masked_nchw")) for p in big}
        out.append(_verdict(f"(info) sparse / masked, NCHW model, {mode}", values, lambda v, g=goal: v <= g,
                            f"<= {goal:.2f}"))
    for mode, ps, goal in ((fwd, (2, 4), 1.5), (train, (4, 8), 1.4)):
        values = {p: _ratio(index, (*net, p, mode, "published"), (*net, p, mode, "sparse_auto_cl"))
                  for p in ps if p in parts}
        out.append(_verdict(f"shipped over published (speed-up), {mode}", values, lambda v, g=goal: v >= g,
                            f">= {goal:.1f}"))
    for variant, goal in (("sparse_auto_cl", 1.2), ("sparse_auto_cl_fused", 1.2), ("sparse_auto_cl_compiled", 1.2)):
        values = {p: (index.get((*net, p, fwd, variant)) or {}).get("over_ideal") for p in (4,) if p in parts}
        label = "" if variant == "sparse_auto_cl" else "(info) "
        out.append(_verdict(f"{label}{variant} forward time / FLOP-ideal", values, lambda v, g=goal: v <= g,
                            f"<= {goal:.1f}"))
    layers = sorted({r["shape"] for r in result["rows"] if r["level"] == "layer"}, key=_shape_key)
    for p in (4, 64):
        if p not in parts:
            continue
        values = {shape: (index.get(("layer", shape, p, fwd, "sparse_auto_cl")) or {}).get("over_ideal")
                  for shape in layers}
        out.append(_verdict(f"per-layer shipped forward / FLOP-ideal, P={p}", values, lambda v: v <= 1.3, "<= 1.3"))
    memory = {(m["part"], m["variant"]): m for m in result.get("memory", []) if "error" not in m}
    if memory:
        exact = {}
        for p in sorted({k[0] for k in memory}):
            m = memory.get((p, "sparse_auto_cl"))
            if m:
                exact[p] = m["state"]["training"] - 3 * m["expected_param_bytes"] if "expected_param_bytes" in m else None
        out.append(_verdict("sparse param+grad+optimizer bytes - 3 x HetConv parameter bytes", exact,
                            lambda v: v == 0, "== 0"))
        for key, what in (("tensor_peak_bytes", "tensor bytes"), ("peak_bytes", "resident, info: +-5 % noise")):
            for fmt in ("cl", "nchw"):
                values = {p: memory[(p, f"sparse_auto_{fmt}")][key] / memory[(p, f"masked_{fmt}")][key]
                          for p in sorted({k[0] for k in memory})
                          if (p, f"sparse_auto_{fmt}") in memory and (p, f"masked_{fmt}") in memory
                          and memory[(p, f"masked_{fmt}")].get(key)}
                name = f"peak training memory sparse / masked, {fmt} ({what})"
                out.append(_verdict(("(info) " if key == "peak_bytes" else "") + name, values,
                                    lambda v: v <= 1.1, "<= 1.10"))
    return out


def _shape_key(shape: str) -> list[int]:
    return [int(t) for t in shape.replace("->", " ").replace("@", " ").replace("x", " ").split()]


def _mac_ratio(index, net, part, mode):
    row = index.get((*net, part, mode, "standard_cl"))
    return row["useful_macs"] / row["standard_macs"] if row else 1.0


def _verdict(name, values, ok, goal) -> dict:
    values = {p: v for p, v in values.items() if v is not None}
    met = bool(values) and all(ok(v) for v in values.values())
    return {"target": name, "goal": goal, "values": values, "met": met if values else None}


def targets_table(result) -> str:
    lines = ["| target | goal | measured (by P) | verdict |", "|---|---|---|---|"]
    for t in targets(result):
        shown = ", ".join((f"P={p}" if isinstance(p, int) else p) + (f": {v:.3f}" if isinstance(v, float) else f": {v}")
                          for p, v in t["values"].items())
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        lines.append(f"| {t['target']} | {t['goal']} | {shown} | {verdict} |")
    return "\n".join(lines)


def memory_table(result) -> str:
    memory = [m for m in result.get("memory", []) if "error" not in m]
    if not memory:
        return "(memory not measured in this run)"
    parts = sorted({m["part"] for m in memory})
    variants = [v for v in NETWORK_ORDER if any(m["variant"] == v for m in memory)]
    index = {(m["part"], m["variant"]): m for m in memory}
    lines = ["| variant | " + " | ".join(f"P={p}" for p in parts) + " |", "|---|" + "---:|" * len(parts)]
    for v in variants:
        cells = []
        for p in parts:
            m = index.get((p, v))
            cells.append(f"{m.get('tensor_peak_bytes', 0) / MIB:.0f} / {m['peak_bytes'] / MIB:.0f} / "
                         f"{m['state']['training'] / MIB:.1f}"
                         + (f" (+{m['state']['buffers'] / MIB:.1f})" if m["state"]["buffers"] > MIB / 10 else "")
                         if m else "")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def auto_table(result) -> str:
    """Per layer: auto's pick against the fastest sparse backend measured in the same run."""
    index = _index(result["rows"])
    lines = ["| layer | mode | " + " | ".join(f"P={p}" for p in result["config"]["parts"] if p > 1) + " |",
             "|---|---|" + "---|" * len([p for p in result["config"]["parts"] if p > 1])]
    shapes = sorted({r["shape"] for r in result["rows"] if r["level"] == "layer"}, key=_shape_key)
    worst = 1.0
    for shape in shapes:
        for mode in _modes(result):
            cells = []
            for p in [p for p in result["config"]["parts"] if p > 1]:
                auto = index.get(("layer", shape, p, mode, "sparse_auto_cl"))
                timed = {v: index.get(("layer", shape, p, mode, f"sparse_{v}_cl"))
                         for v in ("dense", "grouped", "blocked", "torch_sparse", "fused")}
                timed = {v: r["median_ms"] for v, r in timed.items() if r and "median_ms" in r}
                if not auto or "median_ms" not in auto or not timed:
                    cells.append("")
                    continue
                best = min(timed, key=timed.get)
                picked = auto.get("backend", "?")
                regret = timed.get(picked, auto["median_ms"]) / timed[best]
                worst = max(worst, regret)
                cells.append(picked + ("" if picked == best else f" ({best} {regret - 1:+.0%})"))
            lines.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nWorst case: auto's pick {worst - 1:.0%} slower than the fastest backend measured."


def layers_markdown(result) -> str:
    out = ["# Per-layer latency (VGG-16 / CIFAR-10 HetConv layer shapes)", "",
           "Median ms; in brackets the speed-up over the published form. Same run as bench.md.", ""]
    shapes = []
    for r in result["rows"]:
        if r["level"] == "layer" and r["shape"] not in shapes:
            shapes.append(r["shape"])
    for shape in shapes:
        for mode in _modes(result):
            out += [f"## {shape}, {mode}", "", latency_table(result, "layer", shape, mode), ""]
    return "\n".join(out)


def profiles_markdown(result) -> str:
    out = ["# torch.profiler tables (VGG-16 / CIFAR-10, whole network, 3 calls each)", ""]
    for p in result.get("profiles", []):
        out += [f"## P={p['part']}, {p['mode']}, {p['variant']}", "", "```", p["table"].rstrip(), "```", ""]
    return "\n".join(out)


def machine_line(result) -> str:
    m = result["machine"]
    isa = f" ({m['isa']})" if m.get("isa") else ""
    return (f"{m['cpu']}{isa}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
            f"Python {m['python']}, {m['platform']}; glibc mmap threshold pinned: {m['mmap_threshold_pinned']} "
            f"(MALLOC_MMAP_THRESHOLD_={m['mmap_threshold_env']})"
            + (f"; float32 GEMM peak {m['sgemm_gflops']:.0f} GFLOP/s (the faster of "
               + ", ".join(f"{k} {v:.0f}" for k, v in m["gemm_gflops"].items()) + ")" if m.get("gemm_gflops")
               else f"; float32 sgemm peak (one 2048^3 torch.mm): {m['sgemm_gflops']:.0f} GFLOP/s"
               if m.get("sgemm_gflops") else ""))


def bench_markdown(result) -> str:
    batch = result["config"]["batch"]
    net = ("network", "vgg16_cifar")
    out = ["# HetConv benchmark: VGG-16 / CIFAR-10", "",
           f"Machine: {machine_line(result)}.", "",
           f"Command: `{result['command']}`; {result['config']['repeats']} interleaved rounds per set after "
           f"{result['config']['warmup']} warm-up calls, medians; {result['seconds'] / 60:.1f} min.", ""]
    for mode in (f"forward_b{batch}", f"train_b{batch}", "forward_b1"):
        out += [f"## Whole network, {mode} (ms; speed-up over the published form)", "",
                latency_table(result, *net, mode), "",
                f"Shipped model (`sparse_auto_cl`), {mode}:", "", efficiency_table(result, *net, mode), ""]
    out += ["## Targets", "", targets_table(result), "",
            "## Memory (whole network, training step, batch %d)" % batch, "",
            "MiB: peak of live tensor bytes during a step / peak resident memory above the process "
            "baseline / parameter + gradient + optimizer state (+ buffers when over 0.1 MiB: the published "
            "form's masks).", "", memory_table(result), "",
            "## What auto picked, per layer (channels-last)", "", auto_table(result), ""]
    return "\n".join(out)


def plot(result, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batch = result["config"]["batch"]
    index = _index(result["rows"])
    parts = result["config"]["parts"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, (f"forward_b{batch}", f"train_b{batch}")):
        for color, variant in enumerate(PLOT_VARIANTS):
            pts = [(p, index[("network", "vgg16_cifar", p, mode, variant)]["median_ms"]) for p in parts
                   if "median_ms" in index.get(("network", "vgg16_cifar", p, mode, variant), {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{color}", label=variant)
        ideal = [(p, index[("network", "vgg16_cifar", p, mode, "standard_cl")]["ideal_ms"]) for p in parts
                 if index.get(("network", "vgg16_cifar", p, mode, "standard_cl"), {}).get("ideal_ms")]
        if ideal:
            ax.plot(*zip(*ideal), linestyle="--", color="black", label="FLOP-ideal")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("part P")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"VGG-16 / CIFAR-10, {mode}")
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']}, {result['machine']['threads']} threads, torch {result['machine']['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LAYER_PLOT_VARIANTS = (("sparse_dense_cl", "stock: grouped k x k + dense 1 x 1"), ("masked_cl", "masked"),
                       ("sparse_fused_cl", "fused (only the existing kernels)"))


def plot_layers(result, path: Path, parts=(4, 64)) -> Path | None:
    """Forward time per VGG-16 layer (batch of the run): the stock formulation, the masked form,
    the fused kernel and the FLOP-ideal (those the run measured), one panel per P in ``parts``
    that the run measured (else its first P); None without layer rows or matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    mode = f"forward_b{result['config']['batch']}"
    rows = [r for r in result["rows"] if r["level"] == "layer" and r["mode"] == mode]
    measured = sorted({r["part"] for r in rows if r["part"] > 1})
    if not measured:
        return None
    parts = [p for p in parts if p in measured] or measured[:1]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    index = _index(rows)
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        here = [s for s in shapes if any(r["shape"] == s and r["part"] == part for r in rows)]
        xs = range(len(here))
        for color, (variant, label) in enumerate(LAYER_PLOT_VARIANTS):
            ys = [index.get(("layer", s, part, mode, variant), {}).get("median_ms") for s in here]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", color=f"C{color}",
                        label=label)
        ideal = [index.get(("layer", s, part, mode, "standard_cl"), {}).get("ideal_ms") for s in here]
        if any(v is not None for v in ideal):
            ax.plot(xs, [float("nan") if v is None else v for v in ideal], linestyle="--", color="black",
                    label="FLOP-ideal")
        ax.set_xticks(list(xs), here, rotation=40, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"one VGG-16 layer, P = {part}, {mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']}, {result['machine']['threads']} threads, torch {result['machine']['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(result, out: Path) -> list[Path]:
    """Write bench.md, layers.md, profiles.md, latency_vs_p.png and layers.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("bench.md", bench_markdown(result)), ("layers.md", layers_markdown(result)),
                       ("profiles.md", profiles_markdown(result))):
        (out / name).write_text(text + "\n")
        written.append(out / name)
    for image in (plot(result, out / "latency_vs_p.png"), plot_layers(result, out / "layers.png")):
        if image:
            written.append(image)
    return written

