"""`aelab report SWEEP_DIR [eval.KEY=VALUE ...]`: one row per setting of a sweep (seeds folded to
mean ± std), CSV, Markdown and the plots that fit what was swept; with eval overrides, of the test
metrics `aelab eval` recomputed with them instead of those measured at the end of training."""
from __future__ import annotations

import csv
import io
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from .runs import (EVAL_OVERRIDES, FAILED, SAMPLE_MEASURES, check_overrides, output_name, override_values, read_json,
                   read_results, write_text)
from .registry import ConfigError

SEED_KEY = "trainer.seed"
ANNEALED = "annealed Langevin through the sweep's models (aelab sample SWEEP_DIR sample.method=annealed)"
PLUMBING = ("resume", "launcher", "paths.", "data.root", "data.download", "hydra")  # override keys (prefixes)
SPARSITY = ("population_sparsity", "dead_fraction", "mean_activation", "sensitivity", "jacobian_rank",
            "feature_spread")
SHORT = {"population_sparsity": "active", "dead_fraction": "dead", "mean_activation": "mean act",
         "sensitivity": "||J||²", "jacobian_rank": "J rank", "feature_spread": "spread", "probe_latent": "probe",
         "val_total": "val", "sharpness": "sharp"}
LABELS = {"mse": "test MSE per element", "bce": "test BCE per element", "mae": "test MAE per element",
          "psnr": "test PSNR (dB)", "sharpness": "sharpness (gradient energy, output / input)",
          "population_sparsity": "population sparsity (fraction active)",
          "dead_fraction": "dead units (fraction)", "mean_activation": "mean latent activation",
          "sensitivity": "encoder sensitivity ||J||_F^2",
          "jacobian_rank": "directions the encoder responds to (Jacobian participation ratio)",
          "feature_spread": "share of the image a unit in use draws",
          "probe_latent": "linear-probe accuracy (codes)", "probe_pixels": "linear-probe accuracy (pixels)",
          "val_total": "validation loss (total)"}


@dataclass
class Job:
    path: Path
    overrides: dict[str, str]  # key → value as typed on the command line (`reg.weight` → `1e-3`)
    config: dict
    metrics: dict[str, float]  # the test metrics, plus val_total (and sample_*: its chains' last state)
    choices: dict[str, str] = field(default_factory=dict)  # config group → the option it ran with
    sampled: str | None = None  # the `aelab sample` record its sample_* metrics come from, and its method

    def value(self, key: str) -> str:
        """Its value for an override key: as typed where the job set it, else what it ran with (the
        default): runs that set different keys (loss=bce in one, reg=l1 in the other) compare in full."""
        if key in self.overrides:  # true as typed, True as Optuna's sweeper records it: one value
            value = self.overrides[key]
            return value.lower() if value.lower() in ("true", "false") else value
        if key in self.choices:
            return self.choices[key]
        node = self.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return "" if node is None else str(node).lower() if isinstance(node, bool) else str(node)


@dataclass
class Row:
    setting: dict[str, str]  # swept key → value, seed excluded
    jobs: list[Job]

    def values(self, metric: str) -> list[float]:
        return [j.metrics[metric] for j in self.jobs if metric in j.metrics]

    def mean_std(self, metric: str) -> tuple[float, float]:
        values = self.values(metric)
        if not values:
            return math.nan, math.nan
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return mean, std

    @property
    def shown(self) -> dict[str, str]:
        """The setting as the table and the plots show it: sampled numbers cut to 4 significant digits."""
        return {k: short(v) for k, v in self.setting.items()}

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.shown.items()) or "run"


def short(value: str) -> str:
    """An Optuna sample's 0.0015676677195506068 as 0.001568; what was typed (1e-3, 0.25, an integer) as it was.
    report.csv keeps every value whole."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and "." in value and math.isfinite(number) else value


def evaluated(results: dict, job_dir: Path, record_name: str | None, sweep_dir: Path, overrides: list[str]) -> dict:
    """A job's test metrics: its metrics.json's (`results`), or, given record_name, that `aelab eval`
    record's, which a job without one cannot be reported by (a ConfigError that says how to write it)."""
    if record_name is None:
        return results["test"]
    path = job_dir / record_name
    if not path.is_file():
        held = sorted(p.name for p in job_dir.glob("eval*.json"))
        raise ConfigError(f"no {record_name} (aelab eval records here: {', '.join(held) or 'none'}); write it: "
                          f"aelab eval {shlex.join([str(sweep_dir), *overrides])}", record_name)
    fix = f"remove it, and aelab eval {shlex.join([str(job_dir), *overrides])} writes it again"
    record = read_json(path, fix)
    if not isinstance(record.get("test"), dict):
        raise ConfigError(f"{path} is unreadable (not an aelab eval record); {fix}", record_name)
    return record["test"]


def load_jobs(sweep_dir: Path, overrides: list[str] = ()) -> tuple[list[Job], dict[Path, str]]:
    """Every finished job below sweep_dir (a metrics.json beside Hydra's .hydra/ record), and each
    metrics.json (or `aelab eval` record named by `overrides`) that cannot be read, with why: every
    file read once."""
    jobs, unreadable = [], {}
    record_name = f"{output_name('eval', list(overrides))}.json" if overrides else None
    for metrics_path in sorted(sweep_dir.glob("**/metrics.json")):
        hydra_dir = metrics_path.parent / ".hydra"
        try:
            record = read_results(metrics_path.parent)
            test = evaluated(record, metrics_path.parent, record_name, sweep_dir, list(overrides))
        except ConfigError as e:  # listed by unfinished_jobs, under the table
            unreadable[metrics_path.parent] = e.message
            continue
        if not (hydra_dir / "overrides.yaml").is_file():
            continue
        overrides_typed = override_values(yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or [])
        metrics = {**test, "val_total": record["val"]["total"]}
        sampled = newest_sample(metrics_path.parent)
        if sampled:
            measures, method = sample_metrics(sampled)
            metrics.update(measures)
            sampled = f"{sampled.name} ({method})"
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
        ran = yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) if (hydra_dir / "hydra.yaml").is_file() else {}
        choices = {k: str(v) for k, v in ran["hydra"]["runtime"]["choices"].items()} if ran else {}
        jobs.append(Job(metrics_path.parent, overrides_typed, config, metrics, choices, sampled))
    if not jobs and record_name:  # the records there say whether the overrides were typed in another order
        held = sorted({path.name for path in sweep_dir.glob("**/eval*.json")})
        raise ConfigError(f"no finished job under {sweep_dir} holds {record_name} (aelab eval records there: "
                          f"{', '.join(held) or 'none'}); write them: aelab eval "
                          f"{shlex.join([str(sweep_dir), *overrides])}", record_name)
    if not jobs:
        unfinished = unfinished_jobs(sweep_dir, unreadable)
        if unfinished:
            raise ConfigError(f"no finished jobs under {sweep_dir} yet; {len(unfinished)} without results: "
                              + "; ".join(f"{name}: {why}" for name, why in unfinished), "SWEEP_DIR")
        raise ConfigError(f"no finished jobs (metrics.json with .hydra/overrides.yaml) under {sweep_dir}; "
                          f"pass the folder of an `aelab train -m` sweep", "SWEEP_DIR")
    return jobs, unreadable


def newest_sample(job_dir: Path) -> Path | None:
    """The job's `aelab sample` record written last (sample.json, or sample_<overrides>.json)."""
    found = sorted(job_dir.glob("sample*.json"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


SAMPLE_FIX = "remove it, or write it again with aelab sample"


def sample_metrics(path: Path, record: dict | None = None) -> tuple[dict[str, float], str]:
    """The measures of the chains' last recorded state, as sample_<measure>, and the sampling method
    (records written before sample.method existed are the chain's), of the record at `path` (`record`:
    already read from it)."""
    record = read_json(path, SAMPLE_FIX) if record is None else record
    try:
        last = record["chain"][-1]
        method = str(record.get("sample", {}).get("method", "chain"))
        return {f"sample_{name}": float(last[name]) for name in SAMPLE_MEASURES}, method
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise unreadable_sample(path) from None


def unreadable_sample(path: Path) -> ConfigError:
    return ConfigError(f"{path} is unreadable (not an aelab sample record); {SAMPLE_FIX}", path.name)


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


def unfinished_jobs(sweep_dir: Path, unreadable: dict[Path, str]) -> list[tuple[str, str]]:
    """(job dir relative to sweep_dir, why it has no results): its error, for a job that stopped on a
    NaN or inf loss (failed.json) or whose metrics.json cannot be read (`unreadable`, from load_jobs);
    for one stopped before its end (a checkpoint only), how to go on."""
    failed = {path.parent: read_json(path, "remove it and rerun the job").get("error", "diverged")
              for path in sweep_dir.glob(f"**/{FAILED}")}
    failed.update(unreadable)
    stopped = {path.parent: f"stopped before it finished (checkpoint.pt, no metrics.json); "
                            f"{continue_command(path.parent)}"
               for path in sweep_dir.glob("**/checkpoint.pt")
               if not (path.parent / "metrics.json").exists() and path.parent not in failed}
    return [(str(job.relative_to(sweep_dir)), why) for job, why in sorted({**failed, **stopped}.items())]


def continue_command(job_dir: Path) -> str:
    """How a stopped job goes on: with its sweep, the nearest folder above it that holds a multirun.yaml
    (`aelab report outputs` reads many sweeps and single runs), else on its own."""
    sweep = next((p for p in job_dir.parents if (p / "multirun.yaml").is_file()), None)
    if sweep is None:
        return f"continue it: aelab train resume={shlex.quote(str(job_dir))}"
    return f"continue the sweep: aelab train resume={shlex.quote(str(sweep))}"


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order; the seed last. Keys
    that say where and how a job ran, not what it trained (a resumed job's resume=true), are no factor."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides if not k.startswith(PLUMBING)))
    return [k for k in keys if len({j.value(k) for j in jobs}) > 1]


def fold(jobs: list[Job], keys: list[str]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for job in jobs:
        setting = {k: job.value(k) for k in keys if k != SEED_KEY}
        rows.setdefault(tuple(setting.items()), Row(setting, [])).jobs.append(job)
    return list(rows.values())


def metric_names(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(m for j in jobs for m in j.metrics))


def fmt(mean: float, std: float, n: int) -> str:
    """mean ± sample std over seeds; "-" where no job of the row has the metric (eval.probe=false, say)."""
    return "-" if n == 0 else f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {std:.2g}"


def write_tables(rows: list[Row], keys: list[str], metrics: list[str], failed: list[str], annealed: list[str],
                 out: Path) -> tuple[Path, Path]:
    """report.csv, and report.md with the jobs without results (`failed` lines) and the sweep's annealed
    samples (`annealed` lines) under its table."""
    setting_keys = [k for k in keys if k != SEED_KEY]
    csv_path, md_path = out / "report.csv", out / "report.md"
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow([*setting_keys, "runs", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))])
    for row in rows:
        stats = [v for m in metrics for v in row.mean_std(m)]
        writer.writerow([*row.setting.values(), len(row.jobs), *stats])
    write_text(csv_path, table.getvalue())
    header = [*setting_keys, "runs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [fmt(*row.mean_std(m), len(row.values(m))) for m in metrics]
        lines.append("| " + " | ".join([*row.shown.values(), str(len(row.jobs)), *cells]) + " |")
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

    from .console import console
    table = Table(title=escape(title))  # a narrow terminal folds cells onto more lines rather than cut them short
    for key in [k for k in keys if k != SEED_KEY] + ["runs"]:
        table.add_column(key, overflow="fold")
    for m in metrics:
        table.add_column(SHORT.get(m, m.replace("mse_", "mse ").replace("sample_", "sample ")), justify="right",
                         overflow="fold")
    for row in rows:
        table.add_row(*map(escape, row.shown.values()), str(len(row.jobs)),
                      *(fmt(*row.mean_std(m), len(row.values(m))) for m in metrics))
    if console.is_terminal:
        console.print(table)
    else:  # piped into a file or a log, the table and its title get the width they need: there is no screen to fit
        table.min_width = cell_len(title)  # the title (the sweep's path) on one line, not folded to the table's width
        needed = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
        Console(file=console.file, width=max(console.width, needed)).print(table)


def shown_metrics(keys: list[str]) -> list[str]:
    """The terminal's columns: what the swept groups act on (CSV and Markdown hold every metric)."""
    touches = lambda group: any(k == group or k.startswith(group + ".") for k in keys)  # noqa: E731
    regularized = touches("reg") or touches("model")
    return ["mse", "psnr", *(["sharpness"] if touches("loss") or touches("corruption") else ()),
            *(SPARSITY if regularized else ()), *(["mse_*"] if touches("corruption") else ()), "probe_latent",
            *(f"sample_{name}" for name in SAMPLE_MEASURES)]


def report(sweep_dir: Path, overrides: list[str] = ()) -> dict:
    """Load, fold, print, and write report.csv, report.md and the plots into sweep_dir; with eval
    overrides, of the `aelab eval` records they name, into its folder report_<overrides>/ (the
    training-time report stays as it is)."""
    from .plots import make_plots

    check_overrides(list(overrides), EVAL_OVERRIDES, "eval.threshold=0.2, as given to aelab eval SWEEP_DIR")
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
    from .console import console
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
    annealed = annealed_samples(sweep_dir)
    if annealed:
        console.print(f"{ANNEALED}:\n" + "\n".join(annealed), markup=False, highlight=False, soft_wrap=True)
    csv_path, md_path = write_tables(rows, keys, metrics, failed, annealed, out)
    plots = make_plots(rows, jobs, [k for k in keys if k != SEED_KEY], out,
                       record=output_name("eval", list(overrides)) if overrides else None)
    console.print(f"wrote {', '.join(p.name for p in [csv_path, md_path, *plots])} in {out}", markup=False,
                  highlight=False, soft_wrap=True)
    return {"jobs": len(jobs), "rows": len(rows), "swept": keys, "files": [csv_path, md_path, *plots]}
