"""Autoencoders: an MLP with an exact batched encoder Jacobian, and a small conv net for images."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import ConfigError, Registry, number

MODELS = Registry("model")


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live: where the metrics run its batches."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, back in train mode after it."""
    model.eval()
    try:
        yield
    finally:
        model.train()


@dataclass(frozen=True)
class Activation:
    """An elementwise activation, its derivative f'(u) given (u, f(u)), and its output range."""
    fn: Callable[[Tensor], Tensor]
    derivative: Optional[Callable[[Tensor, Tensor], Tensor]]  # None: identity (f' = 1)
    unit_interval: bool = False  # outputs lie in (0, 1)


ACTIVATIONS = Registry("activation")
for _name, _act in {
    "identity": Activation(lambda u: u, None),
    "relu": Activation(F.relu, lambda u, y: (u > 0).to(u.dtype)),
    "sigmoid": Activation(torch.sigmoid, lambda u, y: y * (1 - y), unit_interval=True),
    "tanh": Activation(torch.tanh, lambda u, y: 1 - y * y),
    "leaky_relu": Activation(F.leaky_relu, lambda u, y: torch.where(u > 0, 1.0, 0.01).to(u.dtype)),
    "elu": Activation(F.elu, lambda u, y: torch.where(u > 0, torch.ones_like(u), y + 1)),
    "softplus": Activation(F.softplus, lambda u, y: torch.sigmoid(u)),
    "gelu": Activation(F.gelu, lambda u, y: torch.special.ndtr(u) + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)),
}.items():
    ACTIVATIONS.register(_name)(_act)


def activation(name: str, key: str) -> Activation:
    try:
        return ACTIVATIONS.get(name)
    except ConfigError as e:
        raise ConfigError(e.message, key) from None


@dataclass
class Forward:
    """One pass: what the encoder saw, the code, and the reconstruction.

    `logits` is the decoder output before a sigmoid output activation (None for other outputs);
    `derivatives` holds f'(u) of every encoder layer when the model can form its Jacobian exactly.
    """
    inputs: Tensor
    latent: Tensor
    recon: Tensor
    logits: Optional[Tensor]
    derivatives: Optional[list[Optional[Tensor]]] = None


class Autoencoder(nn.Module):
    """Shared shape of every model: encoder, decoder, and the named activations at the seams."""

    def __init__(self, latent_dim: int, latent_activation: str, output_activation: str):
        super().__init__()
        self.latent_dim = latent_dim
        self.latent_act = activation(latent_activation, "latent_activation")
        self.output_act = activation(output_activation, "output_activation")
        self.sigmoid_output = output_activation == "sigmoid"

    @property
    def latent_unit_interval(self) -> bool:
        return self.latent_act.unit_interval

    def decode(self, z: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Returns (reconstruction, logits or None)."""
        out = self.decoder(z)
        return (torch.sigmoid(out), out) if self.sigmoid_output else (self.output_act.fn(out), None)

    def forward(self, x: Tensor, trace: bool = False) -> Forward:
        z, derivatives = self.encode(x, trace)
        recon, logits = self.decode(z)
        return Forward(x, z, recon, logits, derivatives)


class MLPAutoencoder(Autoencoder):
    """Fully connected encoder x → hidden... → latent and a mirrored decoder."""

    def __init__(self, input_dim: int, hidden: list[int], latent_dim: int, encoder_activation: str,
                 latent_activation: str, decoder_activation: str, output_activation: str):
        super().__init__(latent_dim, latent_activation, output_activation)
        sizes = [input_dim, *hidden, latent_dim]
        self.enc_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        enc_act = activation(encoder_activation, "encoder_activation")
        self.enc_acts = [enc_act] * len(hidden) + [self.latent_act]
        dec_act = activation(decoder_activation, "decoder_activation").fn
        back = sizes[::-1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(back, back[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(back) - 2:
                layers.append(_Elementwise(dec_act))
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: Tensor, trace: bool = False) -> tuple[Tensor, Optional[list]]:
        derivatives = [] if trace else None
        h = x
        for layer, act in zip(self.enc_layers, self.enc_acts):
            u = layer(h)
            h = act.fn(u)
            if trace:
                derivatives.append(None if act.derivative is None else act.derivative(u, h))
        return h, derivatives

    def jacobian_sq_norm(self, derivatives: list[Optional[Tensor]], batch: int) -> Tensor:
        """Per-sample ||J_f(x)||_F^2 of this model's encoder (jacobian_sq_norm)."""
        return jacobian_sq_norm([layer.weight for layer in self.enc_layers], derivatives, batch)


def jacobian_sq_norm(weights: list[Tensor], derivatives: list[Optional[Tensor]], batch: int) -> Tensor:
    """Per-sample ||J_f(x)||_F^2 of an MLP encoder, J = D_L W_L ... D_1 W_1, multiplied from the latent side.

    The k = latent_dim rows of J travel through the layers as one batched product (no loop over
    units); the last factor uses ||A W_1||_F^2 = tr(A (W_1 W_1^T) A^T) when that is cheaper. Leading
    dimensions of the weights (N, out, in) and derivatives (N, B, out) are N stacked models: (N, B) out.
    """
    lead = weights[0].shape[:-2]
    rows = None  # D_L W_L ... D_{l+1} W_{l+1}: shape (..., B or 1, k, h_l); None is the identity
    for w, d in zip(weights[:0:-1], derivatives[:0:-1]):
        if rows is None:
            rows = w.unsqueeze(-3) if d is None else d.unsqueeze(-1) * w.unsqueeze(-3)
        else:
            rows = (rows if d is None else rows * d.unsqueeze(-2)) @ (w if not lead else w.unsqueeze(-3))
    w1, d1 = weights[0], derivatives[0]
    if rows is None:  # one-layer encoder: ||D_1 W_1||^2 = sum_j d_j^2 ||w_j||^2
        norms = w1.pow(2).sum(-1)
        if d1 is None:
            return norms.sum(-1, keepdim=True).expand(*lead, batch)
        return d1.pow(2) @ norms if not lead else (d1.pow(2) @ norms.unsqueeze(-1)).squeeze(-1)
    a = rows if d1 is None else rows * d1.unsqueeze(-2)
    if w1.shape[-1] > w1.shape[-2]:
        sq = _GramQuadratic.apply(a, w1 @ w1.mT)
    else:
        sq = (a @ (w1 if not lead else w1.unsqueeze(-3))).pow(2).sum((-2, -1))
    return sq.expand(*lead, batch)


class _GramQuadratic(torch.autograd.Function):
    """q_b = tr(A_b G A_b^T) for a symmetric G, with the backward written out: dq/dA = 2 A G reuses
    the forward's A G, and dq/dG = sum_b A_b^T A_b, one GEMM where autograd would spend two. A (..., B, k, h)
    and G (..., h, h) may lead with N stacked models' dimension."""

    @staticmethod
    def forward(ctx, a: Tensor, gram: Tensor) -> Tensor:
        ag = a @ (gram if gram.dim() == 2 else gram.unsqueeze(-3))
        ctx.save_for_backward(a, ag)
        return (ag * a).sum((-2, -1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, ag = ctx.saved_tensors
        scale = grad.unsqueeze(-1).unsqueeze(-1)
        grad_a = 2 * scale * ag if ctx.needs_input_grad[0] else None
        grad_gram = None
        if ctx.needs_input_grad[1]:
            weighted = (a * scale).flatten(-3, -2)
            grad_gram = weighted.mT @ a.flatten(-3, -2)
        return grad_a, grad_gram


class _Elementwise(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class ConvAutoencoder(Autoencoder):
    """Two stride-2 convolutions → linear code → two transposed convolutions back to the image."""

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], latent_dim: int,
                 encoder_activation: str, latent_activation: str, decoder_activation: str,
                 output_activation: str):
        super().__init__(latent_dim, latent_activation, output_activation)
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        enc_act = _Elementwise(activation(encoder_activation, "encoder_activation").fn)
        dec_act = _Elementwise(activation(decoder_activation, "decoder_activation").fn)
        sizes = [(h, w)]
        enc: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
        for cin, cout in zip([c, *channels], channels):
            enc += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), enc_act]
            sizes.append(tuple((s - 1) // 2 + 1 for s in sizes[-1]))
        flat = channels[-1] * sizes[-1][0] * sizes[-1][1]
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, latent_dim))
        dec: list[nn.Module] = [nn.Linear(latent_dim, flat), dec_act,
                                nn.Unflatten(1, (channels[-1], *sizes[-1]))]
        outs = [*channels[::-1][1:], c]
        for i, (cin, cout) in enumerate(zip(channels[::-1], outs)):
            small, big = sizes[-1 - i], sizes[-2 - i]
            pad = tuple(b - (2 * s - 1) for s, b in zip(small, big))
            dec.append(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=pad))
            if i < len(channels) - 1:
                dec.append(dec_act)
        self.decoder = nn.Sequential(*dec, nn.Flatten())

    def encode(self, x: Tensor, trace: bool = False) -> tuple[Tensor, None]:
        return self.latent_act.fn(self.encoder(x)), None


def _sizes(values, key: str, allow_empty: bool) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"must be a list of sizes, e.g. [256, 128], got {values!r}", key)
    if not values and not allow_empty:
        raise ConfigError("must list at least one size, e.g. [16, 32]", key)
    return [number(v, key, low=1, integer=True) for v in values]


@MODELS.register
def mlp(input_shape: tuple[int, ...], hidden: list[int], latent_dim: int, encoder_activation: str,
        latent_activation: str, decoder_activation: str, output_activation: str) -> MLPAutoencoder:
    """MLP autoencoder; the input size comes from the data."""
    return MLPAutoencoder(math.prod(input_shape), _sizes(hidden, "hidden", True),
                          number(latent_dim, "latent_dim", low=1, integer=True), encoder_activation,
                          latent_activation, decoder_activation, output_activation)


@MODELS.register
def conv(input_shape: tuple[int, ...], channels: list[int], latent_dim: int, encoder_activation: str,
         latent_activation: str, decoder_activation: str, output_activation: str) -> ConvAutoencoder:
    """Conv autoencoder for (C, H, W) images."""
    return ConvAutoencoder(tuple(input_shape), _sizes(channels, "channels", False),
                           number(latent_dim, "latent_dim", low=1, integer=True), encoder_activation,
                           latent_activation, decoder_activation, output_activation)
