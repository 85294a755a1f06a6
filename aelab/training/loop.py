"""The loop: for each epoch, train steps over a fresh shuffle, then validate, log and checkpoint (every
trainer.checkpoint_every seconds); the
learning-rate schedule stepped with it, and the run stopped once the validation objective stops
improving (trainer.patience)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from .. import console
from ..build import Parts, Trainer
from . import checkpoint
from .checkpoint import Position
from .faults import FiniteWatch, StopSignals
from .monitor import activity, image_grid
from .objective import TERMS, batches, evaluate
from .steps import Step, make_step


def log_terms(writer: SummaryWriter, prefix: str, terms: dict[str, float], step: int) -> None:
    for name, value in terms.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)


def train_epoch(parts: Parts, pos: Position, step: Step, writer: SummaryWriter, bar: console.Bar,
                watch: FiniteWatch, stop: StopSignals) -> None:
    """Train on the rest of this epoch's shuffle; reads scalars back only every log_every steps."""
    for clean in batches(parts.data.train.x, parts.trainer.batch_size, parts.device, pos.order, pos.batch):
        step(clean)
        stepped(parts, pos, len(clean), writer, watch, bar.show)
        bar.advance()
        if stop.requested:
            return


def stepped(parts: Parts, pos: Position, size: int, writer: SummaryWriter, watch: FiniteWatch, show) -> None:
    """After an optimizer step on `size` samples: the schedule, the counts, and every log_every steps
    the NaN watch and the train/* scalars (`show`: the progress bar's)."""
    every = parts.trainer.log_every
    parts.schedule.after_step()
    pos.step, pos.batch, pos.seen = pos.step + 1, pos.batch + 1, pos.seen + size
    if pos.step % every == 0:
        watch.check()
        means = dict(zip(TERMS, (pos.window / every).tolist()))
        log_terms(writer, "train", {**means, "lr": parts.optimizer.param_groups[0]["lr"]}, pos.step)
        show(means)
        pos.window.zero_()


def start_epoch(parts: Parts, pos: Position, generator: torch.Generator | None = None) -> None:
    """A fresh shuffle of the training split (on the device holding it; from `generator`, a stacked
    job's own stream, or the global one) and zeroed epoch sums.

    The sums are zeroed in place: a captured CUDA graph adds into these very tensors."""
    x = parts.data.train.x
    pos.order = torch.randperm(len(x), device=x.device, generator=generator)
    pos.batch, pos.seen = 0, 0
    if pos.epoch_sums is None:
        pos.epoch_sums = torch.zeros(len(TERMS), device=parts.device)
    pos.epoch_sums.zero_()
    if pos.window is None:
        pos.window = torch.zeros(len(TERMS), device=parts.device)


def judge(pos: Position, parts: Parts, val_total: float) -> None:
    """After an epoch's validation: the best model so far (the lowest objective: what the run's end
    measures), the last epoch that improved on the reference by min_delta (relative), and the stop once
    trainer.patience epochs have not."""
    trainer = parts.trainer
    if val_total < pos.best_val:
        pos.best_val, pos.best_epoch = val_total, pos.epoch
        pos.best_model = {name: value.detach().clone() for name, value in parts.model.state_dict().items()}
    if val_total < pos.reference * (1 - trainer.min_delta):
        pos.reference, pos.improved_epoch = val_total, pos.epoch
    if patience_ran_out(pos, trainer):
        pos.stopped_epoch = pos.epoch


def patience_ran_out(pos: Position, trainer: Trainer) -> bool:
    """trainer.patience epochs have passed since the last improvement (and trainer.min_epochs since the
    start): early stopping ends the run."""
    return (trainer.patience is not None and pos.epoch >= trainer.min_epochs
            and pos.epoch - pos.improved_epoch >= trainer.patience)


def shown(pos: Position, trainer: Trainer) -> bool:
    """The epochs a run shows (its line in the terminal, the validation picture in TensorBoard): the first
    10, every 10th, and the last (a converging run trains hundreds)."""
    return pos.epoch <= 10 or pos.epoch % 10 == 0 or pos.stopped_epoch is not None or pos.epoch == trainer.epochs


def end_epoch(parts: Parts, cfg: DictConfig, pos: Position, run_dir: Path, writer: SummaryWriter, say,
              cadence: checkpoint.Cadence, name: str = "", measured: tuple[dict, dict] | None = None) -> None:
    """After an epoch's last step: validate, log, step a per-epoch schedule, judge (best model, early
    stop), checkpoint when the cadence says so, and say the epoch's line (prefixed with `name`, a stacked
    job's). `measured`: the validation objective and code activity, measured already (a stack measures
    its jobs together)."""
    trainer = parts.trainer
    pos.epoch, pos.order = pos.epoch + 1, None
    val_x = parts.data.val.x
    val, codes = measured or (evaluate(parts, val_x),
                              activity(parts.model, val_x, parts.evaluation.threshold, trainer.batch_size))
    log_terms(writer, "val", {**val, **codes}, pos.step)
    if pos.epoch > trainer.min_epochs:  # a model on its first plateau keeps its rate (trainer.min_epochs)
        parts.schedule.after_epoch(val["total"])
    judge(pos, parts, val["total"])
    pos.schedule = parts.schedule.state_dict()
    if cadence.due(pos, trainer.epochs):
        checkpoint.save(parts, cfg, pos, run_dir)
    train = dict(zip(TERMS, (pos.epoch_sums / pos.seen).tolist()))
    stopped = ""
    if pos.stopped_epoch:
        stopped = (f"  (stopped: {pos.epoch - pos.improved_epoch} epochs without a {trainer.min_delta:.2%} "
                   f"improvement; the lowest validation loss, kept: epoch {pos.best_epoch})")
    if shown(pos, trainer):  # the picture costs 2 ms; TensorBoard keeps 10 of a tag's images unless told more
        writer.add_image("val/clean_corrupted_reconstructed", image_grid(
            parts.model, val_x, parts.corruption, parts.data.image_shape, trainer.seed), pos.step)
        say(f"{name}epoch {pos.epoch}/{trainer.epochs}  train {console.format_terms(train)}  |  val "
            f"{console.format_terms(val)}  active {codes['population_sparsity']:.3g}{stopped}")


def fit(parts: Parts, cfg: DictConfig, pos: Position, run_dir: Path, writer: SummaryWriter) -> tuple[float, str]:
    """Train from `pos` to trainer.epochs, or until trainer.patience epochs bring no improvement, a
    checkpoint after each epoch; a SIGINT or SIGTERM saves one mid-epoch and exits with the command that
    continues. Returns (seconds, the step's mode)."""
    trainer, started = parts.trainer, time.perf_counter()
    cadence = checkpoint.Cadence(trainer.checkpoint_every)
    steps_per_epoch = -(-len(parts.data.train) // trainer.batch_size)
    parts.schedule.start(parts.optimizer, parts.device, trainer.epochs * steps_per_epoch, steps_per_epoch,
                         pos.step, pos.schedule)
    watch = FiniteWatch(parts.device, TERMS, run_dir / checkpoint.FILE, pos.step)
    description = "train" if trainer.patience is None else f"train (at most {trainer.epochs} epochs)"
    with console.progress(trainer.epochs * steps_per_epoch, pos.step, description) as bar, StopSignals() as stop:
        step = make_step(parts, pos, watch, bar.log)
        while pos.epoch < trainer.epochs and pos.stopped_epoch is None:
            if pos.order is None:
                start_epoch(parts, pos)
            train_epoch(parts, pos, step, writer, bar, watch, stop)
            watch.check()
            if stop.requested:
                writer.close()
                stop.exit(checkpoint.save(parts, cfg, pos, run_dir), pos.step)
            end_epoch(parts, cfg, pos, run_dir, writer, bar.log, cadence)
            if pos.stopped_epoch:
                bar.end_here()
    return time.perf_counter() - started, getattr(step, "mode", "eager")
