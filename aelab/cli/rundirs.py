"""Run and sweep dirs on the command line: continuing one (`resume=RUN_DIR`, `resume=SWEEP_DIR`), and
the checks made on a run or sweep dir before Hydra makes it."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from ..registry import ConfigError
from ..runs import FAILED, RESULTS, not_a_run, override_values, read_yaml

LOCK = ".aelab.lock"  # locked (flock) by the process that trains in a run or sweep dir, its PID inside; the OS
# releases the lock when that process ends, killed or not
HYDRA_ONLY = {".hydra", "train.log", LOCK}  # what a run dir holds before its job has written anything
# how long and where a resumed run goes on, and how it is measured: not what it trains
RESUME_MAY_CHANGE = ("trainer.epochs", "trainer.patience", "trainer.min_delta", "trainer.min_epochs",
                     "trainer.log_every", "trainer.checkpoint_every", "trainer.cuda_graph", "trainer.compile",
                     "trainer.tf32", "device", "eval", "sample", "hydra")
# Hydra's flags that choose what a call does, one per call: the name aelab's messages give → how it is typed
MODES = {"--run": ("-r", "--run"), "-m": ("-m", "--multirun"), "--cfg": ("-c", "--cfg"), "--info": ("-i", "--info"),
         "--shell-completion": ("-sc", "--shell-completion")}
MULTIRUN = MODES["-m"]
# the flags after which nothing runs: Hydra prints something and exits
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--version", *MODES["--cfg"], *MODES["--info"], *MODES["--shell-completion"])


def drop_if_nothing_ran(cfg: DictConfig, run_dir: Path) -> None:
    """A new run dir that holds only Hydra's own files is removed: leave no empty run behind."""
    if cfg.resume is False and set(p.name for p in run_dir.iterdir()) <= HYDRA_ONLY:
        shutil.rmtree(run_dir, ignore_errors=True)


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
    run_dir = resumed_dir(args)
    if run_dir is None:
        if override_values(args).get("resume", "").lower() == "true":
            raise ConfigError("give the run dir to continue: aelab train resume=outputs/DATE/TIME", "resume")
        return args
    if is_sweep(run_dir):
        return sweep_resume_args(run_dir, [a for a in args if not a.startswith("resume=")])
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file() or not (run_dir / "checkpoint.pt").exists():
        raise not_a_run(run_dir, ".hydra/overrides.yaml", "resume")
    fix = "it lists the overrides the run was started with (one '- key=value' a line): put it back, or start a new run"
    saved = [str(o) for o in read_yaml(overrides, list, "resume", fix) if not str(o).startswith("resume=")]
    rest = [a for a in args if not a.startswith(("resume=", "hydra.run.dir="))]
    ran_with = override_values(saved)
    for arg in rest:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if not any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE) and ran_with.get(key) != value:
            allowed = ", ".join(k + (".*" if k in ("eval", "sample", "hydra") else "") for k in RESUME_MAY_CHANGE)
            raise ConfigError(f"{arg} would change what {run_dir} trains (its results would mix two settings); "
                              f"a resumed run may change only {allowed}: start a new run for {arg}", "resume")
    return [*saved, *rest, f"hydra.run.dir={quoted(str(run_dir))}", "resume=true"]


def sweep_resume_args(sweep_dir: Path, rest: list[str]) -> list[str]:
    """`resume=SWEEP_DIR` → the sweep as it was started, in its dir, every job with resume=auto: a
    finished job is kept, a stopped one continues from its checkpoint, one that never ran starts."""
    record = sweep_dir / "multirun.yaml"  # Optuna's sweeper writes none: read a job's record to tell
    read = record if record.is_file() else next(sweep_dir.glob("*/.hydra/hydra.yaml"))
    fix = (f"it records how the sweep was started: put it back, or continue one job with "
           f"aelab train resume={sweep_dir}/JOB_DIR")
    hydra_cfg = read_yaml(read, dict, "resume", fix).get("hydra")
    if not isinstance(hydra_cfg, dict) or not isinstance(hydra_cfg.get("overrides"), dict):
        raise ConfigError(f"{read} is unreadable (it holds no hydra.overrides); {fix}", "resume")
    if "optuna" in str((hydra_cfg.get("sweeper") or {}).get("_target_", "")):
        raise ConfigError(f"{sweep_dir} is an Optuna study, whose trials are sampled afresh each time; to continue "
                          f"a study, give it hydra.sweeper.storage=sqlite:///FILE.db and run the same command again",
                          "resume")
    if not record.is_file():
        raise ConfigError(f"{sweep_dir} has no multirun.yaml, the record of how its sweep was started; continue "
                          f"one of its jobs with aelab train resume=JOB_DIR", "resume")
    rest = [a for a in rest if a not in MULTIRUN]
    changed = [a for a in rest if not a.startswith("hydra.")]
    if changed:
        raise ConfigError(f"a sweep continues as it was started; {' '.join(changed)} would make other jobs: start "
                          f"a new sweep for them (only hydra.* keys, e.g. hydra.launcher.n_jobs, may change)", "resume")
    typed = hydra_cfg["overrides"]
    kept = [str(o) for o in typed.get("hydra") or [] if not str(o).startswith(("hydra.mode=", "hydra.sweep.dir="))]
    task = [str(o) for o in typed.get("task") or [] if not str(o).startswith("resume=")]
    return ["-m", *kept, *task, *rest, f"hydra.sweep.dir={quoted(str(sweep_dir))}", "resume=auto"]


def quoted(value: str) -> str:
    """A value as one quoted Hydra override value: a sweep job's dir name holds '=' and ','."""
    return "'" + value.replace("'", "\\'") + "'"


def check_dirs(args: list[str]) -> None:
    """The run or sweep dir, before Hydra makes it: one that holds results is never written into, and
    one that cannot be made (under a file, on a read-only disk) is refused with the key to change."""
    if {"resume=true", "resume=auto"} & set(args) or set(INFO_FLAGS) & set(args):
        return  # continuing: the dirs exist and hold this very run or sweep; or nothing will run
    given = dict(arg.split("=", 1) for arg in args if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
    for key, value in given.items():
        used = [p for name in RESULTS for p in Path(value).expanduser().glob(f"**/{name}")] if value else []
        if used:
            raise ConfigError(f"{value} already holds aelab results ({used[0]}); choose a new dir, "
                              f"or continue a run with aelab train resume=RUN_DIR", key)
    key = "hydra.sweep.dir" if set(MULTIRUN) & set(args) else "hydra.run.dir"
    value = given.get(key) or "outputs"  # both default to a dir under ./outputs
    path = Path(value).expanduser().absolute()
    nearest = next(p for p in (path, *path.parents) if p.exists())
    try:  # what Hydra will do, tried where it would fail: make a dir in the nearest existing one
        os.rmdir(tempfile.mkdtemp(prefix=".aelab-check-", dir=nearest))
    except OSError as e:
        raise ConfigError(f"cannot make {value}: {nearest}: {e.strerror}; give a dir you can write in, "
                          f"e.g. {key}=/tmp/aelab/{key.split('.')[1]}", key) from None


def resumed_dir(args: list[str]) -> Path | None:
    """The run or sweep dir a `resume=DIR` on the command line continues (None for none, auto, false, true)."""
    value = override_values(args).get("resume")
    return Path(value).expanduser() if value and value.lower() not in ("auto", "false", "true") else None


def records(job: Path) -> dict[Path, bytes]:
    """What a resume that trains nothing must leave as it was: Hydra's .hydra/ records (rewritten before
    the job starts) and the verdict of a diverged attempt."""
    return {path: path.read_bytes() for path in [*sorted((job / ".hydra").glob("*")), job / FAILED] if path.is_file()}


def stamp(job: Path) -> tuple[int, int] | None:
    """When and how large the job's checkpoint was written: a job that trains writes it again."""
    checkpoint = job / "checkpoint.pt"
    return (checkpoint.stat().st_mtime_ns, checkpoint.stat().st_size) if checkpoint.exists() else None


@contextmanager
def kept_unless_trained(folder: Path | None) -> Iterator[None]:
    """`aelab train resume=RUN_DIR` (or SWEEP_DIR) writes nothing into a run it does not train (one that
    had finished, or a resume that fails): each such job's records are put back as they were, and a
    sweep's multirun.yaml where no job trained."""
    if folder is None:
        yield
        return
    jobs = [folder] if (folder / ".hydra").is_dir() else sorted(p.parent for p in folder.glob("*/.hydra"))
    kept, stamps = {job: records(job) for job in jobs}, {job: stamp(job) for job in jobs}
    sweep = {path: path.read_bytes() for path in [folder / "multirun.yaml"] if path.is_file()}
    try:
        yield
    finally:
        untouched = [job for job in jobs if stamp(job) == stamps[job]]
        for job in untouched:
            for path in set(records(job)) - set(kept[job]):
                path.unlink()
            for path, text in kept[job].items():
                if not path.is_file() or path.read_bytes() != text:
                    path.write_bytes(text)
        if len(untouched) == len(jobs):
            for path, text in sweep.items():
                path.write_bytes(text)


def worked_in(args: list[str]) -> tuple[Path | None, str]:
    """The run or sweep dir this command line trains in, where it names one (given, or resumed), and its
    key; None for a dir Hydra names from the time, which no other process can be using."""
    resumed = resumed_dir(args)
    multirun = bool(set(MULTIRUN) & set(args)) or (resumed is not None and is_sweep(resumed))
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    named = given[-1] if given and "${" not in given[-1] else None  # an interpolation: Hydra resolves it, later
    return resumed or (Path(named).expanduser() if named else None), key


def is_sweep(folder: Path) -> bool:
    """A sweep's folder (its multirun.yaml, or Optuna's jobs' records), not one run's."""
    return (folder / "multirun.yaml").is_file() or any(folder.glob("*/.hydra/hydra.yaml"))


def in_use(folder: Path, holder: str, key: str) -> ConfigError:
    return ConfigError(f"{folder} is in use by process {holder} (aelab train); wait for it to end, or stop it "
                       f"(Ctrl-C or kill {holder}: it saves a checkpoint) and continue it with aelab train "
                       f"resume={folder}", key)


def holder(lock_file) -> str | None:
    """Take the lock of an open lock file (closing the file lets it go); the PID of the process that
    holds it instead, if one does."""
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        return lock_file.read().strip() or "?"
    return None


def refuse_if_busy(folder: Path | None, key: str) -> None:
    """Before anything is written: another process training in `folder` is said at once."""
    if folder is None or not (folder / LOCK).is_file():
        return
    with open(folder / LOCK) as f:
        if (pid := holder(f)) is not None:
            raise in_use(folder, pid, key)


@contextmanager
def held(folder: Path | None, key: str) -> Iterator[None]:
    """`folder` for this process alone while the block runs: a second process is refused, naming this
    one's PID (refuse_if_busy); the lock goes when the block ends or the process dies."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:  # closed when the block ends: the lock goes with it
        if (pid := holder(f)) is not None:
            raise in_use(folder, pid, key)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
