"""Input corruptions for the denoising objective: the encoder sees x̃, the loss compares to clean x.

Each takes a batch (B, C*H*W) in [0, 1] and an optional torch.Generator (fixed-seed evaluation);
without one they draw from the device's default generator, which CUDA graphs can capture.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .registry import ConfigError, Registry, number

CORRUPTIONS = Registry("corruption")
Corruption = Callable[[Tensor, Optional[torch.Generator]], Tensor]


def _uniform(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _probability(prob) -> float:
    return number(prob, "prob", low=0, high=1)


@CORRUPTIONS.register
def none() -> Corruption:
    return lambda x, generator=None: x


@CORRUPTIONS.register
def gaussian(noise_factor: float) -> Corruption:
    """x̃ = clamp(x + noise_factor · ε, 0, 1), ε ~ N(0, I)."""
    sigma = number(noise_factor, "noise_factor", low=0)

    def corrupt(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + sigma * noise).clamp(0.0, 1.0)
    return corrupt


@CORRUPTIONS.register
def salt_pepper(prob: float) -> Corruption:
    """Each pixel with probability `prob` becomes 1 (salt) or 0 (pepper), half and half."""
    p = _probability(prob)

    def corrupt(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        hit = _uniform(x, generator) < p
        salt = (_uniform(x, generator) > 0.5).to(x.dtype)
        return torch.where(hit, salt, x)
    return corrupt


@CORRUPTIONS.register
def masking(prob: float) -> Corruption:
    """Each pixel is zeroed with probability `prob` (dropout-like occlusion)."""
    p = _probability(prob)

    def corrupt(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return x * (_uniform(x, generator) > p).to(x.dtype)
    return corrupt


@CORRUPTIONS.register
def block(size: int, count: int, image_shape: tuple[int, int, int]) -> Corruption:
    """`count` square blocks of side `size` pixels, at uniform positions, zeroed in every channel."""
    c, h, w = image_shape
    size = number(size, "size", low=1, integer=True)
    count = number(count, "count", low=1, integer=True)
    if size > min(h, w):
        raise ConfigError(f"must be <= the image side {min(h, w)} (images are {h}x{w}), got {size}", "size")

    def corrupt(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        batch = x.shape[0]
        corner = torch.rand((2, batch, count, 1), generator=generator, device=x.device)
        top = (corner[0] * (h - size + 1)).long()  # uniform over the h - size + 1 positions
        left = (corner[1] * (w - size + 1)).long()
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= top) & (rows < top + size)  # (B, count, H)
        in_cols = (cols >= left) & (cols < left + size)  # (B, count, W)
        hidden = (in_rows.unsqueeze(3) & in_cols.unsqueeze(2)).any(1)  # (B, H, W)
        keep = (~hidden).to(x.dtype).unsqueeze(1)
        return (x.view(batch, c, h, w) * keep).view(batch, -1)
    return corrupt
