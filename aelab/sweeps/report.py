"""`aelab report SWEEP_DIR [eval.KEY=VALUE ...]`: one row per setting of a sweep (seeds folded to
mean ± std), CSV, Markdown and the plots that fit what was swept; with eval overrides, of the test
metrics `aelab eval` recomputed with them instead of those measured at the end of training."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from omegaconf import OmegaConf

from ..keys import similar_key
from ..registry import ConfigError
from ..runs import (EVAL_OVERRIDES, SAMPLE_MEASURES, check_overrides, current_defaults, output_name, read_json,
                   write_text)
from .jobs import (SAMPLE_FIX, SEED_KEY, Row, fold, load_jobs, metric_names, sample_metrics, swept_keys, unfinished_jobs,
                   unreadable_sample)

ANNEALED = "annealed Langevin through the sweep's models (aelab sample SWEEP_DIR sample.method=annealed)"
SPARSITY = ("population_sparsity", "lifetime_sparseness", "dead_fraction", "mean_activation", "sensitivity",
            "jacobian_rank", "feature_spread")
SHORT = {"population_sparsity": "active", "lifetime_sparseness": "selective", "dead_fraction": "dead",
         "mean_activation": "mean act", "sensitivity": "||J||²", "jacobian_rank": "J rank", "feature_spread": "spread",
         "probe_latent": "probe", "val_total": "val", "sharpness": "sharp"}


def annealed_samples(sweep_dir: Path) -> list[str]:
    """A line for each `aelab sample SWEEP_DIR sample.method=annealed` record in the sweep's own folder:
    its levels and its chains' last state."""
    lines = []
    for path in sorted(sweep_dir.glob("sample*.json")):
        record = read_json(path, SAMPLE_FIX)
        settings = record.get("sample")
        if not isinstance(settings, dict) or settings.get("method") != "annealed":  # not an annealed record
            continue
        measures, _ = sample_metrics(path, record)
        try:
            sigmas, steps = [float(level["sigma"]) for level in record["levels"]], int(settings["steps"])
        except (KeyError, TypeError, ValueError):
            raise unreadable_sample(path) from None
        lines.append(f"- {path.name}: {steps} steps at each sigma {', '.join(f'{s:g}' for s in sigmas)}; the last "
                     f"state: {measures['sample_classes']:g} classes (commonest {measures['sample_top_share']:.2f}), "
                     f"sharpness {measures['sample_sharpness']:.3g}, nearest_mse {measures['sample_nearest_mse']:.3g}")
    return lines


def fmt(mean: float, std: float, n: int) -> str:
    """mean ± sample std over seeds; "-" where no job of the row has the metric (eval.probe=false, say)."""
    return "-" if n == 0 else f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {std:.2g}"


def write_tables(rows: list[Row], keys: list[str], metrics: list[str], failed: list[str], annealed: list[str],
                 out: Path, unconverged: str = "") -> tuple[Path, Path]:
    """report.csv, and report.md with the jobs without results (`failed` lines) and the sweep's annealed
    samples (`annealed` lines) under its table."""
    setting_keys = [k for k in keys if k != SEED_KEY]
    csv_path, md_path = out / "report.csv", out / "report.md"
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow([*setting_keys, "runs", "converged", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))])
    for row in rows:
        stats = [v for m in metrics for v in row.mean_std(m)]
        writer.writerow([*row.setting.values(), len(row.jobs), row.converged, *stats])
    write_text(csv_path, table.getvalue())
    header = [*setting_keys, "runs", "converged", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [fmt(*row.mean_std(m), len(row.values(m))) for m in metrics]
        lines.append("| " + " | ".join([*row.shown.values(), str(len(row.jobs)), row.converged, *cells]) + " |")
    if unconverged:
        lines += ["", unconverged]
    if failed:
        lines += ["", "Jobs without results:", "", *failed]
    if annealed:
        lines += ["", f"{ANNEALED}:", "", *annealed]
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def print_table(rows: list[Row], keys: list[str], metrics: list[str], title: str) -> None:
    from rich.cells import cell_len
    from rich.console import Console
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table

    from ..console import console
    table = Table(title=escape(title))  # a narrow terminal folds cells onto more lines rather than cut them short
    for key in [k for k in keys if k != SEED_KEY] + ["runs", "converged"]:
        table.add_column(key, overflow="fold")
    for m in metrics:
        table.add_column(SHORT.get(m, m.replace("mse_", "mse ").replace("sample_", "sample ")), justify="right",
                         overflow="fold")
    for row in rows:
        table.add_row(*map(escape, row.shown.values()), str(len(row.jobs)), row.converged,
                      *(fmt(*row.mean_std(m), len(row.values(m))) for m in metrics))
    if console.is_terminal:
        console.print(table)
    else:  # piped into a file or a log, the table and its title get the width they need: there is no screen to fit
        table.min_width = cell_len(title)  # the title (the sweep's path) on one line, not folded to the table's width
        needed = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
        Console(file=console.file, width=max(console.width, needed)).print(table)


def unconverged_note(rows: list[Row]) -> str:
    """The line under the table when some jobs had not converged: their numbers measure the budget."""
    jobs = [j for row in rows for j in row.jobs if j.converged is False]
    if not jobs:
        return ""
    return (f"{len(jobs)} job(s) had not converged (their validation loss was still improving: metrics.json "
            f"converged=false): their numbers measure the training budget as much as the setting; train them "
            f"on with aelab train resume=JOB_DIR trainer.epochs=MORE")


def shown_metrics(keys: list[str]) -> list[str]:
    """The terminal's columns: what the swept groups act on (CSV and Markdown hold every metric)."""
    touches = lambda group: any(k == group or k.startswith(group + ".") for k in keys)  # noqa: E731
    regularized = touches("reg") or touches("model")
    return ["mse", "psnr", *(["sharpness"] if touches("loss") or touches("corruption") else ()),
            *(SPARSITY if regularized else ()), *(["mse_*"] if touches("corruption") else ()), "probe_latent",
            *(f"sample_{name}" for name in SAMPLE_MEASURES)]


def known_eval_keys(overrides: list[str]) -> None:
    """The eval keys the overrides set exist (`aelab eval` would refuse the others: no record to report)."""
    defaults, absent = current_defaults(), object()
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key.startswith("eval.") and OmegaConf.select(defaults, key, default=absent) is absent:
            near = similar_key(defaults, key)
            raise ConfigError(f"no such key{f' (did you mean {near}?)' if near else ''}; aelab eval takes "
                              f"{', '.join(f'eval.{k}' for k in defaults.eval)}", key)


def report(sweep_dir: Path, overrides: list[str] = ()) -> dict:
    """Load, fold, print, and write report.csv, report.md and the plots into sweep_dir; with eval
    overrides, of the `aelab eval` records they name, into its folder report_<overrides>/ (the
    training-time report stays as it is)."""
    from .plots import make_plots

    check_overrides(list(overrides), EVAL_OVERRIDES, "eval.threshold=0.2, as given to aelab eval SWEEP_DIR")
    known_eval_keys(list(overrides))
    jobs, unreadable = load_jobs(sweep_dir, overrides)
    out = sweep_dir / output_name("report", list(overrides)) if overrides else sweep_dir
    out.mkdir(exist_ok=True)
    keys = swept_keys(jobs)
    rows = fold(jobs, keys)
    metrics = metric_names(jobs)
    shown = [m for m in shown_metrics(keys) if m in metrics or m == "mse_*"]
    shown = [n for m in shown for n in ([x for x in metrics if x.startswith("mse_")] if m == "mse_*" else [m])]
    print_table(rows, keys, shown, title=f"aelab report: {sweep_dir} ({len(jobs)} runs)")
    failed = [f"- {name}: {why}" for name, why in unfinished_jobs(sweep_dir, unreadable)]  # said, not dropped
    from ..console import console
    if overrides:
        console.print(f"test metrics: those aelab eval {' '.join(overrides)} recomputed "
                      f"({output_name('eval', list(overrides))}.json), not the end of training's", markup=False,
                      highlight=False, soft_wrap=True)
    if failed:
        console.print(f"{len(failed)} job(s) without results:\n" + "\n".join(failed), markup=False, highlight=False,
                      soft_wrap=True)
    sampled = sorted({job.sampled for job in jobs if job.sampled})
    if sampled:  # which chains the sample_* columns measure: the same file name is the same settings
        console.print(f"sample_* columns: the last state of {' / '.join(sampled)} in "
                      f"{sum(1 for job in jobs if job.sampled)} of {len(jobs)} runs", markup=False, highlight=False,
                      soft_wrap=True)
    unconverged = unconverged_note(rows)
    if unconverged:
        console.print(unconverged, markup=False, highlight=False, soft_wrap=True)
    annealed = annealed_samples(sweep_dir)
    if annealed:
        console.print(f"{ANNEALED}:\n" + "\n".join(annealed), markup=False, highlight=False, soft_wrap=True)
    csv_path, md_path = write_tables(rows, keys, metrics, failed, annealed, out, unconverged)
    plots = make_plots(rows, jobs, [k for k in keys if k != SEED_KEY], out,
                       record=output_name("eval", list(overrides)) if overrides else None)
    console.print(f"wrote {', '.join(p.name for p in [csv_path, md_path, *plots])} in {out}", markup=False,
                  highlight=False, soft_wrap=True)
    return {"jobs": len(jobs), "rows": len(rows), "swept": keys, "files": [csv_path, md_path, *plots]}
