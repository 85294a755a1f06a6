"""What a run writes to TensorBoard at its end: the final metrics, its pictures and histograms, the
HParams entry, the test codes for the Projector; and `aelab sample`'s chains as a run of their own."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from ..build import GROUPS, Parts
from ..data import Split
from ..runs import SAMPLE_MEASURES
from ..training.monitor import grid

HPARAM_GROUPS = (*GROUPS, "trainer")
HISTOGRAMS = ("latent_activations", "lifetime_sparsity")  # the test arrays TensorBoard shows as histograms
# TensorBoard's Time Series sorts the groups of tags (the part before the first '/') by name and opens the
# first two: the end of a run's entries go in groups named to sort after train/ and val/, the curves
FINAL, PICTURES = "~final", "~test"
MAIN_METRICS = ("val_recon", "test_recon", "test_mse", "test_probe_latent", "test_population_sparsity")


def hparam_values(cfg: DictConfig) -> dict:
    """Every scalar setting of the run's groups, flattened (`reg.weight`), lists as text."""
    flat = {}
    for group in HPARAM_GROUPS:
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            flat[f"{group}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_hparams(writer: SummaryWriter, cfg: DictConfig, metrics: dict[str, float], step: int,
                varied: list[str] = ()) -> None:
    """HParams dashboard entry in the run's own directory (SummaryWriter.add_hparams would make a sub-run).
    The dashboard shows the first five hparams, those marked `differs` first (the keys the sweep varies,
    `varied`), and the first five metrics (MAIN_METRICS, each under its own name)."""
    metrics = {**{name: metrics[name] for name in MAIN_METRICS if name in metrics}, **metrics}
    scalars = {f"{FINAL}/{name}": value for name, value in metrics.items()}
    exp, ssi, sei = hparams(hparam_values(cfg), scalars)
    entry = exp.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(entry.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in varied
    for info in data.experiment.metric_infos:
        info.display_name = info.name.tag.removeprefix(f"{FINAL}/")
    entry.content = data.SerializeToString()
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)


def log_embedding(writer: SummaryWriter, latent: Tensor, test: Split, shape: tuple[int, int, int], step: int) -> None:
    """The test codes in TensorBoard's Projector tab (PCA, t-SNE, UMAP of them there), each labelled by
    its class and shown as its image. Written again at the same step (a re-evaluated run), it replaces
    the earlier one."""
    import shutil
    shutil.rmtree(Path(writer.log_dir) / f"{step:05d}", ignore_errors=True)  # the step's embedding folder
    writer.add_embedding(latent.float().cpu(), metadata=[str(label) for label in test.labels.tolist()],
                         label_img=test.x.float().cpu().view(-1, *shape), global_step=step, tag="test/latent")


def log_final(writer: SummaryWriter, cfg: DictConfig, parts: Parts, metrics: dict[str, dict[str, float]],
              grids: dict[str, Tensor], arrays: dict[str, Tensor], step: int, varied: list[str] = ()) -> None:
    """A run's final TensorBoard entries, all at its last step, then the writer closed: written in one
    go after everything slow is done, so that a stop cannot leave some of them to be written twice.
    The final values are the HParams metrics (`~final/val_total`, `~final/test_mse`, ...)."""
    for name, picture in grids.items():
        writer.add_image(f"{PICTURES}/{name}", picture, step)
    for name in HISTOGRAMS:
        writer.add_histogram(f"{PICTURES}/{name}", arrays[name].float().cpu(), step)
    shown = min(parts.evaluation.projector, len(parts.data.test))
    if shown:
        test = parts.data.test
        log_embedding(writer, arrays["latent_activations"][:shown], Split(test.x[:shown], test.labels[:shown]),
                      parts.data.image_shape, step)
    final = {f"{split}_{name}": value for split in ("val", "test") for name, value in metrics[split].items()}
    log_hparams(writer, cfg, final, step, varied)
    writer.close()


def config_text(cfg: DictConfig) -> str:
    """The resolved config as a TensorBoard markdown code block."""
    return "    " + OmegaConf.to_yaml(cfg, resolve=True).replace("\n", "\n    ")


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
