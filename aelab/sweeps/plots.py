"""The report's pictures, chosen from what a sweep varied; every axis labelled, every line named."""
from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

from ..analysis.figures import pyplot, save_figure
from .jobs import LABELS, SEED_KEY as SEED, Job, Row

PANELS = ("mse", "population_sparsity", "sensitivity", "probe_latent")
GROUP_PANELS = {"loss": ("mse", "mae", "sharpness", "probe_latent"),  # which loss reconstructs sharpest
                "corruption": ("mse", "sharpness", "sensitivity", "probe_latent")}  # what denoising buys, costs
LOG_KEYS = ("weight", "lr")


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def wants_log_x(key: str, values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    spread = len(positive) == len(values) and max(positive) / min(positive) >= 100
    return spread or (any(word in key for word in LOG_KEYS) and len(positive) == len(values))


def by_other_keys(rows: list[Row], key: str) -> dict[str, list[Row]]:
    """Rows grouped into one line per setting of the other swept keys."""
    lines = defaultdict(list)
    for row in rows:
        rest = ", ".join(f"{k}={v}" for k, v in row.shown.items() if k != key)
        lines[rest].append(row)
    return lines


def save(fig, path: Path) -> Path:
    if fig.get_layout_engine() is None:  # a figure with a legend below its panels lays itself out
        fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def line_style(number: int) -> dict:
    """The number-th line's colour, and past ten lines (the colours' cycle) its dash: no two alike."""
    return {"color": f"C{number % 10}", "linestyle": ("-", "--", ":", "-.")[number // 10 % 4]}


def legend_below(labels: list[str], width: float) -> tuple[list[str], int, float]:
    """A figure's one legend, under its panels (a legend per panel covered the lines and was cut off by
    the figure's edge when settings are long): (the labels, wrapped to fit; columns; inches it takes)."""
    if not labels:
        return [], 1, 0.0
    chars = int(width * 16)  # about the characters of 7-point text an inch holds, less the line sample
    cols = max(1, min(4, chars // (max(map(len, labels)) + 8)))
    wrapped = [textwrap.fill(label, chars - 8) for label in labels] if cols == 1 else labels
    lines = sum(label.count("\n") + 1 for label in wrapped) if cols == 1 else -(-len(labels) // cols)
    return wrapped, cols, 0.3 + 0.15 * lines


def metrics_vs(rows: list[Row], key: str, out: Path, panels=PANELS) -> Path:
    """Each metric against a numeric swept value, mean ± std over seeds, one line per other setting."""
    plt = pyplot()
    panels = [m for m in panels if any(r.values(m) for r in rows)]
    lines = by_other_keys(rows, key)
    labels, cols, below = legend_below([label for label in lines if label], 4.2 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6 + below), squeeze=False,
                             layout="constrained" if labels else None)
    xs_all = [float(r.setting[key]) for r in rows]
    for ax, metric in zip(axes[0], panels):
        for number, line in enumerate(lines.values()):
            line = sorted(line, key=lambda r: float(r.setting[key]))
            stats = [r.mean_std(metric) for r in line]
            ax.errorbar([float(r.setting[key]) for r in line], [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, **line_style(number))
        if wants_log_x(key, xs_all):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=LABELS.get(metric, metric), title=LABELS.get(metric, metric))
    if labels:
        fig.legend(axes[0][0].containers, labels, loc="outside lower center", ncol=cols, fontsize=7)
    return save(fig, out / f"metrics_vs_{key}.png")


def setting_names(rows: list[Row]) -> tuple[list[str], int]:
    """Each row's setting wrapped for a y axis that writes them out whole, and the lines they take."""
    names = [textwrap.fill(r.label, 44) for r in rows]
    return names, sum(name.count("\n") + 1 for name in names)


def metrics_by(rows: list[Row], key: str, out: Path, panels=PANELS) -> Path:
    """A bar per setting of a categorical swept key (loss=mse,bce,mae; reg=l1,kl; ...), mean ± std over
    seeds; horizontal, the settings written out once on the left, so long ones are read whole."""
    plt = pyplot()
    panels = [m for m in panels if any(r.values(m) for r in rows)]
    names, lines = setting_names(rows)
    height = 1.4 + 0.17 * lines + 0.08 * len(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 2.8, max(3.0, height)), sharey=True,
                             squeeze=False)
    for ax, metric in zip(axes[0], panels):
        stats = [r.mean_std(metric) for r in rows]
        ax.barh(range(len(rows)), [m for m, _ in stats], xerr=[s for _, s in stats], capsize=3, color="tab:blue")
        ax.set(xlabel=LABELS.get(metric, metric))
        ax.set_title(LABELS.get(metric, metric), fontsize=10)
    axes[0][0].set_yticks(range(len(rows)), names, fontsize=7)
    axes[0][0].set_ylim(len(rows) - 0.5, -0.5)  # the first setting on top, as in the table
    axes[0][0].set_ylabel(key)
    return save(fig, out / f"metrics_by_{key}.png")


def trade_off(rows: list[Row], x_metric: str, name: str, out: Path) -> Path:
    """Reconstruction error against a regularization effect, one point per setting (joined in order when
    one key is swept; a log axis when the effect spans two decades), labelled: by its setting beside the
    point, or where settings are long, by a number keyed in a legend below. Against encoder sensitivity
    a second panel shows what the tutorial's trade-off promises for it: the error noisy test inputs add
    to the clean one (mse_<noise> - mse), which a flatter encoder should shrink as its clean error grows;
    its points too are joined only when one key is swept, and numbered as in the first panel."""
    plt = pyplot()
    numbered = max(len(row.label) for row in rows) > 24
    keyed = sum(textwrap.fill(row.label, 70).count("\n") + 1 for row in rows) if numbered else 0
    noises = noise_metrics(rows)[1:] if x_metric == "sensitivity" else []
    fig, axes = plt.subplots(1, 2 if noises else 1, figsize=((6.5 if numbered else 5.5) * (2 if noises else 1),
                                                             4.2 + 0.13 * keyed), squeeze=False)
    ax = axes[0][0]
    xs = [row.mean_std(x_metric)[0] for row in rows]
    ys = [row.mean_std("mse")[0] for row in rows]
    order = sorted(range(len(rows)), key=lambda i: xs[i])
    joined = len(rows[0].setting) == 1  # one swept key: the points are one curve; of a grid, they are not
    if joined:
        ax.plot([xs[i] for i in order], [ys[i] for i in order], color="tab:purple", alpha=0.35)
    for number, (row, x, y) in enumerate(zip(rows, xs, ys), 1):
        ax.scatter(x, y, color="tab:purple", label=f"{number}: {textwrap.fill(row.label, 70)}" if numbered else None)
        ax.annotate(str(number) if numbered else row.label, (x, y), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    log = wants_log_x(x_metric, xs)
    ax.set(xlabel=LABELS[x_metric], ylabel=LABELS["mse"], title=f"Reconstruction vs {LABELS[x_metric]}",
           xscale="log" if log else "linear")
    if noises:
        gap = axes[0][1]
        gaps = [[rows[i].mean_std(metric)[0] - ys[i] for i in order] for metric in noises]
        for number, (metric, line) in enumerate(zip(noises, gaps)):
            gap.plot([xs[i] for i in order], line, marker="o", label=f"test {noise_name(metric)}",
                     **{**line_style(number), **({} if joined else {"linestyle": "none"})})
        if numbered:  # each column of points numbered as its setting is in the first panel
            for i, top in zip(order, map(max, zip(*gaps))):
                gap.annotate(str(i + 1), (xs[i], top), fontsize=7, xytext=(0, 5), textcoords="offset points",
                             ha="center")
        gap.set(xlabel=LABELS[x_metric], ylabel="test MSE, noisy input - clean input",
                title="Error the noisy test inputs add", xscale="log" if log else "linear")
        gap.legend(fontsize=7)
    if numbered:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=6, handlelength=0, markerscale=0,
                  frameon=False)
    return save(fig, out / f"{name}.png")


def noise_metrics(rows: list[Row]) -> list[str]:
    """`mse` (clean test input) and every `mse_<noise>` the runs measured: the noises in the order they
    were measured (eval.noise's: gaussian, salt_pepper, masking, block), a noise's levels in increasing
    order (mse_gaussian_0.1 before mse_gaussian_0.25 before mse_gaussian_1)."""
    def noise_level(metric: str) -> tuple[str, float]:
        name, _, level = metric.rpartition("_")
        return (name, float(level)) if is_number(level) else (metric, 0.0)
    found = dict.fromkeys(m for r in rows for j in r.jobs for m in j.metrics if m.startswith("mse_"))
    noises = list(dict.fromkeys(noise_level(m)[0] for m in found))
    return ["mse", *sorted(found, key=lambda m: (noises.index(noise_level(m)[0]), noise_level(m)[1]))]


def noise_name(metric: str) -> str:
    return "none" if metric == "mse" else metric[4:]


def denoising_vs_noise(rows: list[Row], out: Path) -> Path:
    """Test MSE (against clean) under each test corruption, against the training noise level; a panel per
    setting of the other swept keys, the test corruptions keyed once on the right. Below, where the runs
    measured it, each gaussian test level's score_cos: how well f(x̃) - x̃, the score estimate, points back
    to the clean input (the tutorial's score matching connection)."""
    plt = pyplot()
    key = "corruption.noise_factor"
    metrics = noise_metrics(rows)
    scores = {number: "score_cos_" + noise_name(m) for number, m in enumerate(metrics)
              if any("score_cos_" + noise_name(m) in j.metrics for r in rows for j in r.jobs)}
    panels = by_other_keys(rows, key)
    fig, axes = plt.subplots(1 + bool(scores), len(panels), figsize=(4.6 * len(panels) + 1.6, 4.2 + 3 * bool(scores)),
                             squeeze=False, sharex="col", sharey="row", layout="constrained")
    for column, (other, line) in enumerate(panels.items()):
        line = sorted(line, key=lambda r: float(r.setting[key]))
        x = [float(r.setting[key]) for r in line]
        for ax, drawn in zip(axes[:, column], (dict(enumerate(metrics)), scores)):
            for number, metric in drawn.items():
                stats = [r.mean_std(metric) for r in line]
                ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                            **line_style(number))
        axes[0][column].set(title=textwrap.fill(other, 50) if other else None)
        axes[-1][column].set(xlabel="training noise_factor (gaussian std)")
    axes[0][0].set_ylabel("test MSE against clean input")
    if scores:
        axes[1][0].set_ylabel("cos(f(x̃) - x̃, x - x̃): the score\nestimate's aim at the clean input")
    fig.suptitle("Denoising error vs training noise level", fontsize=11)
    fig.legend(axes[0][0].containers, ["clean test input" if m == "mse" else f"test {noise_name(m)}" for m in metrics],
               loc="outside right upper", fontsize=7, title="test input")
    return save(fig, out / "denoising_vs_noise.png")


def robustness_heatmap(rows: list[Row], out: Path) -> Path:
    """Training setting (rows) x test corruption (columns): test MSE against clean inputs. Each column's
    lowest error is framed: the training setting that best handles that test input."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    tests = noise_metrics(rows)
    grid = [[r.mean_std(m)[0] for m in tests] for r in rows]
    names, lines = setting_names(rows)
    height = 1.9 + 0.2 * lines + 0.25 * len(rows)
    fig, ax = plt.subplots(figsize=(0.85 * len(tests) + 0.065 * max(len(line) for name in names
                                                                     for line in name.splitlines()) + 2.6, height),
                           layout="constrained")
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    low, high = image.get_clim()
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            dark = (value - low) / ((high - low) or 1) > 0.5  # viridis_r: high values are dark
            ax.text(j, i, "-" if math.isnan(value) else f"{value:.4f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    for j in range(len(tests)):
        measured = [i for i in range(len(rows)) if not math.isnan(grid[i][j])]  # a run tested without it: blank
        if measured:
            best = min(measured, key=lambda i: grid[i][j])
            ax.add_patch(Rectangle((j - 0.5, best - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(tests)), [noise_name(m) for m in tests], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.set(xlabel="test input", ylabel="training setting")
    ax.set_title("Test MSE against clean inputs (framed: each column's lowest)", fontsize=10)
    fig.colorbar(image, ax=ax, label="MSE per element")
    return save(fig, out / "robustness_heatmap.png")


CURVES = (  # (TensorBoard tag, panel title, y label, y scale) of loss_curves.png
    ("train/total", "training loss", "total loss", "log"),
    ("val/recon", "validation reconstruction", "reconstruction loss (val/recon)", "log"),
    ("val/population_sparsity", "validation codes", "fraction of units active per sample", "linear"))


def loss_curves(jobs: list[Job], labels: dict[Path, str], out: Path) -> Path | None:
    """Per run, from its TensorBoard events: the training loss, the validation reconstruction loss and,
    where logged, the fraction of validation code units active: how fast each setting learns and how
    fast its penalty makes the code sparse (Exercise 3's training dynamics)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = []  # (label, {tag: (steps, values)}) per run with curves; two runs of one setting are two
    for job in jobs:
        events = EventAccumulator(str(job.path), size_guidance={"scalars": 0})
        events.Reload()
        logged = events.Tags()["scalars"]
        found = {tag: ([p.step for p in events.Scalars(tag)], [p.value for p in events.Scalars(tag)])
                 for tag, *_ in CURVES if tag in logged}
        if found:
            series.append((labels[job.path], found))
    if not series:
        return None
    panels = [curve for curve in CURVES if any(curve[0] in found for _, found in series)]
    plt = pyplot()
    shown, cols, below = legend_below([label for label, _ in series], 4.6 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2 + below), squeeze=False,
                             layout="constrained")
    lines = []
    for number, (_, found) in enumerate(series):
        for ax, (tag, *_) in zip(axes[0], panels):
            if tag in found:
                line, = ax.plot(*found[tag], **line_style(number))
        lines.append(line)
    for ax, (_, title, ylabel, scale) in zip(axes[0], panels):
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=title, yscale=scale)
    fig.legend(lines, shown, loc="outside lower center", ncol=cols, fontsize=7)
    return save(fig, out / "loss_curves.png")


COMPARED = {  # a run's picture → (panel width in inches, panels across, in colour, what the figure shows)
    "reconstructions": (6.0, 1, False, "test reconstructions"),  # wide strips: 1-3 across, by how many
    "features": (3.0, 5, False, "decoded one-hot codes (learned features)"),  # with their rows named
    "denoising": (4.5, 3, False, "each test noise's inputs and outputs"),  # labelled rows: wider, to read them
    "latents": (4.5, 3, True, "the test codes on their two leading principal components"),  # coloured by class
}


def side_by_side(rows: list[Row], name: str, out: Path, source: str | None = None) -> Path | None:
    """Each setting's picture of one of its runs (`reconstructions.png`, `features.png`, `denoising.png`,
    `latents.png`, or the `source` file instead: an `aelab eval` record's) in one figure, labelled: the
    tutorial's visual comparisons (which loss is sharpest, which penalty's features are cleanest, which
    training noise removes which test noise, how each lays out the codes). The pictures are the runs' own
    files, so none is recomputed."""
    import numpy as np
    from PIL import Image

    found = [(row, row.jobs[0].path / f"{source or name}.png") for row in rows]
    found = [(row, path) for row, path in found if path.is_file()]
    if len(found) < 2:
        return None
    plt = pyplot()
    width, across, colour, what = COMPARED[name]
    wide = name == "reconstructions"  # a strip of three rows, clean, input, output, each named in the picture
    cols = (1 if len(found) <= 8 else 2 if len(found) <= 16 else 3) if wide else min(len(found), across)
    lines = -(-len(found) // cols)
    with Image.open(found[0][1]) as first:
        aspect = first.height / first.width
    titles = [textwrap.fill(row.label + (f" ({len(row.jobs)} seeds: the first)" if len(row.jobs) > 1 else ""),
                            int(width * 15)) for row, _ in found]  # about the characters a panel's width holds
    title_height = 0.25 + 0.14 * max(title.count("\n") + 1 for title in titles)
    fig, axes = plt.subplots(lines, cols, figsize=(width * cols, (width * aspect + title_height) * lines),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (row, path), title in zip(axes.flat, found, titles):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if colour else "L"))
        ax.imshow(pixels, **({} if colour else {"cmap": "gray", "vmin": 0, "vmax": 255}), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{what}, one run per setting", fontsize=10)
    return save(fig, out / f"compare_{name}.png")


def make_plots(rows: list[Row], jobs: list[Job], keys: list[str], out: Path, record: str | None = None) -> list[Path]:
    """The plots that fit what was swept; `record`: the `aelab eval` record the metrics come from (its
    pictures are compared, not the end of training's)."""
    numeric = [k for k in keys if all(is_number(r.setting[k]) for r in rows)]
    panels = {k: GROUP_PANELS.get(k.split(".")[0], PANELS) for k in keys}
    paths = [metrics_vs(rows, k, out, panels[k]) for k in numeric]
    paths += [metrics_by(rows, k, out, panels[k]) for k in keys if k not in numeric]
    regs = {job.config.get("reg", {}).get("name") for job in jobs}
    if "reg.weight" in numeric and regs & {"l1", "kl"}:
        paths.append(trade_off(rows, "population_sparsity", "recon_vs_sparsity", out))
    if "reg.weight" in numeric and "contractive" in regs:
        paths.append(trade_off(rows, "sensitivity", "recon_vs_sensitivity", out))
    if "corruption.noise_factor" in numeric:
        paths.append(denoising_vs_noise(rows, out))
    noise_sweep = "corruption" in keys or "corruption.noise_factor" in numeric
    if noise_sweep:  # train noise x test noise
        paths.append(robustness_heatmap(rows, out))
    labels = {job.path: row.label + (f" seed={job.overrides[SEED]}" if SEED in job.overrides else "")
              for row in rows for job in row.jobs}
    drawn = [loss_curves(jobs, labels, out), side_by_side(rows, "reconstructions", out),
             side_by_side(rows, "features", out), side_by_side(rows, "latents", out)]
    if noise_sweep:
        drawn.append(side_by_side(rows, "denoising", out, source=record and f"{record}_denoising"))
    return paths + [path for path in drawn if path]

