"""Optimizers over the model's parameters (Adam's and AdamW's fused kernels on CPU and CUDA)."""
from __future__ import annotations

from typing import Iterable

import torch

from .registry import Registry, number

OPTIMIZERS = Registry("optim")


def _adam_args(lr, betas, weight_decay, device: torch.device) -> dict:
    b1, b2 = betas
    return dict(lr=number(lr, "lr", low=0, low_open=True),
                betas=(number(b1, "betas", low=0, high=1, high_open=True),
                       number(b2, "betas", low=0, high=1, high_open=True)),
                weight_decay=number(weight_decay, "weight_decay", low=0),
                fused=device.type in ("cpu", "cuda"))


@OPTIMIZERS.register
def adam(params: Iterable[torch.nn.Parameter], device: torch.device, lr: float = 1e-3,
         betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, **_adam_args(lr, betas, weight_decay, device))


@OPTIMIZERS.register
def adamw(params: Iterable[torch.nn.Parameter], device: torch.device, lr: float = 1e-3,
          betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **_adam_args(lr, betas, weight_decay, device))


@OPTIMIZERS.register
def sgd(params: Iterable[torch.nn.Parameter], device: torch.device, lr: float = 1e-2,
        momentum: float = 0.9) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=number(lr, "lr", low=0, low_open=True),
                           momentum=number(momentum, "momentum", low=0, high=1, high_open=True))
