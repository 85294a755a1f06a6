"""What the loop watches on the validation split after each epoch: how active the code is, and a
picture of clean, corrupted and reconstructed inputs. The test metrics (analysis) build on the same."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..corruptions import Corruption
from ..models import Autoencoder, device_of, eval_mode
from ..runs import GRID_PAD
from .objective import batches

GRID_IMAGES = 8
ACTIVITY = ("population_sparsity", "dead_fraction", "mean_activation")


@torch.no_grad()
def codes(model: Autoencoder, x: Tensor, batch_size: int) -> Tensor:
    """Latent codes of the clean inputs, (N, latent_dim)."""
    with eval_mode(model):
        return torch.cat([model.encode(clean)[0] for clean in batches(x, batch_size, device_of(model))])


def sparsity(latent: Tensor, threshold: float) -> tuple[dict, Tensor]:
    """Population sparsity (mean fraction of units active per sample), dead-unit fraction (never
    active), mean activation, lifetime sparseness (lifetime_sparseness); and the lifetime sparsity of
    each unit (the fraction of samples it is active on: its mean is the population sparsity again)."""
    active = (latent > threshold).float()
    lifetime = active.mean(0)
    return {"population_sparsity": active.mean(1).mean().item(),
            "lifetime_sparseness": lifetime_sparseness(latent),
            "dead_fraction": (lifetime == 0).float().mean().item(),
            "mean_activation": latent.mean().item()}, lifetime


def lifetime_sparseness(latent: Tensor) -> float:
    """How selective the units are, from their activation magnitudes r over the n samples: per unit
    S = (1 - (sum r / n)^2 / (sum r^2 / n)) / (1 - 1/n) (Vinje & Gallant 2000; the Treves-Rolls measure
    rescaled to [0, 1]), 1 for a unit that responds to one sample, 0 for one that responds alike to
    all; averaged over the units that respond at all (0 when none does)."""
    r = latent.abs().double()
    n = len(r)
    mean, mean_sq = r.mean(0), r.pow(2).mean(0)
    live = mean_sq > 0
    if n < 2 or not live.any():
        return 0.0
    per_unit = (1 - mean[live] ** 2 / mean_sq[live]) / (1 - 1 / n)
    return per_unit.mean().item()


def activity(model: Autoencoder, x: Tensor, threshold: float, batch_size: int) -> dict[str, float]:
    """Population sparsity, dead-unit fraction and mean activation of x's codes: logged each epoch on
    the validation split, to follow how fast a penalty makes the code sparse (Exercise 3's dynamics)."""
    found, _ = sparsity(codes(model, x, batch_size), threshold)
    return {name: found[name] for name in ACTIVITY}


@torch.no_grad()
def image_grid(model: Autoencoder, x: Tensor, corrupt: Corruption, image_shape: tuple[int, int, int],
               seed: int) -> Tensor:
    """Rows: clean, corrupted, reconstructed (the first images of x, noise drawn from `seed`)."""
    device = device_of(model)
    clean = x[:GRID_IMAGES].to(device)
    noisy = corrupt(clean, torch.Generator(device).manual_seed(seed))
    with eval_mode(model):
        recon = model(noisy).recon
    return grid(torch.cat([clean, noisy, recon]).clamp(0, 1), image_shape, columns=len(clean))


def square(count: int) -> int:
    """The columns of a grid of `count` images laid out as a square."""
    return math.ceil(math.sqrt(count))


def grid(images: Tensor, shape: tuple[int, int, int], columns: int | None = None, stretch: bool = False,
         pad: int = GRID_PAD) -> Tensor:
    """Images (any layout of N x shape, values in [0, 1]) as one RGB picture on the CPU, `columns`
    across (default: a square), `pad` white pixels around each: torchvision's make_grid. `stretch` maps
    each image's own range onto [0, 1] first."""
    from torchvision.utils import make_grid  # its import takes a second: paid by the commands that draw

    images = images.detach().reshape(-1, *shape).float().cpu()
    columns = min(columns or square(len(images)), len(images))
    picture = make_grid(images, nrow=columns, padding=pad, normalize=stretch, scale_each=True, pad_value=1.0)
    if len(images) == 1:  # make_grid hands a lone image back without its frame
        picture = F.pad(picture, (pad, pad, pad, pad), value=1.0)
    return picture
