"""`aelab sample`: images drawn from a trained autoencoder by a corrupt-and-denoise Markov chain.

The tutorial's score matching connection (Part 4): a denoising autoencoder trained at gaussian noise
sigma estimates the data's score, (f(x̃) - x̃) / sigma² ≈ ∇_x log p(x). Alternately corrupting with the
training corruption C and denoising, x ← f(C(x)), is the chain whose stationary distribution the
generalized denoising autoencoder estimates the data's with (Bengio et al., 2013). Each chain starts
from uniform random pixels (or a test image), and its states are measured against the training split:
how close each is to its nearest training image (0: a copy of one; uniform random pixels: 0.19 on the
digits, 0.29 on MNIST), how many classes those nearest images cover (do the chains find every digit,
or collapse onto a few?), how sharp the states are next to the training images, and how much a step
still changes them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torch import Tensor
from torchvision.utils import make_grid

from . import checkpoint, console
from .build import Parts, SampleSettings, build, build_part, run_config
from .corruptions import CORRUPTIONS, Corruption
from .logs import pyplot
from .metrics import gradient_energy
from .objective import eval_mode
from .registry import ConfigError
from .runs import SAMPLE_MEASURES, output_name, write_json

SHOWN_CHAINS = 8  # chains drawn step by step in sample.png


def recorded_steps(steps: int) -> list[int]:
    """The steps whose states are kept and measured: 0 (the start), 1, 2, 5, 10, 20, 50, ... and the last."""
    kept = {0, steps}
    scale = 1
    while scale <= steps:
        kept.update(m * scale for m in (1, 2, 5) if m * scale <= steps)
        scale *= 10
    return sorted(kept)


@torch.no_grad()
def chain(model: torch.nn.Module, corrupt: Corruption, start: Tensor, steps: int, record: list[int],
          generator: torch.Generator) -> tuple[dict[int, Tensor], dict[int, float | None]]:
    """Run x ← clamp(f(corrupt(x)), 0, 1) `steps` times from `start`: the states at the steps in `record`
    (0: the start) and, at each, the mean squared change its last step made (None at the start)."""
    states, change, x = {0: start}, {0: None}, start
    with eval_mode(model):
        for step in range(1, steps + 1):
            new = model(corrupt(x, generator)).recon.clamp(0, 1)
            if step in record:
                states[step], change[step] = new, (new - x).pow(2).mean().item()
            x = new
    return {s: states[s] for s in record}, {s: change[s] for s in record}


@torch.no_grad()
def nearest(images: Tensor, reference: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """For each of (N, D) images, the per-pixel MSE to its nearest (M, D) reference image and that
    image's index."""
    best = torch.full((len(images),), math.inf, device=images.device)
    index = torch.zeros(len(images), dtype=torch.long, device=images.device)
    squares = images.pow(2).sum(1, keepdim=True)
    for first in range(0, len(reference), chunk):
        ref = reference[first:first + chunk].to(images.device)
        distance = (squares - 2 * images @ ref.T + ref.pow(2).sum(1)) / images.shape[1]
        value, found = distance.min(1)
        better = value < best
        best, index = best.where(~better, value), index.where(~better, found + first)
    return best.clamp_min(0), index


def measure(images: Tensor, parts: Parts) -> dict[str, float]:
    """How close (N, D) images are to the training split (mean per-pixel MSE to the nearest training
    image), how many classes those nearest images cover and the share of the commonest (chains that
    collapse onto one kind of image raise it), and the images' sharpness: their gradient energy per
    image over that of the training images."""
    train = parts.data.train
    distance, index = nearest(images, train.x)
    _, counts = train.labels[index.to(train.labels.device)].unique(return_counts=True)
    shape = parts.data.image_shape
    energy = gradient_energy(images.view(-1, *shape)) / len(images)
    reference = gradient_energy(train.x.view(-1, *shape)) / len(train.x)
    return {"nearest_mse": distance.mean().item(), "classes": len(counts),
            "top_share": counts.max().item() / len(images), "sharpness": (energy / reference).item()}


def starts(parts: Parts, settings: SampleSettings, generator: torch.Generator) -> Tensor:
    """The chains' first states: uniform random pixels, or the first `count` test images."""
    test = parts.data.test.x
    if settings.start == "test":
        if settings.count > len(test):
            raise ConfigError(f"must be <= the {len(test)} test images with sample.start=test, got "
                              f"{settings.count}", "sample.count")
        return test[:settings.count].to(parts.device)
    return torch.rand((settings.count, *test.shape[1:]), generator=generator, device=parts.device)


def sample(parts: Parts, corrupt: Corruption) -> tuple[list[dict], dict, dict[int, Tensor]]:
    """The chains of parts.sampling, corrupting with `corrupt`: one row of measures per recorded step,
    the same measures of as many test images (the yardstick), and the recorded states."""
    settings = parts.sampling
    generator = torch.Generator(parts.device).manual_seed(settings.seed)
    record = recorded_steps(settings.steps)
    states, change = chain(parts.model, corrupt, starts(parts, settings, generator), settings.steps, record,
                           generator)
    rows = [{"step": step, **measure(states[step], parts), "change": change[step]} for step in record]
    yardstick = measure(parts.data.test.x[:settings.count].to(parts.device), parts)
    return rows, yardstick, states


def table(rows: list[dict], yardstick: dict, title: str) -> None:
    """One line per recorded step, then the yardstick's (which has no change); counts as integers."""
    cell = lambda value: "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)  # noqa: E731
    grid = Table()
    for name in ("step", *SAMPLE_MEASURES):
        grid.add_column(name, justify="right")
    for label, row in [*((str(row["step"]), row) for row in rows), ("test images", yardstick)]:
        grid.add_row(label, *(cell(row.get(name)) for name in SAMPLE_MEASURES))
    console.show(grid, title)


def picture(states: dict[int, Tensor], shape: tuple[int, int, int], path, title: str) -> None:
    """Left: the first chains, one column each, down the recorded steps; right: every chain's last state."""
    plt = pyplot()
    steps = list(states)
    shown = min(SHOWN_CHAINS, len(states[0]))
    strip = make_grid(torch.cat([states[s][:shown] for s in steps]).view(-1, *shape).cpu(), nrow=shown,
                      pad_value=1.0)
    last = states[steps[-1]]
    side = math.ceil(math.sqrt(len(last)))
    final = make_grid(last.view(-1, *shape).cpu(), nrow=side, pad_value=1.0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5.5), width_ratios=[shown, side])
    left.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
    cell = (strip.shape[1] - 2) / len(steps)
    left.set_yticks([2 + cell * i + (cell - 2) / 2 for i in range(len(steps))], [f"step {s}" for s in steps],
                    fontsize=8)
    left.set_xticks([])
    left.tick_params(length=0)
    left.set_title(f"{shown} chains, step by step", fontsize=9)
    right.imshow(final.permute(1, 2, 0).numpy(), interpolation="nearest")
    right.set_axis_off()
    right.set_title(f"all {len(last)} chains after {steps[-1]} steps", fontsize=9)
    for spine in left.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # the panels' titles below the figure's
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chain_corruption(cfg: DictConfig, settings: SampleSettings) -> dict:
    """The chain's corruption as its config: the run's own, or gaussian noise of sample.noise."""
    if settings.noise is None:
        return OmegaConf.to_container(cfg.corruption, resolve=True)
    return {"name": "gaussian", "noise_factor": settings.noise}


def sample_run(run_dir: Path, overrides: list[str]) -> dict:
    """`aelab sample`: reload a run's model, run the chains, print the measures, write NAME.json and NAME.png."""
    cfg = run_config(run_dir, overrides, allowed=("sample.", "device."), example="sample.steps=200")
    parts = build(cfg)
    checkpoint.load(parts, run_dir, "RUN_DIR", "sample another run, or train this one again", model_only=True)
    corruption = chain_corruption(cfg, parts.sampling)  # decided once: the record, the title and the chain
    if corruption["name"] == "none" or corruption.get("noise_factor") == 0:
        console.console.print("the chain corrupts nothing: each step is x <- f(x), which runs to a fixed point of "
                              "the model; for a stochastic chain give it noise, e.g. sample.noise=0.3",
                              markup=False, highlight=False, soft_wrap=True)
    rows, yardstick, states = sample(parts, build_part("corruption", CORRUPTIONS, corruption,
                                                       image_shape=parts.data.image_shape))
    name = output_name("sample", overrides)
    described = " ".join(f"{k}={v}" for k, v in corruption.items() if k != "name")
    title = (f"{run_dir.name}: x <- f(C(x)), C = {corruption['name']} {described}".rstrip()
             + f", from {parts.sampling.start}")
    picture(states, parts.data.image_shape, run_dir / f"{name}.png", title)
    record = {"overrides": overrides, "sample": OmegaConf.to_container(cfg.sample, resolve=True),
              "corruption": corruption, "chain": rows, "test_images": yardstick}
    write_json(run_dir / f"{name}.json", record)
    table(rows, yardstick, f"aelab sample: {run_dir} ({len(states[0])} chains; picture: {name}.png)")
    return record
