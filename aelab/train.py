"""The loop: build parts → for each epoch: train steps, evaluate, log, checkpoint → final metrics."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from . import console
from .build import Parts, build
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


def train_step(parts: Parts, clean: Tensor) -> dict[str, Tensor]:
    parts.optimizer.zero_grad(set_to_none=True)
    terms = loss_terms(parts, clean)
    terms["total"].backward()
    parts.optimizer.step()
    return {name: value.detach() for name, value in terms.items()}


def batches(x: Tensor, batch_size: int, device: torch.device, shuffle: bool) -> Iterator[Tensor]:
    """Batches gathered where the data lives (on the device when it fits), reshuffled each call."""
    order = torch.randperm(len(x), device=x.device) if shuffle else None
    for start in range(0, len(x), batch_size):
        chunk = x[order[start:start + batch_size]] if shuffle else x[start:start + batch_size]
        yield chunk.to(device, non_blocking=True)


def evaluate(parts: Parts, x: Tensor) -> dict[str, float]:
    """Mean {total, recon, reg} of the training objective, corruption drawn from a fixed seed."""
    generator = torch.Generator(parts.device).manual_seed(parts.trainer.seed)
    sums = dict.fromkeys(TERMS, 0.0)
    parts.model.eval()
    with torch.set_grad_enabled(parts.input_grad):
        for clean in batches(x, parts.trainer.batch_size, parts.device, shuffle=False):
            for name, value in loss_terms(parts, clean, generator).items():
                sums[name] = sums[name] + value.detach() * len(clean)
    parts.model.train()
    return {name: float(total / len(x)) for name, total in sums.items()}


@torch.no_grad()
def recon_metrics(parts: Parts, x: Tensor) -> dict[str, float]:
    """MSE, BCE and MAE per element of reconstructing clean inputs, whatever the training loss."""
    metrics = {name: LOSSES.get(name)() for name in RECON_METRICS}
    sums = dict.fromkeys(RECON_METRICS, 0.0)
    parts.model.eval()
    for clean in batches(x, parts.trainer.batch_size, parts.device, shuffle=False):
        fwd = parts.model(clean)
        for name, metric in metrics.items():
            sums[name] = sums[name] + metric(fwd, clean) * len(clean)
    parts.model.train()
    return {name: float(total / len(x)) for name, total in sums.items()}


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


def save_checkpoint(parts: Parts, cfg: DictConfig, path: Path, epoch: int, step: int) -> None:
    """Written to a temporary file, then renamed: a crash never leaves half a checkpoint."""
    state = {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
             "epoch": epoch, "step": step, "config": OmegaConf.to_container(cfg, resolve=True)}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def log_terms(writer: SummaryWriter, prefix: str, terms: dict[str, float], step: int) -> None:
    for name, value in terms.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)


def train_epoch(parts: Parts, writer: SummaryWriter, bar: console.Bar, step: int) -> tuple[int, dict]:
    """One pass over the shuffled training split; scalars are read back only every log_every steps."""
    every = parts.trainer.log_every
    epoch_sums = window = dict.fromkeys(TERMS, 0.0)
    seen = 0
    for clean in batches(parts.data.train.x, parts.trainer.batch_size, parts.device, shuffle=True):
        terms = train_step(parts, clean)
        step += 1
        window = {name: window[name] + terms[name] for name in TERMS}
        epoch_sums = {name: epoch_sums[name] + terms[name] * len(clean) for name in TERMS}
        seen += len(clean)
        bar.advance()
        if step % every == 0:
            means = {name: float(window[name] / every) for name in TERMS}
            log_terms(writer, "train", means, step)
            bar.show(means)
            window = dict.fromkeys(TERMS, 0.0)
    return step, {name: float(epoch_sums[name] / seen) for name in TERMS}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train one configuration; write TensorBoard events, a checkpoint and metrics.json to run_dir."""
    parts = build(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("config", "    " + OmegaConf.to_yaml(cfg, resolve=True).replace("\n", "\n    "))
    trainer, step, started = parts.trainer, 0, time.perf_counter()
    steps_per_epoch = -(-len(parts.data.train) // trainer.batch_size)
    with console.progress(trainer.epochs * steps_per_epoch) as bar:
        for epoch in range(1, trainer.epochs + 1):
            step, train_means = train_epoch(parts, writer, bar, step)
            val = evaluate(parts, parts.data.val.x)
            log_terms(writer, "val", val, step)
            writer.add_image("val/clean_corrupted_reconstructed", image_grid(parts, parts.data.val.x), step)
            save_checkpoint(parts, cfg, run_dir / "checkpoint.pt", epoch, step)
            bar.log(f"epoch {epoch}/{trainer.epochs}  train {console.format_terms(train_means)}"
                    f"  |  val {console.format_terms(val)}")
    seconds = time.perf_counter() - started
    metrics = {"train": evaluate(parts, parts.data.train.x), "val": evaluate(parts, parts.data.val.x),
               "test": {**evaluate(parts, parts.data.test.x), **recon_metrics(parts, parts.data.test.x)}}
    for split, values in metrics.items():
        log_terms(writer, f"final_{split}", values, step)
    writer.close()
    record = {**metrics, "epochs": trainer.epochs, "steps": step, "seconds": round(seconds, 3),
              "samples_per_second": round(step * trainer.batch_size / seconds, 1), "device": str(parts.device)}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    console.summary(metrics, title=f"aelab: {run_dir}")
    return record
