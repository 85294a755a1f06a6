"""A run's pictures, as PNG files in its dir and images for TensorBoard: reconstructions, the decoded
features, the test codes' layout, each test noise's inputs and outputs, and the histograms."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..build import EvalSettings, Parts
from ..runs import write_whole
from ..training.monitor import grid, image_grid, square
from .figures import kept_figure, label_rows, pyplot, save_figure
from .metrics import denoised, feature_grid, principal_components, typical_activation


def histogram_figure():
    """histograms.png's figure: three panels, the right one's scale logarithmic, fixed margins (tight_layout's:
    it measured every label's extent each time, 0.4 s of a digits run's end)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    fig.subplots(1, 3)[2].set_yscale("log")
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.92, wspace=0.22)
    return fig


def histogram_png(arrays: dict[str, Tensor], path: Path, threshold: float) -> None:
    """Latent activations, lifetime sparsity per unit and the encoder Jacobian's singular values."""
    fig = kept_figure("histograms", histogram_figure)
    left, middle, right = fig.axes
    left.hist(arrays["latent_activations"].flatten().cpu().numpy(), bins=60, color="tab:blue", histtype="stepfilled")
    left.axvline(threshold, color="tab:red", linestyle="--", label=f"active threshold {threshold:g}")
    left.set(xlabel="latent activation", ylabel="count (test samples x units)", title="Latent activations")
    left.legend()
    middle.hist(arrays["lifetime_sparsity"].cpu().numpy(), bins=20, range=(0, 1), color="tab:green",
                histtype="stepfilled")  # one polygon, not a patch per bar: a quarter of the picture's time
    middle.set(xlabel="fraction of test samples a unit is active on", ylabel="units",
               title="Lifetime sparsity per unit")
    spectrum = arrays["jacobian_spectrum"].double().cpu()
    index = range(1, spectrum.shape[1] + 1)
    low, high = spectrum.quantile(0.1, dim=0).numpy(), spectrum.quantile(0.9, dim=0).numpy()
    right.fill_between(index, low, high, color="tab:purple", alpha=0.25, label="10-90% of test images")
    right.plot(index, spectrum.mean(0).numpy(), color="tab:purple", label="mean")
    right.set(xlabel="singular value, largest first", ylabel="singular value of J_f(x)",
              title="Encoder Jacobian spectrum")
    right.legend()
    save_figure(fig, path, dpi=100)


def labelled(picture: Tensor, labels: list[str]) -> Tensor:
    """A metrics.grid picture of len(labels) rows of images, with each row's label to its left, drawn
    at a readable size: (3, H, W) in [0, 1]."""
    _, height, width = picture.shape
    scale = max(1, round(480 / width))  # screen pixels per image pixel
    margin = 7 * max(map(len, labels)) + 16  # the labels' width, in screen pixels (fontsize 9 at 100 dpi)

    def make():
        from matplotlib.figure import Figure

        fig = Figure(figsize=((width * scale + margin) / 100, height * scale / 100), dpi=100)
        fig.add_axes((margin / (width * scale + margin), 0, width * scale / (width * scale + margin), 1))
        return fig

    fig = kept_figure(f"labelled {width}x{height}+{margin}", make)
    ax = fig.axes[0]
    ax.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
    label_rows(ax, height, labels, fontsize=9)
    return figure_pixels(fig)


def figure_pixels(fig) -> Tensor:
    """A matplotlib figure as a (3, H, W) picture in [0, 1] (what save_png and TensorBoard take), closed."""
    import numpy as np
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


def latent_picture(latent: Tensor, labels: Tensor) -> Tensor:
    """The test codes on their two leading principal components, one colour per class: how the code
    space lays out the digits (a 1-unit code along one axis)."""
    points, share = (t.cpu() for t in principal_components(latent))
    across = points[:, 1] if points.shape[1] > 1 else torch.zeros(len(points), dtype=points.dtype)
    labels = labels.cpu()
    size = min(16, max(3, 3000 / len(labels)))  # dots that neither vanish in a few hundred nor blot out thousands
    fig = kept_figure("latents", latent_figure)
    ax = fig.axes[0]
    for number, label in enumerate(labels.unique().tolist()):
        mine = labels == label
        ax.scatter(points[mine, 0].numpy(), across[mine].numpy(), s=size, alpha=0.7, linewidths=0,
                   color=f"C{number % 10}", marker="os^v"[number // 10 % 4], label=str(label))
    if share.sum() == 0:  # every unit dead, say: nothing to lay out
        ax.set_xlabel("principal component 1 (none: every test code is the same)")
    else:
        ax.set_xlabel(f"principal component 1 ({share[0]:.0%} of the code variance)")
    ax.set_ylabel(f"principal component 2 ({share[1]:.0%})" if len(share) > 1 else "(a code of one unit)")
    ax.set_title(f"{len(labels)} test codes ({latent.shape[1]} units), by class", fontsize=10)
    ax.legend(title="class", fontsize=7, title_fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1, 0.5))
    return figure_pixels(fig)


def latent_figure():
    """latents.png's figure: one panel, its margins fixed (tight_layout's, measured)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), dpi=100)
    fig.add_subplot()
    fig.subplots_adjust(left=0.13, right=0.84, bottom=0.11, top=0.93)
    return fig


def denoising_picture(parts: Parts, settings: EvalSettings, test: dict[str, float]) -> Tensor | None:
    """The first clean test images; below, each eval.noise entry's corrupted versions of them (the inputs
    its mse_<label> measured), each above the model's output, labelled with that test MSE. None without
    eval.noise."""
    if not settings.noise:
        return None
    clean, shown = denoised(parts.model, parts.data.test.x, settings.noise, parts.trainer.batch_size,
                            parts.trainer.seed)
    rows, labels = [clean], [f"clean (test MSE {test['mse']:.4f})"]
    for label, (noisy, recon) in shown.items():
        rows += [noisy, recon]
        labels += [settings.noise_settings[label], f"output (test MSE {test[f'mse_{label}']:.4f})"]
    return labelled(grid(torch.cat(rows).clamp(0, 1), parts.data.image_shape, columns=len(clean)), labels)


def features_picture(parts: Parts, settings: EvalSettings, arrays: dict[str, Tensor]) -> Tensor:
    """features.png: the first eval.features units decoded alone at eval.feature_value, or each at its
    typical value on the test codes (`arrays`)."""
    value = settings.feature_value
    if settings.typical_features:
        value = typical_activation(arrays["latent_activations"], settings.threshold).float()
    return feature_grid(parts.model, settings.features, parts.data.image_shape, value)


def features_png(parts: Parts, settings: EvalSettings, arrays: dict[str, Tensor]) -> Tensor:
    """features.png as a person opens it: features_picture drawn large, each row named by its units."""
    picture = features_picture(parts, settings, arrays)
    count = min(settings.features, parts.model.latent_dim)
    across = square(count)  # as feature_grid lays them out
    return labelled(picture, [f"units {first + 1}-{min(first + across, count)}" for first in range(0, count, across)])


def reconstructions_png(parts: Parts) -> Tensor:
    """reconstructions.png: the first test images, clean, as the model's input (corrupted as in training,
    a fixed seed) and its output, drawn large with each row named."""
    shown = image_grid(parts.model, parts.data.test.x, parts.corruption, parts.data.image_shape, parts.trainer.seed)
    return labelled(shown, ["clean", "input", "output"])


def save_pictures(parts: Parts, settings: EvalSettings, test: dict[str, float], arrays: dict[str, Tensor],
                  run_dir: Path) -> dict[str, Tensor]:
    """Reconstructions, decoded features, the test codes' layout, each test noise's inputs and outputs
    and the histograms as PNG files; the pictures, for TensorBoard."""
    grids = {"reconstructions": reconstructions_png(parts), "features": features_png(parts, settings, arrays),
             "latents": latent_picture(arrays["latent_activations"], parts.data.test.labels)}
    noisy = denoising_picture(parts, settings, test)
    if noisy is not None:
        grids["denoising"] = noisy
    for name, picture in grids.items():
        save_png(picture, run_dir / f"{name}.png")
    histogram_png(arrays, run_dir / "histograms.png", settings.threshold)
    return grids


def save_png(picture: Tensor, path: Path) -> None:
    """A (3, H, W) picture in [0, 1] as an 8-bit PNG, rounded to the nearest level."""
    pixels = picture.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    write_whole(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
