"""A sweep's data model, read from its run dirs: each finished job (its overrides, config and test
metrics) and the rows of jobs that share a setting, seeds folded. The report and its plots read these."""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from ..registry import ConfigError
from ..runs import FAILED, SAMPLE_MEASURES, output_name, override_values, read_json, read_results

SEED_KEY = "trainer.seed"
PLUMBING = ("resume", "launcher", "paths.", "data.root", "data.download", "hydra")  # override keys (prefixes)
LABELS = {"mse": "test MSE per element", "bce": "test BCE per element", "mae": "test MAE per element",
          "psnr": "test PSNR (dB)", "sharpness": "sharpness (gradient energy, output / input)",
          "population_sparsity": "population sparsity (fraction active)",
          "lifetime_sparseness": "lifetime sparseness (Vinje & Gallant)",
          "dead_fraction": "dead units (fraction)", "mean_activation": "mean latent activation",
          "sensitivity": "encoder sensitivity ||J||_F^2",
          "jacobian_rank": "directions the encoder responds to (Jacobian participation ratio)",
          "feature_spread": "share of the image a unit in use draws",
          "probe_latent": "linear-probe accuracy (codes)", "probe_pixels": "linear-probe accuracy (pixels)",
          "val_total": "validation loss (total)"}
SAMPLE_FIX = "remove it, or write it again with aelab sample"


@dataclass
class Job:
    path: Path
    overrides: dict[str, str]  # key → value as typed on the command line (`reg.weight` → `1e-3`)
    config: dict
    metrics: dict[str, float]  # the test metrics, plus val_total (and sample_*: its chains' last state)
    choices: dict[str, str] = field(default_factory=dict)  # config group → the option it ran with
    sampled: str | None = None  # the `aelab sample` record its sample_* metrics come from, and its method
    converged: bool | None = None  # metrics.json's verdict (None: a run of an aelab before it was recorded)

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
    def converged(self) -> str:
        """How many of its jobs converged, as "2/2"; "?" where none says (runs of an older aelab)."""
        told = [j.converged for j in self.jobs if j.converged is not None]
        return f"{sum(told)}/{len(self.jobs)}" if told else "?"

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
        jobs.append(Job(metrics_path.parent, overrides_typed, config, metrics, choices, sampled,
                        record.get("converged")))
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
