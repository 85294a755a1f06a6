"""Reconstruction losses between the decoder output and the CLEAN input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from .models import Forward
from .registry import ConfigError, Registry

LOSSES = Registry("loss")
REDUCTIONS = ("mean", "sum")  # mean: per element (the seed's); sum: over elements, mean over batch


@dataclass(frozen=True)
class ReconstructionLoss:
    """`elementwise(fwd, target, reduction)` with the reduction fixed at build time."""
    name: str
    elementwise: Callable[[Forward, Tensor, str], Tensor]
    reduction: str
    needs_sigmoid_output: bool = False

    def __call__(self, fwd: Forward, target: Tensor) -> Tensor:
        """One value for a batch (B, D); N values for N stacked models' batches (N, B, D)."""
        if target.dim() > 2:
            each = self.elementwise(fwd, target, "none")
            return each.mean((-2, -1)) if self.reduction == "mean" else each.sum((-2, -1)) / target.shape[-2]
        if self.reduction == "mean":
            return self.elementwise(fwd, target, "mean")
        return self.elementwise(fwd, target, "sum") / target.shape[0]


def _reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction '{reduction}'; choose from: {', '.join(REDUCTIONS)}", "reduction")
    return reduction


def _bce(fwd: Forward, target: Tensor, reduction: str) -> Tensor:
    if fwd.logits is not None:  # log-sigmoid from logits: stable where sigmoid saturates
        return F.binary_cross_entropy_with_logits(fwd.logits, target, reduction=reduction)
    return F.binary_cross_entropy(fwd.recon.clamp(0, 1), target, reduction=reduction)


@LOSSES.register
def mse(reduction: str = "mean") -> ReconstructionLoss:
    """(1/n) sum_i ||x_i - x̂_i||^2: Gaussian noise model."""
    return ReconstructionLoss("mse", lambda f, t, r: F.mse_loss(f.recon, t, reduction=r), _reduction(reduction))


@LOSSES.register
def bce(reduction: str = "mean") -> ReconstructionLoss:
    """-(1/n) sum_i [x_i log x̂_i + (1 - x_i) log(1 - x̂_i)]: Bernoulli pixels, targets in [0, 1]."""
    return ReconstructionLoss("bce", _bce, _reduction(reduction), needs_sigmoid_output=True)


@LOSSES.register
def mae(reduction: str = "mean") -> ReconstructionLoss:
    """(1/n) sum_i |x_i - x̂_i|: Laplace noise model, robust to outliers."""
    return ReconstructionLoss("mae", lambda f, t, r: F.l1_loss(f.recon, t, reduction=r), _reduction(reduction))
