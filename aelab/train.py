"""The loop: build parts → for each epoch: train steps, evaluate, log, checkpoint → final metrics."""
from __future__ import annotations

import shlex
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from . import checkpoint, console
from .build import EvalSettings, Parts, build, run_config
from .checkpoint import Position
from .faults import FiniteWatch, StopNow, StopSignals, environment
from .logs import config_text, denoising_picture, features_picture, log_final, log_terms, save_pictures, save_png
from .metrics import activity, analyse, image_grid
from .objective import TERMS, batches, evaluate
from .runs import output_name, read_results, write_json
from .steps import Step, make_step


def train_epoch(parts: Parts, pos: Position, step: Step, writer: SummaryWriter, bar: console.Bar,
                watch: FiniteWatch, stop: StopSignals) -> None:
    """Train on the rest of this epoch's shuffle; reads scalars back only every log_every steps."""
    every = parts.trainer.log_every
    for clean in batches(parts.data.train.x, parts.trainer.batch_size, parts.device, pos.order, pos.batch):
        step(clean)
        pos.step, pos.batch, pos.seen = pos.step + 1, pos.batch + 1, pos.seen + len(clean)
        bar.advance()
        if pos.step % every == 0:
            watch.check()
            means = dict(zip(TERMS, (pos.window / every).tolist()))
            log_terms(writer, "train", means, pos.step)
            bar.show(means)
            pos.window.zero_()
        if stop.requested:
            return


def start_epoch(parts: Parts, pos: Position) -> None:
    """A fresh shuffle of the training split (on the device holding it) and zeroed epoch sums.

    The sums are zeroed in place: a captured CUDA graph adds into these very tensors."""
    x = parts.data.train.x
    pos.order = torch.randperm(len(x), device=x.device)
    pos.batch, pos.seen = 0, 0
    if pos.epoch_sums is None:
        pos.epoch_sums = torch.zeros(len(TERMS), device=parts.device)
    pos.epoch_sums.zero_()
    if pos.window is None:
        pos.window = torch.zeros(len(TERMS), device=parts.device)


def run(cfg: DictConfig, run_dir: Path, resume: bool = False, job_num: int | None = None) -> dict:
    """Train one configuration; write TensorBoard events, checkpoints and metrics.json to run_dir."""
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
        write_json(run_dir / "environment.json", environment(parts.device, parts.trainer.seed))
    trainer, started, first_step = parts.trainer, time.perf_counter(), pos.step
    steps_per_epoch = -(-len(parts.data.train) // trainer.batch_size)
    watch = FiniteWatch(parts.device, TERMS, run_dir / checkpoint.FILE, pos.step)
    with console.progress(trainer.epochs * steps_per_epoch, pos.step) as bar, StopSignals() as stop:
        step = make_step(parts, pos, watch, bar.log)
        while pos.epoch < trainer.epochs:
            if pos.order is None:
                start_epoch(parts, pos)
            train_epoch(parts, pos, step, writer, bar, watch, stop)
            watch.check()
            if stop.requested:
                writer.close()
                stop.exit(checkpoint.save(parts, cfg, pos, run_dir), pos.step)
            pos.epoch, pos.order = pos.epoch + 1, None
            val, codes = evaluate(parts, parts.data.val.x), activity(parts, parts.data.val.x)
            log_terms(writer, "val", {**val, **codes}, pos.step)
            writer.add_image("val/clean_corrupted_reconstructed", image_grid(parts, parts.data.val.x), pos.step)
            checkpoint.save(parts, cfg, pos, run_dir)
            train = dict(zip(TERMS, (pos.epoch_sums / pos.seen).tolist()))
            bar.log(f"epoch {pos.epoch}/{trainer.epochs}  train {console.format_terms(train)}"
                    f"  |  val {console.format_terms(val)}  active {codes['population_sparsity']:.3g}")
    seconds = time.perf_counter() - started
    with StopNow(f"during the final evaluation; training is complete in {run_dir / checkpoint.FILE}; "
                 f"finish with: aelab train resume={shlex.quote(str(run_dir))}"):
        metrics, grids, arrays = finish(parts, run_dir)
    trained = (pos.step - first_step) * trainer.batch_size
    record = {**metrics, "started_at": started_at, "finished_at": time.time(), "epochs": trainer.epochs,
              "steps": pos.step, "seconds": round(seconds, 3), "samples_per_second": round(trained / seconds, 1),
              "device": str(parts.device), "step_mode": getattr(step, "mode", "eager")}
    with StopSignals():  # the results are written whole: a signal now waits the few milliseconds this takes
        log_final(writer, cfg, parts, metrics, grids, arrays, pos.step)
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


def test_split(parts: Parts) -> tuple[dict, dict]:
    """The training objective and every metric of metrics.analyse on the test split."""
    found, arrays = analyse(parts, parts.evaluation)
    return {**evaluate(parts, parts.data.test.x), **found}, arrays


def finish(parts: Parts, run_dir: Path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """The final objective on every split and the test metrics, with the PNG files written: (metrics
    by split, picture grids, test arrays). The slow part of a run's end: it writes nothing to TensorBoard."""
    test, arrays = test_split(parts)
    metrics = {"train": evaluate(parts, parts.data.train.x), "val": evaluate(parts, parts.data.val.x), "test": test}
    return metrics, save_pictures(parts, parts.evaluation, test, arrays, run_dir), arrays


def redraws_features(overrides: list[str], settings: EvalSettings) -> bool:
    """Whether `aelab eval` overrides draw another features.png: they set which units or the value they
    are drawn at, or the threshold the typical value is measured above."""
    keys = {override.partition("=")[0] for override in overrides}
    return bool(keys & {"eval.features", "eval.feature_value"}) or (
        "eval.threshold" in keys and settings.feature_value == "typical")


def evaluate_run(run_dir: Path, overrides: list[str]) -> dict:
    """`aelab eval`: reload a run's checkpoint, recompute the test metrics, print and save them."""
    cfg = run_config(run_dir, overrides)
    parts = build(cfg)
    checkpoint.load(parts, run_dir, "RUN_DIR", "evaluate another run, or train this one again", model_only=True)
    test, arrays = test_split(parts)
    stem = output_name("eval", overrides)
    written = [run_dir / f"{stem}.json"]
    write_json(written[0], {"overrides": overrides, "test": test})
    pictures = {"denoising": denoising_picture(parts, parts.evaluation, test)}
    if redraws_features(overrides, parts.evaluation):
        pictures["features"] = features_picture(parts, parts.evaluation, arrays)
    for name, picture in pictures.items():
        if picture is not None:
            written.append(run_dir / f"{stem}_{name}.png")
            save_png(picture, written[-1])
    console.metrics_table(test, title=f"aelab eval: {run_dir}")
    console.console.print(f"wrote {', '.join(path.name for path in written)} in {run_dir}", markup=False,
                          highlight=False, soft_wrap=True)
    return test
