"""On real MNIST (skipped without ../shared/data/mnist-t10k): what the seed says each objective does."""
import json

import pytest

from conftest import run_cli


def train(tmp_path, root, name, *overrides):
    run_dir = tmp_path / name
    run_cli("train", "data=mnist", f"paths.data={root}", "device=cpu", "eval.probe=false", *overrides,
            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    return json.loads((run_dir / "metrics.json").read_text())["test"]


def test_kl_mean_activation_lands_near_rho(real_mnist_root, tmp_path):
    test = train(tmp_path, real_mnist_root, "kl", "model=sparse_kl", "reg=kl", "reg.rho=0.05", "trainer.epochs=5")
    assert test["mean_activation"] == pytest.approx(0.05, abs=0.025)
    assert test["population_sparsity"] < 0.2  # most units quiet on most digits


def test_denoising_model_beats_plain_model_on_noisy_inputs(real_mnist_root, tmp_path):
    common = ["trainer.epochs=6", "trainer.batch_size=64", "eval.noise.gaussian.noise_factor=0.4"]
    plain = train(tmp_path, real_mnist_root, "plain", *common)
    denoising = train(tmp_path, real_mnist_root, "denoising", "corruption=gaussian", "corruption.noise_factor=0.4",
                      *common)
    assert denoising["mse_gaussian"] < 0.9 * plain["mse_gaussian"]
    assert plain["mse"] < denoising["mse"]  # the price: clean inputs reconstruct less well


def test_mae_reconstructs_sharper_than_mse(real_mnist_root, tmp_path):
    """Exercise 1's question, which loss gives the sharpest outputs: MAE (a median, where MSE averages
    the plausible strokes into a blur), at the price of a higher squared error."""
    mse = train(tmp_path, real_mnist_root, "mse", "loss=mse", "trainer.epochs=3")
    mae = train(tmp_path, real_mnist_root, "mae", "loss=mae", "trainer.epochs=3")
    assert mae["sharpness"] > 2 * mse["sharpness"]
    assert mse["mse"] < mae["mse"]


def test_denoising_chains_find_several_digits_where_plain_ones_collapse(real_mnist_root, tmp_path):
    """`aelab sample`, Part 4's score connection: corrupt-and-denoise chains from random pixels. The
    denoising model's chains keep moving and spread over several digits; the plain model's chain, x <- f(x),
    runs every start to one fixed point."""
    last = {}
    for name, overrides in {"plain": [], "dae": ["corruption=gaussian", "corruption.noise_factor=0.3"]}.items():
        train(tmp_path, real_mnist_root, name, "trainer.epochs=10", *overrides)
        run_cli("sample", str(tmp_path / name), cwd=tmp_path)
        last[name] = json.loads((tmp_path / name / "sample.json").read_text())["chain"][-1]
    assert last["dae"]["classes"] >= 4 and last["dae"]["top_share"] < 0.7
    assert last["plain"]["top_share"] >= 0.9
    assert last["dae"]["change"] > 100 * last["plain"]["change"]
    run_cli("sample", str(tmp_path / "dae"), "sample.method=langevin", cwd=tmp_path)
    langevin = json.loads((tmp_path / "dae" / "sample_sample.method=langevin.json").read_text())["chain"][-1]
    assert langevin["classes"] >= 4  # Langevin along the score also finds several digits, but its states are
    assert langevin["sharpness"] < 0.7 * last["dae"]["sharpness"]  # denoised noisy images: fainter than the chain's
