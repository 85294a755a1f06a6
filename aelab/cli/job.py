"""One `aelab train` job: build the parts, train (or continue), measure the test split, write the results."""
from __future__ import annotations

import shlex
import time
from pathlib import Path

from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from .. import console
from ..analysis.evaluate import finish
from ..analysis.tensorboard import config_text, log_final
from ..build import build
from ..runs import read_results, write_json
from ..training import checkpoint
from ..training.checkpoint import Position
from ..training.faults import StopNow, StopSignals, environment
from ..training.loop import fit


def run(cfg: DictConfig, run_dir: Path, resume: bool = False, job_num: int | None = None,
        command: str | None = None, varied: list[str] = ()) -> dict:
    """Train one configuration; write TensorBoard events, checkpoints and metrics.json to run_dir.
    `command`: the aelab command with the job's own settings, for environment.json; `varied`: the keys
    its sweep varies, shown first in TensorBoard's HParams."""
    started_at = time.time()
    parts = build(cfg, job_num)
    pos = checkpoint.load(parts, run_dir) if resume else Position()
    if resume and (run_dir / "metrics.json").exists():  # a finished run: train on, or leave it be
        if pos.epoch >= parts.trainer.epochs:
            return finished_already(run_dir, pos.epoch)
        (run_dir / "metrics.json").rename(run_dir / f"metrics.epochs-{pos.epoch}.json")  # kept, not overwritten
    writer = SummaryWriter(str(run_dir), purge_step=pos.step + 1 if resume else None)
    if not resume:
        writer.add_text("config", config_text(cfg))
        write_json(run_dir / "environment.json", environment(parts.device, parts.trainer.seed, command))
    first_step = pos.step
    seconds, step_mode = fit(parts, cfg, pos, run_dir, writer)
    with StopNow(f"during the final evaluation; training is complete in {run_dir / checkpoint.FILE}; "
                 f"finish with: aelab train resume={shlex.quote(str(run_dir))}"):
        metrics, grids, arrays = finish(parts, run_dir)
    trained = (pos.step - first_step) * parts.trainer.batch_size
    record = {**metrics, "started_at": started_at, "finished_at": time.time(), "epochs": parts.trainer.epochs,
              "steps": pos.step, "seconds": round(seconds, 3), "samples_per_second": round(trained / seconds, 1),
              "device": str(parts.device), "step_mode": step_mode}
    with StopSignals():  # the results are written whole: a signal now waits the few milliseconds this takes
        log_final(writer, cfg, parts, metrics, grids, arrays, pos.step, varied)
        write_json(run_dir / "metrics.json", record)
    console.summary({"train": metrics["train"], "val": metrics["val"]}, title=f"aelab: {run_dir.name}")
    console.metrics_table(metrics["test"], title="test split")
    return record


def finished_already(run_dir: Path, epochs: int) -> dict:
    """Resuming a run that trained all its epochs writes nothing: its results stay as they are."""
    record = read_results(run_dir)
    console.console.print(f"{run_dir} has finished training (trainer.epochs={epochs}); nothing to do, "
                          f"metrics.json is unchanged. To train it further: "
                          f"aelab train resume={shlex.quote(str(run_dir))} "
                          f"trainer.epochs={2 * epochs}", markup=False, highlight=False, soft_wrap=True)
    console.summary({split: record[split] for split in ("train", "val")}, title=f"aelab: {run_dir.name}")
    return record
