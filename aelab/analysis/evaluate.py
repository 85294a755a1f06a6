"""The test split measured: at the end of a run, and again by `aelab eval RUN_DIR` on a trained model."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .. import console
from ..build import EvalSettings, Parts, build, run_config
from ..runs import output_name, write_json
from ..training import checkpoint
from ..training.objective import evaluate
from .metrics import analyse
from .pictures import denoising_picture, features_png, save_pictures, save_png


def test_split(parts: Parts) -> tuple[dict, dict]:
    """The training objective and every metric of metrics.analyse on the test split."""
    found, arrays = analyse(parts, parts.evaluation)
    return {**evaluate(parts, parts.data.test.x), **found}, arrays


def finish(parts: Parts, run_dir: Path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """The final objective on every split and the test metrics, with the PNG files written: (metrics
    by split, picture grids, test arrays). The slow part of a run's end: it writes nothing to TensorBoard."""
    test, arrays = test_split(parts)
    metrics = {"train": evaluate(parts, parts.data.train.x), "val": evaluate(parts, parts.data.val.x), "test": test}
    return metrics, save_pictures(parts, parts.evaluation, test, arrays, run_dir), arrays


def redraws_features(overrides: list[str], settings: EvalSettings) -> bool:
    """Whether `aelab eval` overrides draw another features.png: they set which units or the value they
    are drawn at, or the threshold the typical value is measured above."""
    keys = {override.partition("=")[0] for override in overrides}
    return bool(keys & {"eval.features", "eval.feature_value"}) or (
        "eval.threshold" in keys and settings.typical_features)


def evaluate_run(run_dir: Path, overrides: list[str]) -> dict:
    """`aelab eval`: reload a run's checkpoint, recompute the test metrics, print and save them."""
    cfg = run_config(run_dir, overrides)
    parts = build(cfg)
    checkpoint.load(parts, run_dir, "RUN_DIR", "evaluate another run, or train this one again", model_only=True)
    test, arrays = test_split(parts)
    stem = output_name("eval", overrides)
    written = [run_dir / f"{stem}.json"]
    write_json(written[0], {"overrides": overrides, "test": test})
    pictures = {"denoising": denoising_picture(parts, parts.evaluation, test)}
    if redraws_features(overrides, parts.evaluation):
        pictures["features"] = features_png(parts, parts.evaluation, arrays)
    for name, picture in pictures.items():
        if picture is not None:
            written.append(run_dir / f"{stem}_{name}.png")
            save_png(picture, written[-1])
    console.metrics_table(test, title=f"aelab eval: {run_dir}")
    console.console.print(f"wrote {', '.join(path.name for path in written)} in {run_dir}", markup=False,
                          highlight=False, soft_wrap=True)
    return test
