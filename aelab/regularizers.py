"""Penalties on the code: total loss = recon + weight × term (the seed's form)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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
    """A weighted term of (forward pass, model, **options); `jacobian` says what the term needs of the
    encoder. A term reduces over the batch and units only: on N stacked models' forward pass (leading
    dimension N, options as (N, 1) tensors) it gives N values, one per model."""
    name: str
    term: Callable[..., Tensor]
    weight: float
    jacobian: Optional[str] = None  # None, "exact" or "hutchinson"
    needs_unit_latent: bool = False
    zero: bool = False  # the term is 0 whatever the model does: the objective skips adding it
    options: dict = field(default_factory=dict)  # the term's numbers besides the weight (kl's rho)

    def __call__(self, fwd: Forward, model: Autoencoder) -> Tensor:
        return self.term(fwd, model, **self.options)


def l1_term(latent: Tensor) -> Tensor:
    """Mean |h| over the latent batch (the seed's `l1_loss`)."""
    return latent.abs().mean((-2, -1))


class _SparsityKL(torch.autograd.Function):
    """kl_term's value, and its gradient in closed form: d/d rho_hat_j KL = (rho_hat_j - rho) /
    (rho_hat_j (1 - rho_hat_j)), shared evenly by the batch's rows, 0 where the clamp moved rho_hat_j.
    Autograd through the formula ran 33 small kernels for the term and its gradient; this runs 15
    (on a GPU each is a launch, a slot in the replayed graph; tests/test_steps.py counts them)."""

    @staticmethod
    def forward(ctx, latent: Tensor, rho: float | Tensor, eps: float) -> Tensor:
        rho_hat = latent.mean(-2)
        p = rho_hat.clamp(eps, 1 - eps)
        q = 1 - p
        ctx.save_for_backward(p, q, p == rho_hat)
        ctx.rho, ctx.rows = rho, latent.shape[-2]
        # per unit: that minus the cross-entropy
        target = rho * math.log(rho) + (1 - rho) * math.log(1 - rho) if isinstance(rho, float) else torch.special.xlogy(
            rho, rho) + torch.special.xlogy(1 - rho, 1 - rho)
        return (target - torch.lerp(q.log(), p.log(), rho)).sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        p, q, unclamped = ctx.saved_tensors
        slope = (p - ctx.rho) * unclamped / (p * q) * (grad.unsqueeze(-1) / ctx.rows)
        return slope.unsqueeze(-2).expand(*p.shape[:-1], ctx.rows, -1), None, None


def kl_term(latent: Tensor, rho: float | Tensor) -> Tensor:
    """Sum over units j of KL(rho || rho_hat_j), rho_hat_j the batch-mean activation of unit j (N stacked
    models: latent (N, B, k), rho a number or (N, 1): N sums)."""
    eps = max(KL_EPS, torch.finfo(latent.dtype).eps)  # in float32, 1 - 1e-8 rounds to 1: log(0)
    return _SparsityKL.apply(latent, rho, eps)


def jacobian_rows(latent: Tensor, inputs: Tensor, create_graph: bool = True) -> Tensor:
    """dz/dx for any encoder, (k, B, *input shape) (N stacked encoders: (k, N, B, ...)): all k rows in
    one batched backward pass."""
    k = latent.shape[-1]
    eye = torch.eye(k, dtype=latent.dtype, device=latent.device)
    probes = eye.view(k, *[1] * (latent.dim() - 1), k).expand(k, *latent.shape)
    (rows,) = torch.autograd.grad(latent, inputs, probes, create_graph=create_graph, is_grads_batched=True)
    return rows


def jacobian_sq_norm_autograd(latent: Tensor, inputs: Tensor) -> Tensor:
    """Per-sample ||dz/dx||_F^2 for any encoder."""
    return jacobian_rows(latent, inputs).pow(2).flatten(latent.dim()).sum((0, -1))


def hutchinson_sq_norm(latent: Tensor, inputs: Tensor, samples: int,
                       draw: Optional[Callable[[tuple], Tensor]] = None) -> Tensor:
    """Per-sample unbiased estimate of ||J||_F^2 = E_v ||J^T v||^2, v ~ N(0, I_k), `samples` probes
    (drawn from the device's generator, or by `draw(shape)`: N stacked encoders' own streams)."""
    shape = (samples, *latent.shape)
    probes = draw(shape) if draw else torch.randn(shape, dtype=latent.dtype, device=latent.device)
    if samples == 1:
        (g,) = torch.autograd.grad(latent, inputs, probes[0], create_graph=True)
        return g.pow(2).flatten(latent.dim() - 1).sum(-1)
    (g,) = torch.autograd.grad(latent, inputs, probes, create_graph=True, is_grads_batched=True)
    return g.pow(2).flatten(latent.dim()).sum(-1).mean(0)


def encoder_sensitivity(fwd: Forward, model: Autoencoder) -> Tensor:
    """Per-sample exact ||J_f(x)||_F^2: the model's closed-form product where it has one."""
    if fwd.derivatives is not None:
        return model.jacobian_sq_norm(fwd.derivatives, fwd.latent.shape[-2])
    return jacobian_sq_norm_autograd(fwd.latent, fwd.inputs)


def _weight(weight) -> float:
    return number(weight, "weight", low=0)


@REGULARIZERS.register
def none(weight: float = 0.0) -> Penalty:
    """No penalty: the plain (or, with a corruption, denoising) autoencoder."""
    return Penalty("none", lambda fwd, model: fwd.latent.new_zeros(fwd.latent.shape[:-2]), _weight(weight), zero=True)


@REGULARIZERS.register
def l1(weight: float) -> Penalty:
    return Penalty("l1", lambda fwd, model: l1_term(fwd.latent), _weight(weight))


@REGULARIZERS.register
def kl(weight: float, rho: float = 0.05) -> Penalty:
    rho = number(rho, "rho", low=0, high=1, low_open=True, high_open=True)
    return Penalty("kl", lambda fwd, model, rho: kl_term(fwd.latent, rho), _weight(weight), needs_unit_latent=True,
                   options={"rho": rho})


@REGULARIZERS.register
def contractive(weight: float, method: str = "exact", samples: int = 1) -> Penalty:
    """||J_f(x)||_F^2 of the encoder, averaged over the batch; exact or a Hutchinson estimate."""
    samples = number(samples, "samples", low=1, integer=True)
    methods = {
        "exact": lambda fwd, model: encoder_sensitivity(fwd, model).mean(-1),
        "hutchinson": lambda fwd, model, draw=None: hutchinson_sq_norm(fwd.latent, fwd.inputs, samples, draw).mean(-1),
    }
    if method not in methods:
        raise ConfigError(f"unknown method '{method}'; choose from: {', '.join(methods)}", "method")
    return Penalty("contractive", methods[method], _weight(weight), jacobian=method)
