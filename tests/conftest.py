"""Shared fixtures: Hydra-composed configs, the CLI in process (and in a fresh one), and MNIST-layout data roots."""
from __future__ import annotations

import gzip
import io
import shutil
import logging
import os
import struct
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
# The small test preset: one epoch, no probes, no projector, few features drawn (what a test asserts
# about those is asserted where it runs them).
FAST = ["trainer.epochs=1", "trainer.batch_size=64", "device=cpu", "eval.probe=false", "eval.projector=0",
        "eval.features=16"]


@pytest.fixture
def make_cfg():
    """compose(overrides) → the same DictConfig `aelab train` would get."""
    def make(*overrides: str):
        with initialize_config_module("aelab.configs", version_base="1.3"):
            return compose("train", overrides=list(overrides))
    return make


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`aelab ARGS` as a user types it, through the console script's entry point in this process (a
    cold process pays seconds of imports): chdir to cwd, stdout and stderr captured, the exit code
    as a process would give it. `run_process` is the same in a fresh process, for the few tests that
    need one (signals, installs)."""
    from aelab.cli.main import main

    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv[:], os.getcwd()
    root, handlers = logging.getLogger(), logging.getLogger().handlers[:]
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
        sys.argv[:] = argv
        for handler in set(root.handlers) - set(handlers):  # Hydra's job log: the run's train.log, our stdout
            root.removeHandler(handler)
            handler.close()
    proc = subprocess.CompletedProcess(["aelab", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"aelab {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli(capfd, *argv):
    """`aelab ARGV` through the console script's entry point in this process, read with pytest's capfd:
    (exit code, stdout, stderr)."""
    from aelab.cli.main import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def run_process(*args: str, cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`aelab ARGS` in a fresh process, as the console script runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "aelab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"aelab {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def events(run_dir: Path):
    """The TensorBoard entries of one run's folder (its own event files, not its subfolders')."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file (MNIST's format): magic 0x0803 / 0x0801 for uint8 images / labels, then big-endian dims."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def read_idx_gz(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def torchvision_root(root: Path, folder: str, images: np.ndarray, labels: np.ndarray, n_train: int) -> Path:
    """A torchvision-layout root: ROOT/FOLDER/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train:])
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Small random 28x28 images in MNIST, FashionMNIST and KMNIST layout (400 train, 100 test)."""
    root = tmp_path_factory.mktemp("tv")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=500, dtype=np.uint8)
    for folder in ("MNIST", "FashionMNIST", "KMNIST"):
        torchvision_root(root, folder, images, labels, 400)
    return root


@pytest.fixture(scope="session")
def real_mnist_root(tmp_path_factory) -> Path:
    """The real MNIST test set, split 8,000 / 2,000 into a torchvision-layout root; skips without it."""
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"{SHARED_MNIST} is absent")
    images = read_idx_gz(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx_gz(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    return torchvision_root(tmp_path_factory.mktemp("mnist"), "MNIST", images, labels, 8000)


def copied(source: Path, tmp_path_factory) -> Path:
    """A copy of a shared trained run or sweep, for a test that writes into it: the shared one stays as
    trained, so no test's result depends on which tests ran before it."""
    copy = tmp_path_factory.mktemp("copy") / source.name
    shutil.copytree(source, copy)
    return copy


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Trained once per test session with the FAST preset: one finished run. Read it, or take the
    `run_copy` fixture's copy to write into it."""
    root = tmp_path_factory.mktemp("trained_run")
    run_cli("train", *FAST, f"hydra.run.dir={root / 'run'}", cwd=root)
    return root / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path_factory) -> Path:
    """This test's own copy of the session's trained_run."""
    return copied(trained_run, tmp_path_factory)


@pytest.fixture(scope="session")
def l1_seed_sweep(tmp_path_factory) -> Path:
    """Trained once per test session: reg=l1 at two weights x two seeds, 2 epochs (4 jobs, 2 settings),
    as one stacked model (launcher=stacked; the tests that read it read its jobs as any sweep's). Read
    it, or take the `sweep` fixture's copy to write into it."""
    root = tmp_path_factory.mktemp("l1_seed_sweep")
    run_cli("train", "-m", "launcher=stacked", "reg=l1", "reg.weight=1e-3,1e-1", "trainer.seed=0,1", "trainer.epochs=2",
            "device=cpu", "eval.probe_max_samples=300", f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    return root / "sweep"


@pytest.fixture
def sweep(l1_seed_sweep, tmp_path_factory) -> Path:
    """This test's own copy of the session's l1_seed_sweep."""
    return copied(l1_seed_sweep, tmp_path_factory)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def signal_at_step(monkeypatch, n: int, sig: int) -> None:
    """The training loop's steps send `sig` to this process right after step n (counted from this call):
    a stop that lands mid-epoch, at a step the test knows."""
    import os

    from aelab.training import loop
    real, taken = loop.make_step, []

    def stepping(*args, **kwargs):
        step = real(*args, **kwargs)

        def counted(clean):
            step(clean)
            taken.append(1)
            if len(taken) == n:
                os.kill(os.getpid(), sig)
        return counted
    monkeypatch.setattr(loop, "make_step", stepping)
