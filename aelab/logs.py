"""What a run leaves to look at: TensorBoard scalars, images, histograms, HParams, and PNG files."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from PIL import Image

from .build import GROUPS, EvalSettings, Parts
from .data import Split
from .metrics import GRID_PAD, denoised, feature_grid, grid, image_grid, principal_components, typical_activation
from .runs import SAMPLE_MEASURES, write_whole

HPARAM_GROUPS = (*GROUPS, "trainer")
HISTOGRAMS = ("latent_activations", "lifetime_sparsity")  # the test arrays TensorBoard shows as histograms


def log_terms(writer: SummaryWriter, prefix: str, terms: dict[str, float], step: int) -> None:
    for name, value in terms.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)


def hparam_values(cfg: DictConfig) -> dict:
    """Every scalar setting of the run's groups, flattened (`reg.weight`), lists as text."""
    flat = {}
    for group in HPARAM_GROUPS:
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            flat[f"{group}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_hparams(writer: SummaryWriter, cfg: DictConfig, metrics: dict[str, float], step: int) -> None:
    """HParams dashboard entry in the run's own directory (SummaryWriter.add_hparams would make a sub-run)."""
    scalars = {f"hparams/{name}": value for name, value in metrics.items()}
    exp, ssi, sei = hparams(hparam_values(cfg), scalars)
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)


def pyplot():
    """matplotlib without a display, and without its INFO chatter in the run log."""
    import logging

    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt
    return plt


def histogram_png(arrays: dict[str, Tensor], path: Path, threshold: float) -> None:
    """Latent activations, lifetime sparsity per unit and the encoder Jacobian's singular values."""
    plt = pyplot()

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    left.hist(arrays["latent_activations"].flatten().cpu().numpy(), bins=60, color="tab:blue")
    left.axvline(threshold, color="tab:red", linestyle="--", label=f"active threshold {threshold:g}")
    left.set(xlabel="latent activation", ylabel="count (test samples x units)", title="Latent activations")
    left.legend()
    middle.hist(arrays["lifetime_sparsity"].cpu().numpy(), bins=20, range=(0, 1), color="tab:green")
    middle.set(xlabel="fraction of test samples a unit is active on", ylabel="units",
               title="Lifetime sparsity per unit")
    spectrum = arrays["jacobian_spectrum"].double().cpu()
    index = range(1, spectrum.shape[1] + 1)
    low, high = spectrum.quantile(0.1, dim=0).numpy(), spectrum.quantile(0.9, dim=0).numpy()
    right.fill_between(index, low, high, color="tab:purple", alpha=0.25, label="10-90% of test images")
    right.plot(index, spectrum.mean(0).numpy(), color="tab:purple", label="mean")
    right.set_yscale("log")
    right.set(xlabel="singular value, largest first", ylabel="singular value of J_f(x)",
              title="Encoder Jacobian spectrum")
    right.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG file, written whole (runs.write_whole), then closed."""
    try:
        write_whole(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)


def label_rows(ax, height: int, labels: list[str], fontsize: float) -> None:
    """Name each row of images of a metrics.grid picture `height` pixels tall, shown on `ax`, at its
    left; no frame, no other ticks."""
    row = (height - GRID_PAD) / len(labels)  # a row's images and the margin above them
    ax.set_yticks([i * row + GRID_PAD + (row - GRID_PAD) / 2 - 0.5 for i in range(len(labels))], labels,
                  fontsize=fontsize)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def labelled(picture: Tensor, labels: list[str]) -> Tensor:
    """A metrics.grid picture of len(labels) rows of images, with each row's label to its left, drawn
    at a readable size: (3, H, W) in [0, 1]."""
    plt = pyplot()
    _, height, width = picture.shape
    scale = max(1, round(480 / width))  # screen pixels per image pixel
    margin = 7 * max(map(len, labels)) + 16  # the labels' width, in screen pixels (fontsize 9 at 100 dpi)
    fig = plt.figure(figsize=((width * scale + margin) / 100, height * scale / 100), dpi=100)
    ax = fig.add_axes((margin / (width * scale + margin), 0, width * scale / (width * scale + margin), 1))
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
    plt = pyplot()
    points, share = (t.cpu() for t in principal_components(latent))
    across = points[:, 1] if points.shape[1] > 1 else torch.zeros(len(points), dtype=points.dtype)
    labels = labels.cpu()
    size = min(16, max(3, 3000 / len(labels)))  # dots that neither vanish in a few hundred nor blot out thousands
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
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
    fig.tight_layout()
    return figure_pixels(fig)


def log_embedding(writer: SummaryWriter, latent: Tensor, test: Split, shape: tuple[int, int, int], step: int) -> None:
    """The test codes in TensorBoard's Projector tab (PCA, t-SNE, UMAP of them there), each labelled by
    its class and shown as its image. Written again at the same step (a re-evaluated run), it replaces
    the earlier one."""
    import shutil
    shutil.rmtree(Path(writer.log_dir) / f"{step:05d}", ignore_errors=True)  # the step's embedding folder
    writer.add_embedding(latent.float().cpu(), metadata=[str(label) for label in test.labels.tolist()],
                         label_img=test.x.float().cpu().view(-1, *shape), global_step=step, tag="test/latent")


def denoising_picture(parts: Parts, settings: EvalSettings, test: dict[str, float]) -> Tensor | None:
    """The first clean test images; below, each eval.noise entry's corrupted versions of them (the inputs
    its mse_<label> measured), each above the model's output, labelled with that test MSE. None without
    eval.noise."""
    if not settings.noise:
        return None
    clean, shown = denoised(parts, settings)
    rows, labels = [clean], [f"clean (test MSE {test['mse']:.4f})"]
    for label, (noisy, recon) in shown.items():
        rows += [noisy, recon]
        labels += [settings.noise_settings[label], f"output (test MSE {test[f'mse_{label}']:.4f})"]
    return labelled(grid(torch.cat(rows).clamp(0, 1), parts.data.image_shape, columns=len(clean)), labels)


def features_picture(parts: Parts, settings: EvalSettings, arrays: dict[str, Tensor]) -> Tensor:
    """features.png: the first eval.features units decoded alone at eval.feature_value, or each at its
    typical value on the test codes (`arrays`)."""
    value = settings.feature_value
    if value == "typical":
        value = typical_activation(arrays["latent_activations"], settings.threshold).float()
    return feature_grid(parts, settings.features, value)


def save_pictures(parts: Parts, settings: EvalSettings, test: dict[str, float], arrays: dict[str, Tensor],
                  run_dir: Path) -> dict[str, Tensor]:
    """Reconstruction grid, decoded features, the test codes' layout, each test noise's inputs and outputs
    and the histograms as PNG files; the pictures, for TensorBoard."""
    grids = {"reconstructions": image_grid(parts, parts.data.test.x), "features": features_picture(parts, settings, arrays),
             "latents": latent_picture(arrays["latent_activations"], parts.data.test.labels)}
    noisy = denoising_picture(parts, settings, test)
    if noisy is not None:
        grids["denoising"] = noisy
    for name, picture in grids.items():
        save_png(picture, run_dir / f"{name}.png")
    histogram_png(arrays, run_dir / "histograms.png", settings.threshold)
    return grids


def log_final(writer: SummaryWriter, cfg: DictConfig, parts: Parts, metrics: dict[str, dict[str, float]],
              grids: dict[str, Tensor], arrays: dict[str, Tensor], step: int) -> None:
    """A run's final TensorBoard entries, all at its last step, then the writer closed: written in one
    go after everything slow is done, so that a stop cannot leave some of them to be written twice."""
    for split, values in metrics.items():
        log_terms(writer, f"final_{split}", values, step)
    for name, picture in grids.items():
        writer.add_image(f"test/{name}", picture, step)
    for name in HISTOGRAMS:
        writer.add_histogram(f"test/{name}", arrays[name].float().cpu(), step)
    shown = min(parts.evaluation.projector, len(parts.data.test))
    if shown:
        test = parts.data.test
        log_embedding(writer, arrays["latent_activations"][:shown], Split(test.x[:shown], test.labels[:shown]),
                      parts.data.image_shape, step)
    test = metrics["test"]
    log_hparams(writer, cfg, {"val_total": metrics["val"]["total"], **{f"test_{k}": v for k, v in test.items()}}, step)
    writer.close()


def config_text(cfg: DictConfig) -> str:
    """The resolved config as a TensorBoard markdown code block."""
    return "    " + OmegaConf.to_yaml(cfg, resolve=True).replace("\n", "\n    ")


def save_png(picture: Tensor, path: Path) -> None:
    """A (3, H, W) picture in [0, 1] as an 8-bit PNG, rounded to the nearest level."""
    pixels = picture.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    write_whole(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def log_sample(folder: Path, rows: list[dict], yardstick: dict, states: dict[int, Tensor],
               shape: tuple[int, int, int], title: str) -> None:
    """`aelab sample`'s chains as a TensorBoard run of their own, in a folder of the trained run: each
    measure against the chain's step (`sample/*`; the test images' as a flat line, `test_images/*`),
    every chain's state at each recorded step as one image (`sample/chains`), the step's formula as
    text. The same settings draw the same chains (a fixed seed), so a rerun replaces the folder's
    earlier events: the new ones are written whole first, the earlier removed after."""
    earlier = list(folder.glob("events.out.tfevents.*"))
    writer = SummaryWriter(str(folder))
    writer.add_text("sample/settings", title, 0)
    for row in rows:
        for name in ("sigma", *SAMPLE_MEASURES):  # sigma: annealed Langevin's, at each step
            if row.get(name) is not None:
                writer.add_scalar(f"sample/{name}", row[name], row["step"])
    for step in (rows[0]["step"], rows[-1]["step"]):
        for name in SAMPLE_MEASURES:
            if name in yardstick:
                writer.add_scalar(f"test_images/{name}", yardstick[name], step)
    for step, images in states.items():
        writer.add_image("sample/chains", grid(images, shape), step)
    writer.close()
    for path in earlier:
        path.unlink()
