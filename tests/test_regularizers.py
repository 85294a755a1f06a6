"""Penalties against independent references: hand formulas and float64 autograd Jacobians."""
import math

import pytest
import torch

from aelab.models import ACTIVATIONS, MODELS
from aelab.regularizers import (REGULARIZERS, encoder_sensitivity, hutchinson_sq_norm, kl_term,
                                l1_term)


def mlp(hidden, latent, enc="relu", lat="identity", input_dim=20):
    return MODELS.get("mlp")(input_shape=(input_dim,), hidden=hidden, latent_dim=latent, encoder_activation=enc,
                             latent_activation=lat, decoder_activation="relu", output_activation="sigmoid").double()


def reference_sq_norm(model, x):
    """Mean over the batch of ||dz/dx||_F^2 from torch.autograd.functional.jacobian, one sample at a time."""
    encode = lambda xi: model.encode(xi.unsqueeze(0))[0].squeeze(0)  # noqa: E731
    return torch.stack([torch.autograd.functional.jacobian(encode, xi).pow(2).sum() for xi in x]).mean()


def test_l1_is_mean_absolute_activation():
    z = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert l1_term(z).item() == pytest.approx((1 + 2 + 0 + 3) / 4)


def test_kl_matches_hand_computation():
    z = torch.tensor([[0.1, 0.5], [0.3, 0.7]])
    rho = 0.05
    expected = 0.0
    for rho_hat in (0.2, 0.6):
        expected += rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))
    assert kl_term(z, rho).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_at_target_and_finite_at_saturation():
    assert kl_term(torch.full((4, 3), 0.05), 0.05).item() == pytest.approx(0.0, abs=1e-7)
    assert math.isfinite(kl_term(torch.zeros(4, 3), 0.05).item())
    assert math.isfinite(kl_term(torch.ones(4, 3), 0.05).item())


def formula_kl(latent, rho, eps):
    """The tutorial's kl_divergence_loss as written, with its clamp: autograd differentiates it."""
    rho_hat = latent.mean(0).clamp(eps, 1 - eps)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_value_and_gradient_match_autograd_of_the_formula(dtype):
    """The closed-form backward against autograd through the formula, in float64 (and float32 against
    that float64 reference), units inside (0, 1) and units whose mean the clamp moves (all 0, all 1)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(6, 7, generator=gen, dtype=torch.float64) * 0.3
    base[:, 5], base[:, 6] = 0.0, 1.0  # rho_hat 0 and 1: clamped, no gradient
    base[:, 4] = 0.05  # at the target: value 0 and slope 0 for that unit
    for rho in (0.05, 0.3):
        ref_latent = base.clone().requires_grad_(True)
        ref = formula_kl(ref_latent, rho, max(1e-8, torch.finfo(dtype).eps))  # the clamp the dtype gets
        (ref_grad,) = torch.autograd.grad(ref * 2.5, ref_latent)
        latent = base.to(dtype).requires_grad_(True)
        got = kl_term(latent, rho)
        (grad,) = torch.autograd.grad(got * 2.5, latent)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got.double(), ref.detach(), **tol)
        torch.testing.assert_close(grad.double(), ref_grad, **tol)
        assert grad[:, 5:].abs().sum() == 0 and (rho != 0.05 or grad[:, 4].abs().max() < 1e-6)
        assert (grad[0] == grad[1]).all()  # each row gets 1/N of the slope


def test_kl_near_its_target_is_as_precise_in_float32_as_the_formula():
    """Per unit the term is a difference of two ~0.2 numbers; over 256 units near rho_hat = rho the
    float32 error stays within a few float32 steps of 0.2 per unit, as the tutorial's formula's does."""
    rho = 0.05
    for delta in (1e-3, 1e-2, 1e-1):
        latent = torch.full((4, 256), rho * (1 + delta), dtype=torch.float64)
        ref = formula_kl(latent, rho, 1e-8).item()
        assert ref == pytest.approx(256 * rho * delta**2 / (2 * (1 - rho)), rel=0.1)  # KL's second order
        error = abs(kl_term(latent.float(), rho).item() - ref)
        tutorial = abs(formula_kl(latent.float(), rho, torch.finfo(torch.float32).eps).item() - ref)
        assert error < 256 * 3 * 1.5e-8 and error < 1.25 * tutorial + 1e-7, (delta, error, tutorial)


def test_kl_gradient_is_first_order_only():
    """Its backward is closed-form: asking for a second derivative is an error, not a wrong number."""
    latent = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(kl_term(latent, 0.05), latent, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


@pytest.mark.parametrize("hidden,enc,lat", [
    ([16, 12], "relu", "identity"),
    ([16, 12], "sigmoid", "sigmoid"),
    ([24, 16, 12], "tanh", "relu"),
    ([16], "elu", "softplus"),
    ([30, 8], "gelu", "tanh"),  # first layer narrower than the input and wider: both last-factor paths
    ([8, 30], "leaky_relu", "sigmoid"),
    ([], "relu", "sigmoid"),  # one-layer encoder
    ([], "relu", "identity"),
])
def test_exact_contractive_matches_float64_autograd(hidden, enc, lat):
    model = mlp(hidden, 6, enc, lat)
    x = torch.randn(5, 20, dtype=torch.float64)
    fwd = model(x, trace=True)
    got = encoder_sensitivity(fwd, model).mean()
    ref = reference_sq_norm(model, x)
    assert abs(got.item() - ref.item()) / ref.item() < 1e-6


def test_activation_derivatives_match_autograd():
    u = torch.linspace(-3, 3, 101, dtype=torch.float64, requires_grad=True)
    for name in ACTIVATIONS:
        act = ACTIVATIONS.get(name)
        (auto,) = torch.autograd.grad(act.fn(u).sum(), u)
        mine = torch.ones_like(u) if act.derivative is None else act.derivative(u, act.fn(u))
        torch.testing.assert_close(mine[u != 0], auto[u != 0], msg=name)


def test_generic_contractive_matches_autograd_for_conv_encoder():
    model = MODELS.get("conv")(input_shape=(1, 8, 8), channels=[4, 6], latent_dim=5, encoder_activation="tanh",
                               latent_activation="sigmoid", decoder_activation="relu",
                               output_activation="sigmoid").double()
    x = torch.rand(3, 64, dtype=torch.float64, requires_grad=True)
    fwd = model(x, trace=True)
    assert fwd.derivatives is None  # no closed form: the batched-autograd path
    got = encoder_sensitivity(fwd, model).mean()
    ref = reference_sq_norm(model, x.detach())
    assert abs(got.item() - ref.item()) / ref.item() < 1e-6


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_contractive_gradient_reaches_first_layer(method):
    model = mlp([16, 12], 6, "sigmoid", "sigmoid").float()
    penalty = REGULARIZERS.get("contractive")(weight=1.0, method=method)
    x = torch.rand(8, 20, requires_grad=method == "hutchinson")
    value = penalty(model(x, trace=method == "exact"), model)
    value.backward()
    first = model.enc_layers[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_exact_gradient_matches_autograd_of_reference():
    """d penalty / d W1 equals the gradient of the float64 autograd-Jacobian penalty."""
    model = mlp([10, 8], 4, "sigmoid", "sigmoid", input_dim=12)
    x = torch.rand(6, 12, dtype=torch.float64)
    w1 = model.enc_layers[0].weight
    (mine,) = torch.autograd.grad(encoder_sensitivity(model(x, trace=True), model).mean(), w1)
    encode = lambda xi: model.encode(xi.unsqueeze(0))[0].squeeze(0)  # noqa: E731
    ref = torch.stack([torch.autograd.functional.jacobian(encode, xi, create_graph=True).pow(2).sum()
                       for xi in x]).mean()
    (expected,) = torch.autograd.grad(ref, w1)
    torch.testing.assert_close(mine, expected)


def test_seed_per_latent_loop_agrees():
    """The seed's compute_jacobian_penalty (one backward per latent unit) gives the same number."""
    model = mlp([16, 12], 6, "sigmoid", "sigmoid")
    x = torch.rand(7, 20, dtype=torch.float64, requires_grad=True)
    z = model.encode(x)[0]
    seed = 0.0
    for i in range(z.shape[1]):
        go = torch.zeros_like(z)
        go[:, i] = 1.0
        (col,) = torch.autograd.grad(z, x, go, retain_graph=True)
        seed = seed + col.pow(2).sum()
    seed = seed / x.shape[0]
    fast = encoder_sensitivity(model(x.detach(), trace=True), model).mean()
    assert fast.item() == pytest.approx(seed.item(), rel=1e-10)


@pytest.mark.parametrize("samples", [1, 4])
def test_hutchinson_is_unbiased(samples):
    model = mlp([16, 12], 6, "sigmoid", "sigmoid")
    x = torch.rand(4, 20, dtype=torch.float64, requires_grad=True)
    z = model.encode(x)[0]
    draws = torch.stack([hutchinson_sq_norm(z, x, samples).mean() for _ in range(2000 // samples)])
    ref = reference_sq_norm(model, x.detach()).item()
    # mean of the draws within 4 standard errors of the exact value
    assert abs(draws.mean().item() - ref) < 4 * draws.std().item() / math.sqrt(len(draws))


def test_linear_encoder_has_closed_form_norm():
    """z = W x: ||J||_F^2 = ||W||_F^2 for every sample."""
    model = mlp([], 3, lat="identity", input_dim=5)
    x = torch.rand(4, 5, dtype=torch.float64)
    got = encoder_sensitivity(model(x, trace=True), model)
    expected = model.enc_layers[0].weight.pow(2).sum()
    torch.testing.assert_close(got, expected.expand(4))


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_regularizer_is_a_finite_scalar(name):
    model = mlp([16], 6, "relu", "sigmoid").float()
    kwargs = {} if name == "none" else {"weight": 0.1}
    penalty = REGULARIZERS.get(name)(**kwargs)
    x = torch.rand(8, 20, requires_grad=penalty.jacobian == "hutchinson")
    value = penalty(model(x, trace=True), model)
    assert value.dim() == 0 and torch.isfinite(value)
