"""A run dir's records: what makes a dir an aelab run, the names of its files, and reading and writing
them whole (written to a temporary file, then renamed)."""
from __future__ import annotations

import errno
import json
import os
import shlex
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from .registry import ConfigError

RESULTS = ("checkpoint.pt", "metrics.json")  # what makes a directory an aelab run
FAILED = "failed.json"  # what a sweep's diverged job leaves instead of metrics.json
SAMPLE_MEASURES = ("nearest_mse", "classes", "top_share", "sharpness", "change")  # per chain state, in sample*.json
EVAL_OVERRIDES = ("eval.", "device.")  # what `aelab eval` may override, and so what names its records
GRID_PAD = 2  # white pixels around each image of a run's grid pictures (reconstructions.png, ...)


def not_a_run(run_dir: Path, needs: str, key: str) -> ConfigError:
    """The error for a dir that is not a finished aelab run. A missing one may be a sweep job named by
    number alone: its dir is named by number and overrides (0_reg.weight=0.1,reg=l1)."""
    if run_dir.exists():
        return ConfigError(f"{run_dir} is not an aelab run (it needs {needs} and checkpoint.pt); "
                           f"pass a run dir under outputs/", key)
    jobs = sorted(run_dir.parent.glob(f"{run_dir.name}_*")) if run_dir.name.isdigit() else []
    where = (f"a sweep job's dir is named by its number and overrides: {jobs[0]}" if len(jobs) == 1
             else "pass a run dir under outputs/")
    return ConfigError(f"{run_dir}: no such dir; {where}", key)


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """`write` fills a temporary file, which is then renamed to `path`: a crash or a full disk never
    leaves half a file (a checkpoint, a JSON record, a picture, a table) in place of a good one, and a
    failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def disk_full(error: OSError) -> str | None:
    """What a full disk stopped, in words (None for another OSError): the file that could not be written.
    What was there before is kept: every record is written whole (write_whole)."""
    if error.errno != errno.ENOSPC:
        return None
    return (f"the disk is full: cannot write {error.filename or 'a file'} ({error.strerror}); what was written "
            f"before is kept")


def write_text(path: Path, text: str) -> None:
    write_whole(path, lambda tmp: tmp.write_text(text, newline=""))  # as written: a CSV's \r\n stays


def write_json(path: Path, record: dict) -> None:
    write_text(path, json.dumps(record, indent=2) + "\n")


def output_name(stem: str, overrides: list[str]) -> str:
    """What a command run on a finished run writes, named by its overrides (`eval_eval.threshold=0.2`),
    so that each setting keeps its own file."""
    return stem if not overrides else stem + "_" + "_".join(o.replace("/", "-") for o in overrides)


def check_overrides(overrides: list[str], allowed: tuple[str, ...], example: str) -> None:
    """Each a KEY=VALUE override of a key under `allowed` (what aelab eval, sample and report take)."""
    for override in overrides:
        key, sep, _ = override.partition("=")
        switch = key == "device" and "device." in allowed  # device=cpu: the group's option (a GPU run on a CPU)
        if not sep or not (key.startswith(allowed) or switch):
            raise ConfigError(f"takes KEY=VALUE overrides under {' or '.join(a + '*' for a in allowed)}, "
                              f"e.g. {example}; got '{override}'", "override")


def read_json(path: Path, fix: str) -> dict:
    """A run's JSON record; one that is not whole (cut short, edited by hand) is a ConfigError that
    names the file and `fix`."""
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{path} is unreadable ({str(e).splitlines()[0]}); {fix}", path.name) from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} is unreadable (not a JSON object); {fix}", path.name)
    return record


def read_yaml(path: Path, kind: type, key: str, fix: str):
    """A YAML record aelab or Hydra wrote (a run's .hydra/*.yaml, a sweep's multirun.yaml), which must
    hold a `kind`; one edited by hand into something else is a ConfigError naming it and `fix`."""
    try:
        found = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split()[:12])
        raise ConfigError(f"{path} is unreadable ({reason}); {fix}", key) from None
    if not isinstance(found, kind):
        raise ConfigError(f"{path} is unreadable (it holds no {kind.__name__}); {fix}", key)
    return found


def current_defaults() -> DictConfig:
    """This aelab's own configs/train.yaml, as shipped in the package."""
    from importlib.resources import files
    return OmegaConf.create(files("aelab.configs").joinpath("train.yaml").read_text())


def read_results(run_dir: Path) -> dict:
    """A finished run's metrics.json: its final train / val / test numbers."""
    path = run_dir / "metrics.json"
    fix = f"remove it, and aelab train resume={shlex.quote(str(run_dir))} evaluates the trained run again"
    record = read_json(path, fix)
    if not all(isinstance(record.get(split), dict) for split in ("train", "val", "test")):
        raise ConfigError(f"{path} is unreadable (it lacks the train, val or test numbers); {fix}", path.name)
    return record


def override_values(overrides: list[str]) -> dict[str, str]:
    """A run's recorded overrides (.hydra/overrides.yaml) as key → value as typed; `+` dropped."""
    return dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
