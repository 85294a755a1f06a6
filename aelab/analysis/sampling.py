"""`aelab sample`: images drawn from a trained autoencoder by the chain `sample.method` names
(aelab.samplers), measured and published.

Each chain starts from uniform random pixels (or a test image), and its states are measured against
the training split: how close each is to its nearest training image (0: a copy of one; uniform random
pixels: 0.19 on the digits, 0.29 on MNIST), how many classes those nearest images cover (do the chains
find every digit, or collapse onto a few?), how sharp the states are next to the training images, and
how much a step still changes them.
"""
from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.table import Table
from torch import Tensor

from .. import console
from ..build import Parts, SampleSettings, build, build_model, chain_corruption, run_config, section
from ..corruptions import Corruption
from ..data import Split
from ..registry import ConfigError
from ..runs import SAMPLE_MEASURES, output_name, write_json
from ..samplers import Level
from ..training import checkpoint
from ..training.monitor import grid
from .figures import label_rows, pyplot, save_figure
from .metrics import gradient_energy
from .tensorboard import log_sample

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


def measure(images: Tensor, train: Split, shape: tuple[int, int, int]) -> dict[str, float]:
    """How close (N, D) images are to the training split (mean per-pixel MSE to the nearest training
    image), how many classes those nearest images cover and the share of the commonest (chains that
    collapse onto one kind of image raise it), and the images' sharpness: their gradient energy per
    image over that of the training images."""
    distance, index = nearest(images, train.x)
    _, counts = train.labels[index.to(train.labels.device)].unique(return_counts=True)
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


def sample(parts: Parts, levels: list[Level], corrupt: Corruption | None = None
           ) -> tuple[list[dict], dict, dict[int, Tensor]]:
    """The chains of parts.sampling's method through the (model, sigma) `levels` (annealed: sample.steps
    at each, each level's last step kept too and each row saying its sigma), `corrupt` the chain's
    corruption: one row of measures per recorded step, the same measures of as many test images (the
    yardstick), and the recorded states."""
    settings = parts.sampling
    generator = torch.Generator(parts.device).manual_seed(settings.seed)
    annealed = settings.method.over_sweep
    ends = [settings.steps * (k + 1) for k in range(len(levels))] if annealed else []
    record = sorted({*recorded_steps(settings.steps * len(levels)), *ends})
    states, change = settings.method.draw(levels, corrupt, settings.step_size, starts(parts, settings, generator),
                                          settings.steps, record, generator)
    sigma = lambda step: {"sigma": levels[(step - 1) // settings.steps][1] if step else None} if annealed else {}  # noqa: E731
    train, shape = parts.data.train, parts.data.image_shape
    rows = [{"step": step, **sigma(step), **measure(states[step], train, shape), "change": change[step]}
            for step in record]
    yardstick = measure(parts.data.test.x[:settings.count].to(parts.device), train, shape)
    return rows, yardstick, states


def table(rows: list[dict], yardstick: dict, title: str) -> None:
    """One line per recorded step, then the yardstick's (which has no change); counts as integers."""
    cell = lambda value: "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)  # noqa: E731
    columns = ("sigma", *SAMPLE_MEASURES) if "sigma" in rows[0] else SAMPLE_MEASURES  # annealed: each step's sigma
    grid = Table()
    for name in ("step", *columns):
        grid.add_column(name, justify="right")
    for label, row in [*((str(row["step"]), row) for row in rows), ("test images", yardstick)]:
        grid.add_row(label, *(cell(row.get(name)) for name in columns))
    console.show(grid, title)


def picture(states: dict[int, Tensor], shape: tuple[int, int, int], path, title: str, labels: list[str]) -> None:
    """Left: the first chains, one column each, down the recorded steps (`labels`: one per step); right:
    every chain's last state."""
    plt = pyplot()
    steps = list(states)
    shown = min(SHOWN_CHAINS, len(states[0]))
    strip = grid(torch.cat([states[s][:shown] for s in steps]), shape, columns=shown)
    last = states[steps[-1]]
    final = grid(last, shape)  # every chain, in a square
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5.5), width_ratios=[strip.shape[-1], final.shape[-1]])
    left.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
    label_rows(left, strip.shape[1], labels, fontsize=8)
    left.set_title(f"{shown} chains, step by step", fontsize=9)
    right.imshow(final.permute(1, 2, 0).numpy(), interpolation="nearest")
    right.set_axis_off()
    right.set_title(f"all {len(last)} chains after {steps[-1]} steps", fontsize=9)
    lines = textwrap.wrap(title, 110)  # annealed's list of sigmas runs long
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.04 * len(lines)))  # the panels' titles below the figure's
    save_figure(fig, path, dpi=100)


def publish(folder: Path, name: str, record: dict, states: dict[int, Tensor], shape: tuple[int, int, int],
            title: str, labels: list[str]) -> None:
    """What `aelab sample` leaves in `folder`: NAME.png, NAME.json and the TensorBoard run NAME/, and
    the table it prints."""
    rows, yardstick = record["chain"], record["test_images"]
    picture(states, shape, folder / f"{name}.png", title, labels)
    write_json(folder / f"{name}.json", record)
    log_sample(folder / name, rows, yardstick, states, shape, title)
    table(rows, yardstick, f"aelab sample: {folder} ({len(states[0])} chains; picture: {name}.png; "
                           f"TensorBoard: {name}/)")


def one_run_to_anneal(run_dir: Path) -> ConfigError:
    """sample.method=annealed given one run, from the command line or in its saved config."""
    return ConfigError(f"annealed Langevin steps through the models of a sweep, one per gaussian sigma, and "
                       f"{run_dir} is one run: give its sweep's folder, or sample.method=langevin", "sample.method")


def sample_run(run_dir: Path, overrides: list[str]) -> dict:
    """`aelab sample`: reload a run's model, run the chains, print the measures, write NAME.json, NAME.png
    and the TensorBoard run NAME/."""
    cfg = run_config(run_dir, overrides, allowed=("sample.", "device."), example="sample.steps=200")
    parts = build(cfg)
    settings = parts.sampling
    if settings.method.over_sweep:
        raise one_run_to_anneal(run_dir)
    corruption, corrupt = chain_corruption(cfg, settings, parts.data.image_shape)  # the record, the title, the chain
    checkpoint.load(parts, run_dir, "RUN_DIR", "sample another run, or train this one again", model_only=True)
    formula = settings.method.formula(settings.step_size, corruption)
    if corruption["name"] == "none" or corruption.get("noise_factor") == 0:
        console.console.print(f"the chain adds no noise ({formula}): it runs to a fixed point of the model; for a "
                              "stochastic chain give it noise, e.g. sample.noise=0.3",
                              markup=False, highlight=False, soft_wrap=True)
    rows, yardstick, states = sample(parts, [(parts.model, corruption.get("noise_factor", 0.0))], corrupt)
    record = {"overrides": overrides, "sample": section(cfg, "sample"),
              "corruption": corruption, "chain": rows, "test_images": yardstick}
    title = f"{run_dir.name}: {formula}, from {settings.start}"
    publish(run_dir, output_name("sample", overrides), record, states, parts.data.image_shape, title,
            [f"step {row['step']}" for row in rows])
    return record


def job_number(job: Path) -> str:
    """A sweep job's number, the start of its folder's name (`3_reg.weight=0.1`), or the whole name."""
    return job.name.partition("_")[0]


def job_order(job: Path) -> tuple[float, str]:
    """Hydra's job folders 0, 1, ..., 10 in their numbers' order."""
    number = job_number(job)
    return (int(number), job.name) if number.isdigit() else (math.inf, job.name)


def noise_levels(sweep_dir: Path, overrides: list[str]) -> tuple[list[tuple[float, Path, DictConfig]], list[str]]:
    """The jobs of a sweep trained with gaussian noise, one per sigma (the lowest-numbered job where
    several share one), largest sigma first, with their configs; and a line for each job left out."""
    jobs = sorted((path.parent for path in sweep_dir.glob("*/checkpoint.pt")), key=job_order)
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no trained jobs (*/checkpoint.pt); give the folder of an `aelab train "
                          f"-m` sweep of gaussian denoising models, e.g. of +experiment=noise_levels", "SWEEP_DIR")
    levels, left_out = {}, []
    for job in jobs:
        cfg = run_config(job, overrides, allowed=("sample.", "device."), example="sample.steps=200")
        corruption = section(cfg, "corruption")
        sigma = corruption.get("noise_factor") if corruption["name"] == "gaussian" else None
        if not sigma:
            left_out.append(f"job {job_number(job)} (corruption={corruption['name']}"
                            f"{f', noise_factor={sigma}' if sigma is not None else ''})")
        elif sigma in levels:
            left_out.append(f"job {job_number(job)} (sigma {sigma:g} again; job {job_number(levels[sigma][0])} has it)")
        else:
            levels[sigma] = (job, cfg)
    found = [(sigma, *levels[sigma]) for sigma in sorted(levels, reverse=True)]
    if len(found) < 2:
        raise ConfigError(f"annealed Langevin steps through models trained at two or more gaussian sigmas, and "
                          f"{sweep_dir} has {len(found)}; sweep corruption=gaussian corruption.noise_factor, e.g. "
                          f"+experiment=noise_levels (one sigma: sample.method=langevin on its run)", "SWEEP_DIR")
    data = {sigma: section(cfg, "data") for sigma, _, cfg in found}
    for sigma, job, _ in found[1:]:
        if data[sigma] != data[found[0][0]]:
            raise ConfigError(f"job {job_number(job)} and job {job_number(found[0][1])} trained on different data "
                              f"({data[sigma]} and {data[found[0][0]]}); annealing needs one data set: sample a "
                              f"sweep over the noise alone", "SWEEP_DIR")
    return found, left_out


def annealed_run(sweep_dir: Path, overrides: list[str]) -> dict:
    """`aelab sample SWEEP_DIR sample.method=annealed`: annealed Langevin dynamics through the sweep's
    gaussian denoising models, sample.steps at each sigma from the largest to the smallest; written to
    the sweep's folder as `sample_run` writes a run's."""
    if (sweep_dir / "checkpoint.pt").is_file():
        raise one_run_to_anneal(sweep_dir)
    found, left_out = noise_levels(sweep_dir, overrides)
    parts = build(found[0][2])  # the data, the device and the sample settings (the same overrides for every job)
    if parts.sampling.noise is not None:
        raise ConfigError("annealed Langevin takes each job's own training sigma; drop sample.noise", "sample.noise")
    levels = []
    for sigma, job, cfg in found:  # the first job's model is parts.model, built from its config
        level = parts if not levels else dataclasses.replace(
            parts, model=build_model(cfg, parts.data.image_shape, parts.device))
        checkpoint.load(level, job, "SWEEP_DIR", f"sample another sweep, or train job {job_number(job)} again",
                        model_only=True)
        levels.append((level.model, sigma))
    sigmas = ", ".join(f"{sigma:g}" for sigma, _, _ in found)
    a = parts.sampling.step_size
    steps = f"{parts.sampling.steps} step{'s' if parts.sampling.steps != 1 else ''}"
    console.console.print(f"annealed Langevin: {steps} at each sigma {sigmas} (jobs "
                          f"{', '.join(job_number(job) for _, job, _ in found)})"
                          f"{'; left out: ' + ', '.join(left_out) if left_out else ''}",
                          markup=False, highlight=False, soft_wrap=True)
    rows, yardstick, states = sample(parts, levels)
    record = {"overrides": overrides, "sample": section(found[0][2], "sample"),
              "levels": [{"job": job.name, "sigma": sigma} for sigma, job, _ in found], "left_out": left_out,
              "chain": rows, "test_images": yardstick}
    title = (f"{sweep_dir.name}: {parts.sampling.method.formula(a, {})}, {steps} at each sigma_i {sigmas}, "
             f"showing f_i(x), from {parts.sampling.start}")
    publish(sweep_dir, output_name("sample", overrides), record, states, parts.data.image_shape, title,
            [f"step {row['step']}" + (f", σ {row['sigma']:g}" if row["sigma"] else "") for row in rows])
    return record
