"""The Markov chains `aelab sample` draws images with, from trained denoising autoencoders:
`sample.method` picks one by name (`chain`, `langevin`, `annealed`), as `reg=` picks a penalty.

The tutorial's score matching connection (Part 4): a denoising autoencoder trained at gaussian noise
sigma estimates the data's score, (f(x̃) - x̃) / sigma² ≈ ∇_x log p(x). `chain` alternately corrupts
with a corruption C and denoises, x ← f(C(x)): the chain whose stationary distribution the generalized
denoising autoencoder estimates the data's with (Bengio et al., 2013); it works for any corruption.
`langevin` uses the score formula itself; `annealed` runs it through several models, one per sigma,
largest first (Song & Ermon, 2019).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .corruptions import Corruption
from .models import eval_mode
from .registry import Registry

SAMPLERS = Registry("sample.method")
Walk = Callable[[object], tuple[object, Tensor]]  # state -> (next state, the image it shows)
Kept = tuple[dict[int, Tensor], dict[int, Optional[float]]]  # the images at the recorded steps, the change at each
Level = tuple[torch.nn.Module, float]  # a denoising autoencoder and the gaussian sigma it was trained at


def walk(step: Walk, state, start: Tensor, steps: int, record: list[int]) -> Kept:
    """Run `step` (state -> next state, the image it shows) `steps` times: the images at the steps in
    `record` (0: the start) and, at each, the mean squared change its last step made (None at the start)."""
    states, change, shown = {0: start}, {0: None}, start
    for index in range(1, steps + 1):
        state, new = step(state)
        if index in record:
            states[index], change[index] = new, (new - shown).pow(2).mean().item()
        shown = new
    return {s: states[s] for s in record}, {s: change[s] for s in record}


@torch.no_grad()
def chain_walk(model: torch.nn.Module, corrupt: Corruption, start: Tensor, steps: int, record: list[int],
          generator: torch.Generator) -> Kept:
    """x ← clamp(f(corrupt(x)), 0, 1), `steps` times from `start`; kept and measured as `walk` says."""
    def step(x: Tensor) -> tuple[Tensor, Tensor]:
        new = model(corrupt(x, generator)).recon.clamp(0, 1)
        return new, new
    with eval_mode(model):
        return walk(step, start, start, steps, record)


@torch.no_grad()
def langevin_walk(levels: list[Level], step_size: float, start: Tensor, steps: int, record: list[int],
             generator: torch.Generator) -> Kept:
    """Langevin dynamics on the noised data density whose score a denoising autoencoder trained at
    gaussian sigma estimates, s(x) = (f(x) - x) / sigma²: with a step of a·sigma²,
    x ← x + (a/2)·sigma²·s(x) + sqrt(a)·sigma·z, z ~ N(0, I). The state is a noisy image, unclamped;
    the model sees it clamped to [0, 1], as it saw its training inputs (clamp(x + sigma·z)). What each
    step shows is f(x), the model's denoised estimate of the noisy state.

    Several levels (f, sigma), largest sigma first, are annealed Langevin dynamics (Song & Ermon,
    2019): `steps` steps at each level in turn. Their step eps·sigma_i²/sigma_L² is a·sigma_i² here, the
    same fraction a of each level's sigma²; a level's first step starts from its own model's f(x)."""
    def denoise(model: torch.nn.Module, x: Tensor) -> Tensor:
        return model(x.clamp(0, 1)).recon.clamp(0, 1)

    def step(state: tuple[Tensor, Tensor, int]) -> tuple[tuple[Tensor, Tensor, int], Tensor]:
        x, denoised, index = state
        model, sigma = levels[index // steps]
        if index and index % steps == 0:  # the next level's model takes over
            denoised = denoise(model, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + step_size / 2 * (denoised - x) + math.sqrt(step_size) * sigma * noise
        denoised = denoise(model, x)
        return (x, denoised, index + 1), denoised
    with contextlib.ExitStack() as stack:
        for model, _ in levels:
            stack.enter_context(eval_mode(model))
        return walk(step, (start, denoise(levels[0][0], start), 0), start, steps * len(levels), record)



@dataclass(frozen=True)
class Sampler:
    """`draw(levels, corrupt, step_size, start, steps, record, generator)`: the chains' kept states (as
    `walk` keeps them) from `start`, through the (model, sigma) `levels`; `formula(step_size,
    corruption)`: one step in words, the corruption as its config."""
    name: str
    draw: Callable[[list[Level], Corruption, float, Tensor, int, list[int], torch.Generator], Kept]
    formula: Callable[[float, dict], str]
    needs_sigma: bool = False  # the step is scaled by the gaussian sigma the model was trained at
    over_sweep: bool = False  # one model per sigma: the jobs of a sweep, not one run


@SAMPLERS.register
def chain() -> Sampler:
    """x ← f(C(x)), C the chain's corruption (any kind)."""
    def draw(levels, corrupt, step_size, start, steps, record, generator):
        return chain_walk(levels[0][0], corrupt, start, steps, record, generator)

    def formula(step_size: float, corruption: dict) -> str:
        described = " ".join(f"{k}={v}" for k, v in corruption.items() if k != "name")
        return f"x <- f(C(x)), C = {corruption['name']} {described}".rstrip()
    return Sampler("chain", draw, formula)


@SAMPLERS.register
def langevin() -> Sampler:
    """Langevin steps along one model's score estimate (f(x) - x) / sigma², sigma its gaussian noise."""
    def draw(levels, corrupt, step_size, start, steps, record, generator):
        return langevin_walk(levels, step_size, start, steps, record, generator)

    def formula(a: float, corruption: dict) -> str:
        return f"Langevin x <- x + {a:g}/2 (f(x) - x) + sqrt({a:g}) {corruption['noise_factor']:g} z, showing f(x)"
    return Sampler("langevin", draw, formula, needs_sigma=True)


@SAMPLERS.register
def annealed() -> Sampler:
    """Langevin steps through a sweep's models, one per gaussian sigma, the largest first."""
    def formula(a: float, corruption: dict) -> str:
        return f"annealed Langevin x <- x + {a:g}/2 (f_i(x) - x) + sqrt({a:g}) sigma_i z"
    return Sampler("annealed", langevin().draw, formula, needs_sigma=True, over_sweep=True)
