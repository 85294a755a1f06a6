"""Penalties on the code: total loss = recon + weight × term (the seed's form)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .models import Autoencoder, Forward
from .registry import ConfigError, Registry, number

REGULARIZERS = Registry("reg")
KL_EPS = 1e-8  # the seed's clamp of rho_hat away from 0 and 1 (raised to the dtype's resolution)


@dataclass(frozen=True)
class Penalty:
    """A weighted term of (forward pass, model); `jacobian` says what the term needs of the encoder."""
    name: str
    term: Callable[[Forward, Autoencoder], Tensor]
    weight: float
    jacobian: Optional[str] = None  # None, "exact" or "hutchinson"
    needs_unit_latent: bool = False
    zero: bool = False  # the term is 0 whatever the model does: the objective skips adding it

    def __call__(self, fwd: Forward, model: Autoencoder) -> Tensor:
        return self.term(fwd, model)


def l1_term(latent: Tensor) -> Tensor:
    """Mean |h| over the latent batch (the seed's `l1_loss`)."""
    return latent.abs().mean()


class _SparsityKL(torch.autograd.Function):
    """kl_term's value, and its gradient in closed form: d/d rho_hat_j KL = (rho_hat_j - rho) /
    (rho_hat_j (1 - rho_hat_j)), shared evenly by the batch's rows, 0 where the clamp moved rho_hat_j.
    Autograd through the formula ran 33 small kernels for the term and its gradient; this runs 15
    (on a GPU each is a launch, a slot in the replayed graph; tests/test_steps.py counts them)."""

    @staticmethod
    def forward(ctx, latent: Tensor, rho: float, eps: float) -> Tensor:
        rho_hat = latent.mean(0)
        p = rho_hat.clamp(eps, 1 - eps)
        q = 1 - p
        ctx.save_for_backward(p, q, p == rho_hat)
        ctx.rho, ctx.rows = rho, latent.shape[0]
        target = rho * math.log(rho) + (1 - rho) * math.log(1 - rho)  # per unit: that minus the cross-entropy
        return (target - torch.lerp(q.log(), p.log(), rho)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        p, q, unclamped = ctx.saved_tensors
        slope = (p - ctx.rho) * unclamped / (p * q) * (grad / ctx.rows)
        return slope.expand(ctx.rows, -1), None, None


def kl_term(latent: Tensor, rho: float) -> Tensor:
    """Sum over units j of KL(rho || rho_hat_j), rho_hat_j the batch-mean activation of unit j."""
    eps = max(KL_EPS, torch.finfo(latent.dtype).eps)  # in float32, 1 - 1e-8 rounds to 1: log(0)
    return _SparsityKL.apply(latent, rho, eps)


def jacobian_rows(latent: Tensor, inputs: Tensor, create_graph: bool = True) -> Tensor:
    """dz/dx for any encoder, (k, N, *input shape): all k rows in one batched backward pass."""
    k = latent.shape[1]
    probes = torch.eye(k, dtype=latent.dtype, device=latent.device).unsqueeze(1).expand(k, *latent.shape)
    (rows,) = torch.autograd.grad(latent, inputs, probes, create_graph=create_graph, is_grads_batched=True)
    return rows


def jacobian_sq_norm_autograd(latent: Tensor, inputs: Tensor) -> Tensor:
    """Per-sample ||dz/dx||_F^2 for any encoder."""
    return jacobian_rows(latent, inputs).pow(2).flatten(2).sum((0, 2))


def hutchinson_sq_norm(latent: Tensor, inputs: Tensor, samples: int) -> Tensor:
    """Per-sample unbiased estimate of ||J||_F^2 = E_v ||J^T v||^2, v ~ N(0, I_k), `samples` probes."""
    probes = torch.randn((samples, *latent.shape), dtype=latent.dtype, device=latent.device)
    if samples == 1:
        (g,) = torch.autograd.grad(latent, inputs, probes[0], create_graph=True)
        return g.pow(2).flatten(1).sum(1)
    (g,) = torch.autograd.grad(latent, inputs, probes, create_graph=True, is_grads_batched=True)
    return g.pow(2).flatten(2).sum(2).mean(0)


def encoder_sensitivity(fwd: Forward, model: Autoencoder) -> Tensor:
    """Per-sample exact ||J_f(x)||_F^2: the model's closed-form product where it has one."""
    if fwd.derivatives is not None:
        return model.jacobian_sq_norm(fwd.derivatives, fwd.latent.shape[0])
    return jacobian_sq_norm_autograd(fwd.latent, fwd.inputs)


def _weight(weight) -> float:
    return number(weight, "weight", low=0)


@REGULARIZERS.register
def none(weight: float = 0.0) -> Penalty:
    """No penalty: the plain (or, with a corruption, denoising) autoencoder."""
    return Penalty("none", lambda fwd, model: fwd.latent.new_zeros(()), _weight(weight), zero=True)


@REGULARIZERS.register
def l1(weight: float) -> Penalty:
    return Penalty("l1", lambda fwd, model: l1_term(fwd.latent), _weight(weight))


@REGULARIZERS.register
def kl(weight: float, rho: float = 0.05) -> Penalty:
    rho = number(rho, "rho", low=0, high=1, low_open=True, high_open=True)
    return Penalty("kl", lambda fwd, model: kl_term(fwd.latent, rho), _weight(weight), needs_unit_latent=True)


@REGULARIZERS.register
def contractive(weight: float, method: str = "exact", samples: int = 1) -> Penalty:
    """||J_f(x)||_F^2 of the encoder, averaged over the batch; exact or a Hutchinson estimate."""
    samples = number(samples, "samples", low=1, integer=True)
    methods = {
        "exact": lambda fwd, model: encoder_sensitivity(fwd, model).mean(),
        "hutchinson": lambda fwd, model: hutchinson_sq_norm(fwd.latent, fwd.inputs, samples).mean(),
    }
    if method not in methods:
        raise ConfigError(f"unknown method '{method}'; choose from: {', '.join(methods)}", "method")
    return Penalty("contractive", methods[method], _weight(weight), jacobian=method)
