"""Reconstruction losses against torch's functional losses and the seed's Sigmoid + BCELoss."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from aelab.losses import LOSSES
from aelab.models import Forward


def forward_of(logits):
    return Forward(inputs=None, latent=None, recon=torch.sigmoid(logits), logits=logits)


@pytest.fixture
def batch():
    return torch.randn(16, 64), torch.rand(16, 64)


def test_mse_and_mae_match_torch(batch):
    logits, target = batch
    fwd = forward_of(logits)
    assert LOSSES.get("mse")()(fwd, target).item() == pytest.approx(F.mse_loss(fwd.recon, target).item())
    assert LOSSES.get("mae")()(fwd, target).item() == pytest.approx(F.l1_loss(fwd.recon, target).item())


def test_bce_from_logits_equals_seed_sigmoid_bceloss(batch):
    logits, target = batch
    seed = nn.BCELoss()(nn.Sigmoid()(logits), target)
    assert LOSSES.get("bce")()(forward_of(logits), target).item() == pytest.approx(seed.item(), rel=1e-5)


def test_bce_stays_finite_where_sigmoid_saturates():
    logits = torch.tensor([[40.0, -40.0]])
    target = torch.tensor([[0.0, 1.0]])
    value = LOSSES.get("bce")()(forward_of(logits), target)
    assert value.item() == pytest.approx(40.0, rel=1e-4)  # the seed's BCELoss clamps log at -100 instead


@pytest.mark.parametrize("name", LOSSES.names())
def test_sum_reduction_is_per_sample_sum(name, batch):
    logits, target = batch
    fwd = forward_of(logits)
    mean = LOSSES.get(name)(reduction="mean")(fwd, target)
    total = LOSSES.get(name)(reduction="sum")(fwd, target)
    assert total.item() == pytest.approx(mean.item() * target.shape[1], rel=1e-5)


def test_bce_without_logits_falls_back_to_probabilities(batch):
    logits, target = batch
    fwd = Forward(inputs=None, latent=None, recon=torch.sigmoid(logits), logits=None)
    assert LOSSES.get("bce")()(fwd, target).item() == pytest.approx(
        F.binary_cross_entropy(torch.sigmoid(logits), target).item(), rel=1e-6)
