"""`aelab COMMAND ...`: argv → the command; `aelab train` is a Hydra app over aelab's config groups."""
from __future__ import annotations

import importlib.util
import shlex
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .. import console
from ..registry import ConfigError
from ..runs import FAILED, disk_full, override_values, read_results
from . import stacking
from .overrides import check as check_overrides, varied_keys
from .rundirs import (MODES, check_dirs, drop_if_nothing_ran, held, kept_unless_trained, refuse_if_busy, resume_args,
                      resume_mode, resumed_dir, worked_in)

USAGE = """usage: aelab COMMAND [ARGS]

commands:
  train    train an autoencoder (Hydra app: GROUP=OPTION overrides, -m sweeps, --help, --cfg job)
           continue a stopped run with: aelab train resume=RUN_DIR (a stopped sweep: resume=SWEEP_DIR)
  eval     aelab eval RUN_DIR|SWEEP_DIR [eval.KEY=VALUE ...]: recompute the test metrics of a run
           (of each job of a sweep)
  sample   aelab sample RUN_DIR|SWEEP_DIR [sample.KEY=VALUE ...]: draw images from a trained model by
           alternately corrupting and denoising (chains from random pixels), or by Langevin steps along
           its score estimate (sample.method=langevin; through a sweep's models, one per sigma:
           sample.method=annealed), measured against the data
  report   aelab report SWEEP_DIR [eval.KEY=VALUE ...]: table, report.csv, report.md and plots of a
           sweep (with eval overrides: of the test metrics `aelab eval SWEEP_DIR` recomputed with them)

  --version  aelab's version and those of torch, hydra-core and Python

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
diverged_jobs: list[Path] = []  # the last sweep's jobs that stopped on a NaN or inf loss (SweepOutcome)
finished_jobs: list[Path] = []  # and those that hold results
swept: list[Path] = []  # and its folder


def shown(path: Path) -> str:
    """A path as the user would type it: relative to where aelab runs when it lies below, quoted for a shell."""
    path = Path(path).resolve()
    return shlex.quote(str(path.relative_to(Path.cwd().resolve()) if path.is_relative_to(Path.cwd().resolve())
                           else path))


@hydra.main(config_path="pkg://aelab.configs", config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float:
    """One job; returns the validation reconstruction error (what a sweeper minimises)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_num = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        # torch, once a job runs (--help stays fast); a Ctrl-C in these seconds leaves no empty run dir behind
        from ..training.faults import DISK_FULL, DIVERGED, TrainingFault, full_disk_stops
        from .job import diverged, run
        resume = resume_mode(cfg.resume, run_dir)
        if resume == "done":  # a requeued or repeated job that already finished
            done = read_results(run_dir)
            console.console.print(f"{run_dir}: finished already, its results kept", markup=False, highlight=False,
                                  soft_wrap=True)
            return done["val"]["recon"]
        command = shlex.join(["aelab", "train", *hydra_cfg.overrides.task])  # this job's, however launched
        if stacking.collecting is not None and job_num is not None:  # launcher=stacked: built now, trained with its group
            (run_dir / FAILED).unlink(missing_ok=True)
            return stacking.collecting.add(cfg, run_dir, resume, job_num, command, varied_keys(hydra_cfg))
        # a sweep job holds its own dir (a run's is held by train_command); a full disk is one line
        with held(run_dir if job_num is not None else None, "hydra.run.dir"), full_disk_stops(run_dir):
            (run_dir / FAILED).unlink(missing_ok=True)  # an earlier attempt's verdict; this one writes its own
            record = run(cfg, run_dir, resume=resume, job_num=job_num, command=command,
                         varied=varied_keys(hydra_cfg))
    except (ConfigError, OmegaConfBaseException) as e:
        drop_if_nothing_ran(cfg, run_dir)
        console.error(str(config_error(e)))
        sys.exit(2)
    except KeyboardInterrupt:  # before the training loop took the signals over (building parts, loading data)
        drop_if_nothing_ran(cfg, run_dir)
        raise
    except TrainingFault as e:
        if job_num is not None and (e.exit_code > 128 or e.exit_code == DISK_FULL):  # the sweep's later jobs never ran
            e = TrainingFault(f"{e}; or the whole sweep: aelab train resume={shlex.quote(hydra_cfg.sweep.dir)}",
                              e.exit_code)
        if job_num is not None and e.exit_code == DIVERGED:  # one diverged job; the sweep's others still run
            return diverged(run_dir, job_num, e)
        console.error(str(e) if job_num is None else f"job {job_num} ({run_dir.name}): {e}")
        sys.exit(e.exit_code)
    if job_num is None:
        console.console.print(f"results in {shown(run_dir)}; look at them: tensorboard --logdir {shown(run_dir)}",
                              markup=False, highlight=False, soft_wrap=True)
    return record["val"]["recon"]


class SweepOutcome(Callback):
    """hydra.callbacks entry: once every job of a sweep has returned, the jobs that left failed.json
    (and those that hold results). Read from the sweep dir, not from job return values: joblib and
    submitit run the jobs in other processes, and Hydra hands no job's return value back to the
    command line."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir, self.started = Path(config.hydra.sweep.dir), time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        fresh = self.started - 5  # a file system's clock may lag this one's a little; older files are earlier runs'
        diverged_jobs[:] = [p.parent for p in sorted(self.sweep_dir.glob(f"**/{FAILED}")) if p.stat().st_mtime >= fresh]
        finished_jobs[:] = [p.parent for p in self.sweep_dir.glob("**/metrics.json")]
        swept[:] = [self.sweep_dir]


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is not there either
        return False


def one_mode(args: list[str]) -> None:
    """Hydra does one thing per call, run, sweep, print the config or its info; two of them were its
    ValueError traceback."""
    named = {alias: name for name, aliases in MODES.items() for alias in aliases}
    modes = list(dict.fromkeys(named[a] for a in args if a in named))
    if len(modes) > 1:
        hint = "; without -m, --cfg job prints the config of one job with these overrides" if "-m" in modes else ""
        raise ConfigError(f"{modes[0]} and {modes[1]} cannot be combined: aelab train runs, sweeps (-m), prints "
                          f"the config (--cfg) or Hydra's info (--info), one per call{hint}", modes[0])


def require_plugins(args: list[str]) -> None:
    for arg in args:
        module = PLUGINS.get(arg)
        if module and not installed(module):
            package = module.split(".")[1].replace("_", "-")
            raise ConfigError(f"{arg} needs the Hydra plugin {package}; install it with: pip install 'aelab[sweep]'",
                              arg.split("=")[0].lstrip("+"))


def register_launchers() -> None:
    """aelab's own Hydra launchers (hydra_plugins/aelab_launchers). Hydra's plugin scan finds them in an
    installed aelab but not through an editable install's import hook: registered here for both."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.aelab_launchers import slurm, stacked

    Plugins.instance().register(stacked.StackedLauncher)
    if hasattr(slurm, "SlurmLauncher"):  # hydra-submitit-launcher is installed
        Plugins.instance().register(slurm.SlurmLauncher)


def train_command(args: list[str]) -> int:
    def launch() -> None:
        require_plugins(args)
        register_launchers()
        folder, key = worked_in(args)
        refuse_if_busy(folder, key)
        overrides = resume_args(args)
        one_mode(overrides)  # resume=SWEEP_DIR is a sweep (-m) too
        check_dirs(overrides)
        check_overrides(overrides)
        sys.argv = ["aelab train", *overrides]
        with held(folder, key), kept_unless_trained(resumed_dir(args)):
            train()
    diverged_jobs.clear()
    finished_jobs.clear()
    swept.clear()
    code = guarded(launch)
    if code == 0 and swept and finished_jobs:
        console.console.print(f"{len(finished_jobs)} job(s) with results in {shown(swept[0])}; the table and plots: "
                              f"aelab report {shown(swept[0])}", markup=False, highlight=False, soft_wrap=True)
    if code == 0 and diverged_jobs:
        others = f"{len(finished_jobs)} other job(s) finished" if finished_jobs else "no job finished"
        console.error(f"{len(diverged_jobs)} job(s) of the sweep stopped on a NaN or inf loss ({FAILED} in each: "
                      f"{', '.join(str(d) for d in diverged_jobs)}); {others}")
        return 3  # faults.DIVERGED (faults imports torch, which `aelab --help` need not load)
    return code


def each_run(args: list[str], action, usage: str) -> int:
    """`aelab eval` / `aelab sample`: `action(run_dir, overrides)` on a run, or on each job of a sweep
    that holds a checkpoint."""
    if not args or args[0].startswith("-"):
        print(usage)
        return 0 if args else 2
    target = Path(args[0])
    runs = [target] if (target / "checkpoint.pt").exists() else sorted(p.parent for p in target.glob("*/checkpoint.pt"))
    if len(runs) <= 1:
        return guarded(lambda: action(runs[0] if runs else target, args[1:]))
    typed = {override.partition("=")[0] for override in args[1:]} | {"override"}
    failed = []  # each run's own problem (a damaged checkpoint), one line naming it; the others go on
    for run in runs:
        try:
            action(run, args[1:])
        except (ConfigError, OmegaConfBaseException) as e:
            error = config_error(e)
            if error.key in typed:  # a bad override is wrong for every run: said once, at the first
                console.error(str(error))
                return 2
            failed.append(f"{run}: {error}")
    for line in failed:
        console.error(line)
    return 2 if failed else 0


def eval_command(args: list[str]) -> int:
    from ..analysis.evaluate import evaluate_run

    return each_run(args, evaluate_run, "usage: aelab eval RUN_DIR|SWEEP_DIR [eval.KEY=VALUE ...]   "
                                        "e.g. eval.noise.gaussian.noise_factor=0.5")


def sample_command(args: list[str]) -> int:
    from ..analysis.sampling import annealed_run, sample_run
    from ..samplers import SAMPLERS

    method = override_values(args[1:]).get("sample.method")
    if args and not args[0].startswith("-") and method in SAMPLERS and SAMPLERS.get(method)().over_sweep:
        return guarded(lambda: annealed_run(Path(args[0]), args[1:]))  # the sweep's jobs together
    return each_run(args, sample_run, "usage: aelab sample RUN_DIR|SWEEP_DIR [sample.KEY=VALUE ...]   "
                                      "e.g. sample.steps=200 sample.noise=0.3 sample.method=langevin")


def report_command(args: list[str]) -> int:
    from ..sweeps.report import report

    if not args or args[0].startswith("-"):
        print("usage: aelab report SWEEP_DIR [eval.KEY=VALUE ...]   (the folder of an `aelab train -m` sweep; "
              "with the overrides an `aelab eval SWEEP_DIR` was given, the test metrics it recomputed)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    return guarded(lambda: report(Path(args[0]), args[1:]))


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
    """Run a command; a ConfigError (or OmegaConf's) is one line on stderr and exit code 2, a full disk
    one line and exit code 4 (what was written before is kept: every file is written whole)."""
    try:
        action()
    except (ConfigError, OmegaConfBaseException) as e:
        console.error(str(config_error(e)))
        return 2
    except OSError as e:
        what = disk_full(e)
        if what is None:
            raise
        console.error(f"{what}: free space and run it again")
        return 4  # training.faults.DISK_FULL (faults imports torch, which `aelab --help` need not load)
    return 0


def version() -> str:
    """What a bug report needs, read from the installed packages' metadata (importing torch takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version as installed_version

    def of(package: str) -> str:
        try:
            return installed_version(package)
        except PackageNotFoundError:
            return "not installed"
    return (f"aelab {of('aelab')} (torch {of('torch')}, hydra-core {of('hydra-core')}, "
            f"Python {sys.version.split()[0]})")


COMMANDS = {"train": train_command, "eval": eval_command, "sample": sample_command, "report": report_command}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if args[0] in ("--version", "-V"):
        print(version())
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        console.error(f"unknown command '{args[0]}'; choose from: {', '.join(COMMANDS)} (or --help, --version)")
        return 2
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return command(args[1:])
    except Terminated:  # outside a training loop, which saves a checkpoint first (StopSignals)
        console.error(f"aelab {args[0]}: stopped (SIGTERM) before it finished; what it had written is kept")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        console.error(f"aelab {args[0]}: interrupted (SIGINT) before it finished; what it had written is kept")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (importing torch, reading the data): stopped as a Ctrl-C stops it,
    an empty run dir removed on the way out, with one line instead of a silent exit."""


def terminated(signum, frame) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
