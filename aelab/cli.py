"""`aelab COMMAND ...`: argv → the command; `aelab train` is a Hydra app over aelab's config groups."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from . import console
from .overrides import check as check_overrides
from .registry import ConfigError

USAGE = """usage: aelab COMMAND [ARGS]

commands:
  train    train an autoencoder (Hydra app: GROUP=OPTION overrides, -m sweeps, --help, --cfg job)
           continue a stopped run with: aelab train resume=RUN_DIR
  eval     aelab eval RUN_DIR [eval.KEY=VALUE ...]: recompute a finished run's test metrics
  report   aelab report SWEEP_DIR: table, report.csv, report.md and plots of a sweep

examples:
  aelab train loss=bce reg=kl model=sparse_kl
  aelab train -m reg=l1 reg.weight=1e-4,1e-3,1e-2,1e-1,1
  aelab train --help
"""
PLUGINS = {  # command-line choice → the Hydra plugin it needs (pip install 'aelab[sweep]')
    "launcher=parallel": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
    "launcher=local": "hydra_plugins.hydra_submitit_launcher",
    "launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "+experiment=optuna_search": "hydra_plugins.hydra_optuna_sweeper",
    "hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper",
}
RESULTS = ("checkpoint.pt", "metrics.json")  # what makes a directory an aelab run
FAILED = "failed.json"  # what a sweep's diverged job leaves instead of metrics.json
diverged_jobs: list[Path] = []  # this process's sweep jobs that stopped on a NaN or inf loss
HYDRA_ONLY = {".hydra", "train.log"}


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float:
    """One job; returns the validation reconstruction error (what a sweeper minimises)."""
    from .faults import DIVERGED, TrainingFault
    from .train import run  # torch is imported only once a job runs: --help stays fast

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_num = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        resume = resume_mode(cfg.resume, run_dir)
        if resume == "done":  # a requeued or repeated job that already finished
            return json.loads((run_dir / "metrics.json").read_text())["val"]["recon"]
        record = run(cfg, run_dir, resume=resume, job_num=job_num)
    except (ConfigError, OmegaConfBaseException) as e:
        if cfg.resume is False and set(p.name for p in run_dir.iterdir()) <= HYDRA_ONLY:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no empty run behind
        console.error(str(config_error(e)))
        sys.exit(2)
    except TrainingFault as e:
        console.error(str(e) if job_num is None else f"job {job_num} ({run_dir.name}): {e}")
        if job_num is not None and e.exit_code == DIVERGED:  # one diverged job; the sweep's others still run
            (run_dir / FAILED).write_text(json.dumps({"error": str(e), "exit_code": e.exit_code}, indent=2) + "\n")
            diverged_jobs.append(run_dir)
            return math.inf  # Optuna refuses NaN; inf ranks the trial last in the study, which minimises
        sys.exit(e.exit_code)
    return record["val"]["recon"]


def resume_mode(value, run_dir: Path) -> bool | str:
    """resume=false|true|auto → whether to load run_dir's checkpoint ("done": nothing left to do)."""
    held = [name for name in RESULTS if (run_dir / name).exists()]
    if value == "auto":
        return "done" if "metrics.json" in held else "checkpoint.pt" in held
    if value is True:
        return True
    if value is False:
        if held:
            raise ConfigError(f"{run_dir} already holds an aelab run; choose a new dir, or continue it with "
                              f"aelab train resume={run_dir}", "hydra.run.dir")
        return False
    raise ConfigError(f"must be false, auto, or a run dir (aelab train resume=RUN_DIR), got {value!r}", "resume")


def resume_args(args: list[str]) -> list[str]:
    """`resume=RUN_DIR` → that run's own overrides, in its own dir, with resume on."""
    wanted = [a for a in args if a.startswith("resume=")]
    if not wanted:
        return args
    value = wanted[-1].split("=", 1)[1]
    if value.lower() in ("auto", "false"):
        return args
    if value.lower() == "true":
        raise ConfigError("give the run dir to continue: aelab train resume=outputs/DATE/TIME", "resume")
    run_dir = Path(value).expanduser()
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file() or not (run_dir / "checkpoint.pt").exists():
        raise ConfigError(f"{run_dir} is not an aelab run (it needs .hydra/overrides.yaml and checkpoint.pt); "
                          f"pass a run dir under outputs/", "resume")
    saved = [o for o in yaml.safe_load(overrides.read_text()) or [] if not o.startswith("resume=")]
    rest = [a for a in args if not a.startswith(("resume=", "hydra.run.dir="))]
    return [*saved, *rest, f"hydra.run.dir={run_dir}", "resume=true"]


def refuse_used_dirs(args: list[str]) -> None:
    """An explicit run or sweep dir that already holds results is never written into."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and not {"resume=true", "resume=auto"} & set(args):
            used = [p for name in RESULTS for p in Path(value).expanduser().glob(f"**/{name}")]
            if used:
                raise ConfigError(f"{value} already holds aelab results ({used[0]}); choose a new dir, "
                                  f"or continue a run with aelab train resume=RUN_DIR", key)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is not there either
        return False


def require_plugins(args: list[str]) -> None:
    for arg in args:
        module = PLUGINS.get(arg)
        if module and not installed(module):
            package = module.split(".")[1].replace("_", "-")
            raise ConfigError(f"{arg} needs the Hydra plugin {package}; install it with: pip install 'aelab[sweep]'",
                              arg.split("=")[0].lstrip("+"))


def train_command(args: list[str]) -> int:
    def launch() -> None:
        require_plugins(args)
        overrides = resume_args(args)
        refuse_used_dirs(overrides)
        check_overrides(overrides)
        sys.argv = ["aelab train", *overrides]
        train()
    code = guarded(launch)
    if code == 0 and diverged_jobs:
        console.error(f"{len(diverged_jobs)} job(s) of the sweep stopped on a NaN or inf loss ({FAILED} in each: "
                      f"{', '.join(str(d) for d in diverged_jobs)}); the other jobs finished")
        return 3  # faults.DIVERGED (faults imports torch, which `aelab --help` need not load)
    return code


def eval_command(args: list[str]) -> int:
    from .train import evaluate_run

    if not args or args[0].startswith("-"):
        print("usage: aelab eval RUN_DIR [eval.KEY=VALUE ...]   e.g. eval.noise.gaussian.noise_factor=0.5")
        return 0 if args else 2
    return guarded(lambda: evaluate_run(Path(args[0]), args[1:]))


def report_command(args: list[str]) -> int:
    from .report import report

    if len(args) != 1 or args[0].startswith("-"):
        print("usage: aelab report SWEEP_DIR   (the folder of an `aelab train -m` sweep)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    return guarded(lambda: report(Path(args[0])))


def config_error(error: Exception) -> ConfigError:
    """OmegaConf's errors (a key the config lacks, say after ~trainer.epochs) as aelab's one line."""
    if isinstance(error, ConfigError):
        return error
    key = getattr(error, "full_key", None) or None
    if isinstance(error, MissingMandatoryValue):
        return ConfigError(f"has no value; set it, e.g. {key}=VALUE", key)
    if key and ("Missing key" in str(error) or "not in struct" in str(error)):
        return ConfigError(f"is missing from the config; put it back, e.g. +{key}=VALUE", key)
    return ConfigError(console.first_line(error), key)


def guarded(action) -> int:
    """Run a command; a ConfigError (or OmegaConf's) is one line on stderr and exit code 2."""
    try:
        action()
    except (ConfigError, OmegaConfBaseException) as e:
        console.error(str(config_error(e)))
        return 2
    return 0


COMMANDS = {"train": train_command, "eval": eval_command, "report": report_command}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        console.error(f"unknown command '{args[0]}'; choose from: {', '.join(COMMANDS)}")
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
