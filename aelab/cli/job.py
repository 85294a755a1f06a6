"""One `aelab train` job: build the parts, train (or continue), measure the test split, write the results."""
from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from .. import console
from ..analysis.evaluate import finish
from ..analysis.tensorboard import config_text, log_final
from ..build import Parts, Trainer, build
from ..data import Splits
from ..runs import FAILED, read_results, write_json
from ..training import checkpoint
from ..training.checkpoint import Position
from ..training.faults import StopNow, StopSignals, TrainingFault, environment
from ..training.loop import fit, patience_ran_out


@dataclass
class Started:
    """A job built and placed, ready to train: its parts, where training stands, its TensorBoard writer."""
    cfg: DictConfig
    run_dir: Path
    parts: Parts
    pos: Position
    writer: SummaryWriter
    started_at: float
    first_step: int


def start(cfg: DictConfig, run_dir: Path, resume: bool = False, job_num: int | None = None,
          command: str | None = None, data: Splits | None = None) -> Started | dict:
    """Build one configuration's parts and place it: afresh, or from its checkpoint. A finished run that
    has nothing left to train gives its results (a dict) instead. `data`: the splits, read already."""
    started_at = time.time()
    parts = build(cfg, job_num, data)
    pos = checkpoint.load(parts, run_dir) if resume else Position()
    if resume and (run_dir / "metrics.json").exists():  # a finished run: train on, or leave it be
        if pos.epoch >= parts.trainer.epochs or patience_ran_out(pos, parts.trainer):
            return finished_already(run_dir, pos, parts.trainer)
        pos.stopped_epoch = None  # a larger trainer.patience (or none) trains an early-stopped run on
        (run_dir / "metrics.json").rename(run_dir / f"metrics.epochs-{pos.epoch}.json")  # kept, not overwritten
    writer = SummaryWriter(str(run_dir), purge_step=pos.step + 1 if resume else None)
    if not resume:
        writer.add_text("config", config_text(cfg))
        write_json(run_dir / "environment.json", environment(parts.device, parts.trainer.seed, command))
    return Started(cfg, run_dir, parts, pos, writer, started_at, pos.step)


def run(cfg: DictConfig, run_dir: Path, resume: bool = False, job_num: int | None = None,
        command: str | None = None, varied: list[str] = ()) -> dict:
    """Train one configuration; write TensorBoard events, checkpoints and metrics.json to run_dir.
    `command`: the aelab command with the job's own settings, for environment.json; `varied`: the keys
    its sweep varies, shown first in TensorBoard's HParams."""
    job = start(cfg, run_dir, resume, job_num, command)
    if isinstance(job, dict):
        return job
    seconds, step_mode = fit(job.parts, cfg, job.pos, run_dir, job.writer)
    return complete(job, seconds, step_mode, varied)


def complete(job: Started, seconds: float, step_mode: str, varied: list[str] = ()) -> dict:
    """A trained job's end: the best epoch's model measured on every split, metrics.json and the pictures."""
    parts, pos, run_dir, writer = job.parts, job.pos, job.run_dir, job.writer
    if pos.best_model is not None:  # the best epoch's model is the one measured (the last stays resumable)
        parts.model.load_state_dict(pos.best_model)
    with StopNow(f"during the final evaluation; training is complete in {run_dir / checkpoint.FILE}; "
                 f"finish with: aelab train resume={shlex.quote(str(run_dir))}"):
        metrics, grids, arrays = finish(parts, run_dir)
    trained = (pos.step - job.first_step) * parts.trainer.batch_size
    record = {**metrics, "started_at": job.started_at, "finished_at": time.time(), "epochs": parts.trainer.epochs,
              **convergence(pos, parts.trainer), "steps": pos.step, "seconds": round(seconds, 3),
              "samples_per_second": round(trained / seconds, 1) if seconds else 0.0, "device": str(parts.device),
              "step_mode": step_mode}
    with StopSignals():  # the results are written whole: a signal now waits the few milliseconds this takes
        log_final(writer, job.cfg, parts, metrics, grids, arrays, pos.step, varied)
        write_json(run_dir / "metrics.json", record)
    console.summary({"train": metrics["train"], "val": metrics["val"]}, title=f"aelab: {run_dir.name}")
    console.metrics_table(metrics["test"], title="test split")
    return record


def diverged(run_dir: Path, job_num: int, error: TrainingFault) -> float:
    """A sweep job stopped by a NaN or inf loss: its line, failed.json in its dir (the sweep's other jobs
    go on), and what its task returns: inf (Optuna refuses NaN; inf ranks the trial last in the study,
    which minimises)."""
    console.error(f"job {job_num} ({run_dir.name}): {error}")
    write_json(run_dir / FAILED, {"error": str(error), "exit_code": error.exit_code})
    return math.inf


def convergence(pos: Position, trainer: Trainer) -> dict:
    """metrics.json's verdict: the best epoch (the model measured), the epoch early stopping ended the run
    after (None: it trained all trainer.epochs), and whether it converged: it stopped early, or its last
    trainer.patience epochs (10 without patience) brought no relative improvement of trainer.min_delta
    (which a stop implies: it waits for as many)."""
    return {"epochs_trained": pos.epoch, "best_epoch": pos.best_epoch, "stopped_epoch": pos.stopped_epoch,
            "converged": pos.epoch - pos.improved_epoch >= trainer.window}


def finished_already(run_dir: Path, pos: Position, trainer: Trainer) -> dict:
    """Resuming a run that trained all its epochs (or stopped early) writes nothing: its results stay."""
    record = read_results(run_dir)
    resume = f"aelab train resume={shlex.quote(str(run_dir))}"
    further = (f"{resume} trainer.epochs={2 * pos.epoch}" if pos.epoch >= trainer.epochs else
               f"{resume} trainer.patience={2 * trainer.patience}")
    how = (f"trainer.epochs={pos.epoch}" if pos.epoch >= trainer.epochs else
           f"stopped early: {trainer.patience} epochs without improvement, trainer.patience={trainer.patience}")
    console.console.print(f"{run_dir} has finished training ({how}); nothing to do, metrics.json is unchanged. "
                          f"To train it further: {further}", markup=False, highlight=False, soft_wrap=True)
    console.summary({split: record[split] for split in ("train", "val")}, title=f"aelab: {run_dir.name}")
    return record
