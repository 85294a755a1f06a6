"""The loop: build parts → for each epoch: train steps, evaluate, log, checkpoint → final metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from . import checkpoint, console
from .build import Parts, build
from .checkpoint import Position
from .faults import FiniteWatch, StopSignals, environment
from .losses import LOSSES

TERMS = ("total", "recon", "reg")
RECON_METRICS = ("mse", "bce", "mae")
GRID_IMAGES = 8


def loss_terms(parts: Parts, clean: Tensor, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """{total, recon, reg}: the encoder sees the corrupted batch, the loss compares to the clean one."""
    inputs = parts.corruption(clean, generator)
    if parts.input_grad:
        inputs = inputs.detach().requires_grad_(True)
    fwd = parts.model(inputs, trace=parts.trace)
    recon = parts.loss(fwd, clean)
    reg = parts.penalty(fwd, parts.model)
    return {"total": recon + parts.penalty.weight * reg, "recon": recon, "reg": reg}


def train_step(parts: Parts, clean: Tensor) -> Tensor:
    """One optimizer step; returns the detached (total, recon, reg) without a host sync."""
    parts.optimizer.zero_grad(set_to_none=True)
    terms = loss_terms(parts, clean)
    terms["total"].backward()
    parts.optimizer.step()
    return torch.stack([terms[name].detach() for name in TERMS])


def batches(x: Tensor, batch_size: int, device: torch.device, order: Optional[Tensor] = None,
            start: int = 0) -> Iterator[Tensor]:
    """Batches gathered where the data lives (on the device when it fits), from batch `start` on."""
    for begin in range(start * batch_size, len(x), batch_size):
        chunk = x[begin:begin + batch_size] if order is None else x[order[begin:begin + batch_size]]
        yield chunk.to(device, non_blocking=True)


def evaluate(parts: Parts, x: Tensor) -> dict[str, float]:
    """Mean {total, recon, reg} of the training objective, corruption drawn from a fixed seed."""
    generator = torch.Generator(parts.device).manual_seed(parts.trainer.seed)
    sums = torch.zeros(len(TERMS), device=parts.device)
    parts.model.eval()
    with torch.set_grad_enabled(parts.input_grad):
        for clean in batches(x, parts.trainer.batch_size, parts.device):
            terms = loss_terms(parts, clean, generator)
            sums += torch.stack([terms[name].detach() for name in TERMS]) * len(clean)
    parts.model.train()
    return dict(zip(TERMS, (sums / len(x)).tolist()))


@torch.no_grad()
def recon_metrics(parts: Parts, x: Tensor) -> dict[str, float]:
    """MSE, BCE and MAE per element of reconstructing clean inputs, whatever the training loss."""
    metrics = [LOSSES.get(name)() for name in RECON_METRICS]
    sums = torch.zeros(len(metrics), device=parts.device)
    parts.model.eval()
    for clean in batches(x, parts.trainer.batch_size, parts.device):
        fwd = parts.model(clean)
        sums += torch.stack([metric(fwd, clean) for metric in metrics]) * len(clean)
    parts.model.train()
    return dict(zip(RECON_METRICS, (sums / len(x)).tolist()))


@torch.no_grad()
def image_grid(parts: Parts, x: Tensor) -> Tensor:
    """Rows: clean, corrupted, reconstructed (the first validation images, fixed-seed noise)."""
    clean = x[:GRID_IMAGES].to(parts.device)
    noisy = parts.corruption(clean, torch.Generator(parts.device).manual_seed(parts.trainer.seed))
    parts.model.eval()
    recon = parts.model(noisy).recon
    parts.model.train()
    images = torch.cat([clean, noisy, recon]).view(-1, *parts.data.image_shape).clamp(0, 1)
    return make_grid(images.cpu(), nrow=len(clean), pad_value=1.0)


def log_terms(writer: SummaryWriter, prefix: str, terms: dict[str, float], step: int) -> None:
    for name, value in terms.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)


def train_epoch(parts: Parts, pos: Position, writer: SummaryWriter, bar: console.Bar, watch: FiniteWatch,
                stop: StopSignals) -> None:
    """Train on the rest of this epoch's shuffle; reads scalars back only every log_every steps."""
    every = parts.trainer.log_every
    for clean in batches(parts.data.train.x, parts.trainer.batch_size, parts.device, pos.order, pos.batch):
        terms = train_step(parts, clean)
        pos.step, pos.batch, pos.seen = pos.step + 1, pos.batch + 1, pos.seen + len(clean)
        watch.update(terms, pos.step)
        pos.window += terms
        pos.epoch_sums += terms * len(clean)
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
    """A fresh shuffle of the training split (on the device holding it) and zeroed epoch sums."""
    x = parts.data.train.x
    pos.order = torch.randperm(len(x), device=x.device)
    pos.batch, pos.seen = 0, 0
    pos.epoch_sums = torch.zeros(len(TERMS), device=parts.device)
    if pos.window is None:
        pos.window = torch.zeros(len(TERMS), device=parts.device)


def run(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    """Train one configuration; write TensorBoard events, checkpoints and metrics.json to run_dir."""
    parts = build(cfg)
    pos = checkpoint.load(parts, run_dir) if resume else Position()
    writer = SummaryWriter(str(run_dir), purge_step=pos.step + 1 if resume else None)
    if not resume:
        writer.add_text("config", "    " + OmegaConf.to_yaml(cfg, resolve=True).replace("\n", "\n    "))
        (run_dir / "environment.json").write_text(json.dumps(environment(parts.device, parts.trainer.seed),
                                                             indent=2) + "\n")
    trainer, started, first_step = parts.trainer, time.perf_counter(), pos.step
    steps_per_epoch = -(-len(parts.data.train) // trainer.batch_size)
    watch = FiniteWatch(parts.device, TERMS, run_dir / checkpoint.FILE)
    with console.progress(trainer.epochs * steps_per_epoch, pos.step) as bar, StopSignals() as stop:
        while pos.epoch < trainer.epochs:
            if pos.order is None:
                start_epoch(parts, pos)
            train_epoch(parts, pos, writer, bar, watch, stop)
            watch.check()
            if stop.requested:
                writer.close()
                stop.exit(checkpoint.save(parts, cfg, pos, run_dir), pos.step)
            pos.epoch, pos.order = pos.epoch + 1, None
            val = evaluate(parts, parts.data.val.x)
            log_terms(writer, "val", val, pos.step)
            writer.add_image("val/clean_corrupted_reconstructed", image_grid(parts, parts.data.val.x), pos.step)
            checkpoint.save(parts, cfg, pos, run_dir)
            train = dict(zip(TERMS, (pos.epoch_sums / pos.seen).tolist()))
            bar.log(f"epoch {pos.epoch}/{trainer.epochs}  train {console.format_terms(train)}"
                    f"  |  val {console.format_terms(val)}")
    seconds = time.perf_counter() - started
    metrics = {"train": evaluate(parts, parts.data.train.x), "val": evaluate(parts, parts.data.val.x),
               "test": {**evaluate(parts, parts.data.test.x), **recon_metrics(parts, parts.data.test.x)}}
    for split, values in metrics.items():
        log_terms(writer, f"final_{split}", values, pos.step)
    writer.close()
    trained = (pos.step - first_step) * trainer.batch_size
    record = {**metrics, "epochs": trainer.epochs, "steps": pos.step, "seconds": round(seconds, 3),
              "samples_per_second": round(trained / seconds, 1), "device": str(parts.device)}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    console.summary(metrics, title=f"aelab: {run_dir}")
    return record
