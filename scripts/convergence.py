"""Do aelab's default runs train to the end, and how good are they? The evidence for its defaults.

    python scripts/convergence.py                       # the default run on digits and on MNIST
    python scripts/convergence.py --data digits -- sched=none trainer.patience=null trainer.epochs=300
    python scripts/convergence.py --json convergence.json

Each case is one `aelab train` (in a fresh process, timed end to end on this machine) with the given
overrides on top of the defaults, then its test MSE beside PCA's with k = 8, 32 and the model's latent
size, fitted on the same training split (a linear autoencoder's best). MNIST is the real MNIST test
set from shared/data/mnist-t10k (beside or inside the checkout), split as issue 31 states: the first
8,000 images for training (10% of them for validation), the last 2,000 for test. Prints epochs
trained, the best epoch, whether the run converged (metrics.json's verdict), test MSE, PCA's, and
seconds.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
MNIST_PLACES = [HERE.parent / "shared" / "data" / "mnist-t10k", HERE / "shared" / "data" / "mnist-t10k"]
TRAIN_IMAGES = 8000


def read_idx_gz(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def mnist_root(folder: Path) -> Path | None:
    """The t10k file split 8,000 / 2,000 into a torchvision-layout root; None where it is absent."""
    source = next((p for p in MNIST_PLACES if p.is_dir()), None)
    if source is None:
        return None
    images = read_idx_gz(source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx_gz(source / "t10k-labels-idx1-ubyte.gz")
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", slice(None, TRAIN_IMAGES)), ("t10k", slice(TRAIN_IMAGES, None))):
        write_idx(raw / f"{split}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[part])
    return folder


def pca_mse(train: np.ndarray, test: np.ndarray, k: int) -> float:
    """Test MSE per element of PCA with k components fitted on `train`."""
    from sklearn.decomposition import PCA
    pca = PCA(n_components=k, random_state=0).fit(train)
    return float(np.mean((pca.inverse_transform(pca.transform(test)) - test) ** 2))


def splits(data_args: list[str]):
    """The training and test images of the run's data, as aelab splits them."""
    from hydra import compose, initialize_config_module

    from aelab.build import build_part
    from aelab.data import DATASETS
    with initialize_config_module("aelab.configs", version_base="1.3"):
        cfg = compose("train", overrides=data_args)
    data = build_part("data", DATASETS, cfg.data)
    return data.train.x.numpy(), data.test.x.numpy(), cfg.model.latent_dim


def case(name: str, data_args: list[str], extra: list[str], out: Path) -> dict:
    run_dir = out / name
    command = [sys.executable, "-m", "aelab", "train", *data_args, *extra, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    record = json.loads((run_dir / "metrics.json").read_text())
    train, test, latent = splits(data_args)
    pca = {k: pca_mse(train, test, k) for k in sorted({8, 32, latent})}
    return {"case": name, "overrides": " ".join([*data_args, *extra]), "epochs_trained": record["epochs_trained"],
            "best_epoch": record["best_epoch"], "converged": record["converged"], "test_mse": record["test"]["mse"],
            "probe_latent": record["test"].get("probe_latent"), **{f"pca{k}_mse": v for k, v in pca.items()},
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["digits", "mnist", "both"], default="both")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="aelab train overrides for every case (after --)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.data in ("digits", "both"):
            rows.append(case("digits", ["data=digits"], args.overrides, out))
        if args.data in ("mnist", "both"):
            root = mnist_root(out / "mnist")
            if root is None:
                print("MNIST: shared/data/mnist-t10k is absent; skipped")
            else:
                rows.append(case("mnist", ["data=mnist", f"data.root={root}"], args.overrides, out))
    for row in rows:
        pcas = "  ".join(f"PCA-{k[3:-4]} {v:.5f}" for k, v in row.items() if k.startswith("pca"))
        print(f"{row['case']}: {row['epochs_trained']} epochs (best {row['best_epoch']}, converged "
              f"{row['converged']}), test MSE {row['test_mse']:.5f} ({pcas}), probe {row['probe_latent']}, "
              f"{row['seconds']} s   [{row['overrides']}]")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
