"""What a trained model learned, measured on the test split (the seed's metrics and exercises).

Reconstruction (MSE, BCE, MAE, PSNR), sparsity (population, lifetime, dead units, mean activation),
encoder sensitivity (mean ||J_f(x)||_F^2) and the Jacobian's rank, how much of the image each unit in
use draws, the codes' principal components (latents.png), denoising robustness (error against clean
inputs under each test corruption, fixed seed; for gaussian noise also how well f(x̃) - x̃, the score
estimate, points back to the clean input) and linear-probe accuracy of the frozen codes next to raw pixels.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import Tensor

from ..build import EvalSettings, Parts
from ..corruptions import Corruption
from ..data import Splits
from ..losses import LOSSES
from ..regularizers import jacobian_rows
from ..training.monitor import GRID_IMAGES, codes, grid, sparsity
from ..models import Autoencoder, device_of, eval_mode
from ..training.objective import batches

RECON = ("mse", "bce", "mae")


def gradient_energy(images: Tensor) -> Tensor:
    """Sum of squared differences between neighbouring pixels, down the rows and across the columns, of
    (N, C, H, W) images: the high-frequency content that blur takes away."""
    return images.diff(dim=-2).pow(2).sum() + images.diff(dim=-1).pow(2).sum()


def step_alignment(recon: Tensor, noisy: Tensor, clean: Tensor) -> Tensor:
    """Per image, the cosine between the model's step from the noisy input, f(x̃) - x̃, and the step back
    to the clean one, x - x̃; NaN where the corruption changed no pixel. For gaussian noise of small
    sigma the first, over sigma², estimates the data's score ∇_x log p (the tutorial's score matching
    connection): 1 where it points straight at the clean input, 0 where it ignores the noise."""
    toward = (clean - noisy).flatten(1)
    cosine = torch.nn.functional.cosine_similarity((recon - noisy).flatten(1), toward, dim=1)
    return cosine.where(toward.abs().sum(1) > 0, torch.nan)


@torch.no_grad()
def reconstruction(model: Autoencoder, x: Tensor, image_shape: tuple[int, int, int], batch_size: int,
                   corrupt: Corruption | None = None, seed: int = 0) -> dict:
    """Per-element MSE, BCE, MAE and mean per-image PSNR (peak 1) of reconstructing clean x; and the
    sharpness of the reconstructions: their gradient energy over that of the clean images (1: as sharp
    as the inputs; blur lowers it, speckle raises it). With a corruption, also `score_cos`: the mean
    step_alignment over the images it changed (absent if it changed none)."""
    device = device_of(model)
    generator = torch.Generator(device).manual_seed(seed)
    losses = [LOSSES.get(name)() for name in RECON]
    sums = torch.zeros(len(RECON) + 1, device=device)
    energy = torch.zeros(2, device=device)  # reconstructions', clean images'
    aligned = torch.zeros(2, device=device)  # sum of the cosines, images changed
    with eval_mode(model):
        for clean in batches(x, batch_size, device):
            noisy = clean if corrupt is None else corrupt(clean, generator)
            fwd = model(noisy)
            per_image = (fwd.recon - clean).pow(2).mean(1).clamp_min(1e-10)
            psnr = (-10 * torch.log10(per_image)).sum()
            sums += torch.stack([*(loss(fwd, clean) * len(clean) for loss in losses), psnr])
            energy += torch.stack([gradient_energy(images.reshape(-1, *image_shape))
                                   for images in (fwd.recon, clean)])
            cosine = step_alignment(fwd.recon, noisy, clean)
            aligned += torch.stack([cosine.nansum(), cosine.isfinite().sum()])
    found = dict(zip((*RECON, "psnr"), (sums / len(x)).tolist()))
    score = {"score_cos": (aligned[0] / aligned[1]).item()} if aligned[1] > 0 else {}
    return {**found, "sharpness": (energy[0] / energy[1]).item(), **score}


def jacobian_spectrum(model: Autoencoder, x: Tensor, batch_size: int) -> Tensor:
    """The singular values of the encoder's Jacobian J_f(x) at each x, largest first: (N, min(k, d))."""
    values = []
    with eval_mode(model), torch.enable_grad():
        for clean in batches(x, batch_size, device_of(model)):
            inputs = clean.clone().requires_grad_(True)
            rows = jacobian_rows(model.encode(inputs)[0], inputs, create_graph=False)
            values.append(torch.linalg.svdvals(rows.flatten(2).transpose(0, 1)))
    return torch.cat(values)


def sensitivity(spectrum: Tensor) -> float:
    """Mean ||J_f(x)||_F^2 over the images of a Jacobian spectrum: the sum of the squared singular values."""
    return spectrum.double().pow(2).sum(1).mean().item()


def jacobian_rank(spectrum: Tensor) -> float:
    """How many input directions the encoder responds to, mean over images: the participation ratio
    (sum s^2)^2 / sum s^4 of each Jacobian's singular values s. 1 when one direction carries all of
    ||J||_F^2, min(k, d) when every direction carries the same, 0 where the encoder is flat."""
    energy = spectrum.double().pow(2)
    total = energy.sum(1)
    ratio = total.pow(2) / energy.pow(2).sum(1).where(total > 0, 1.0)
    return ratio.mean().item()


def principal_components(latent: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """The codes on their k leading principal components, (N, min(k, latent_dim)), and the share of the
    codes' variance each carries: the SVD of the centred codes, each component's sign set so that its
    largest loading is positive (the same picture each time)."""
    centred = latent.double() - latent.double().mean(0)
    _, values, vectors = torch.linalg.svd(centred, full_matrices=False)
    vectors = vectors[:k]
    largest = vectors.gather(1, vectors.abs().argmax(1, keepdim=True))
    vectors = vectors.where(largest >= 0, -vectors)
    energy = values.pow(2)
    return centred @ vectors.T, energy[:k] / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)


def typical_activation(latent: Tensor, threshold: float, q: float = 0.9) -> Tensor:
    """Each unit's value when it fires: the q-quantile of its activations above the threshold over the
    inputs, (k,); NaN for a unit never active."""
    return torch.nanquantile(latent.double().where(latent > threshold, torch.nan), q, dim=0)


@torch.no_grad()
def feature_spread(model: Autoencoder, latent: Tensor, threshold: float) -> float | None:
    """How much of the image each latent unit in use draws (the tutorial's "localized patterns" of sparse
    features, measured). For each unit active on some test input, d is what the code with that unit alone
    at its typical value (typical_activation) decodes to less what the zero code does: what the unit adds
    to a picture when it fires (features.png draws it at eval.feature_value, the tutorial's 1 unless told
    typical; through a nonlinear decoder a unit that fires at 7 draws another picture). (sum d^2)^2 /
    (P sum d^4), the participation ratio over the P pixels, is 1/P for a change of one pixel and 1 for
    the same change of every pixel. The mean over those units; None where no unit is in use or none
    changes the picture."""
    typical = typical_activation(latent, threshold)
    used = typical.isfinite().nonzero().flatten()
    if not len(used):
        return None
    device = device_of(model)
    code = torch.zeros(len(used) + 1, latent.shape[1], device=device)
    code[torch.arange(1, len(used) + 1), used] = typical[used].float().to(device)
    with eval_mode(model):
        images = model.decode(code)[0]
    change = (images[1:] - images[:1]).flatten(1).double().pow(2)
    total = change.sum(1)
    drawn = total > 0
    if not drawn.any():
        return None
    return (total[drawn].pow(2) / change[drawn].pow(2).sum(1)).mean().item() / change.shape[1]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 max_samples: int, seed: int) -> float:
    """Test accuracy of a logistic regression fit on (at most max_samples of) the train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_x) > max_samples:
        keep = np.random.default_rng(seed).choice(len(train_x), max_samples, replace=False)
        train_x, train_y = train_x[keep], train_y[keep]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


PIXEL_PROBES: dict[tuple, tuple[weakref.ref, float]] = {}  # (data's ids, settings) -> (its train images, the accuracy)


def pixel_probe(data: Splits, max_samples: int, seed: int) -> float:
    """linear_probe on the raw pixels: a number of the data, not of the model, so fit once per data set
    and settings in a process (the jobs of a stacked sweep share their data: N jobs' ends fit it once)."""
    key = (id(data.train.x), id(data.test.x), max_samples, seed)
    held = PIXEL_PROBES.get(key)
    if held is not None and held[0]() is data.train.x:  # the same images, not a later tensor at that address
        return held[1]
    as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
    accuracy = linear_probe(as_np(data.train.x), as_np(data.train.labels), as_np(data.test.x),
                            as_np(data.test.labels), max_samples, seed)
    PIXEL_PROBES[key] = (weakref.ref(data.train.x), accuracy)
    return accuracy


def analyse(parts: Parts, settings: EvalSettings) -> tuple[dict, dict[str, Tensor]]:
    """All test metrics (flat dict for metrics.json) and the arrays behind the pictures: the test codes,
    each unit's lifetime sparsity and each test image's Jacobian spectrum."""
    model, test, seed, batch = parts.model, parts.data.test, parts.trainer.seed, parts.trainer.batch_size
    metrics = reconstruction(model, test.x, parts.data.image_shape, batch)
    latent = codes(model, test.x, batch)
    found, lifetime = sparsity(latent, settings.threshold)
    metrics.update(found)
    spectrum = jacobian_spectrum(model, test.x, batch)
    metrics["sensitivity"] = sensitivity(spectrum)
    metrics["jacobian_rank"] = jacobian_rank(spectrum)
    spread = feature_spread(model, latent, settings.threshold)
    if spread is not None:
        metrics["feature_spread"] = spread
    for label, corrupt in settings.noise.items():
        noisy = reconstruction(model, test.x, parts.data.image_shape, batch, corrupt, seed)
        metrics[f"mse_{label}"] = noisy["mse"]
        if label.partition("_")[0] == "gaussian" and "score_cos" in noisy:  # gaussian, gaussian_0.3: the score
            metrics[f"score_cos_{label}"] = noisy["score_cos"]
    if settings.probe:
        train = parts.data.train
        as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
        metrics["probe_latent"] = linear_probe(as_np(codes(model, train.x, batch)), as_np(train.labels), as_np(latent),
                                               as_np(test.labels), settings.probe_max_samples, seed)
        metrics["probe_pixels"] = pixel_probe(parts.data, settings.probe_max_samples, seed)
    return metrics, {"latent_activations": latent, "lifetime_sparsity": lifetime, "jacobian_spectrum": spectrum}


@torch.no_grad()
def denoised(model: Autoencoder, x: Tensor, noise: dict[str, Corruption], batch_size: int, seed: int
             ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """The first images of x, clean; for each `noise` entry (eval.noise's, by label), the same images as
    its mse_<label> measured them (the first batch, corrupted from the same seed) and their reconstructions."""
    device = device_of(model)
    first = next(batches(x, batch_size, device))
    shown = {}
    with eval_mode(model):
        for label, corrupt in noise.items():
            noisy = corrupt(first, torch.Generator(device).manual_seed(seed))[:GRID_IMAGES]
            shown[label] = noisy, model(noisy).recon
    return first[:GRID_IMAGES], shown


@torch.no_grad()
def feature_grid(model: Autoencoder, count: int, image_shape: tuple[int, int, int], value: float | Tensor = 1.0
                 ) -> Tensor:
    """Decoded one-hot codes: what each of the first `count` latent units draws (the decoder basis), each
    at `value` (the tutorial's 1), or at its own (a (latent_dim,) tensor, typical_activation's: a unit
    never active, NaN there, is drawn black)."""
    k, device = min(count, model.latent_dim), device_of(model)
    values = torch.as_tensor(value, dtype=torch.float32).expand(model.latent_dim)[:k].to(device)
    fires = values.isfinite()
    code = torch.eye(k, model.latent_dim, device=device) * values.nan_to_num(0.0)[:, None]
    with eval_mode(model):
        images = model.decode(code)[0].view(k, *image_shape).clamp(0, 1)
    return grid(images * fires.view(-1, 1, 1, 1), image_shape, stretch=True)
