"""On real MNIST (skipped without ../shared/data/mnist-t10k): what the seed says each objective does."""
import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow  # minutes of training on 8,000 images


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


def test_denoising_chains_keep_moving_where_plain_ones_reach_fixed_points(real_mnist_root, tmp_path):
    """`aelab sample`, Part 4's score connection: corrupt-and-denoise chains from random pixels. The
    denoising model's chains keep moving, each step as large as the last; the plain model's chain,
    x <- f(x), runs every start to a fixed point. Which digits the chains settle on, and how many, depends
    on the trained model, not on the objective: over training seeds 0-3 (2026-12-01, CPU) the denoising
    chains covered 2-7 classes at step 200 and the plain chains' fixed points 1-3, so that is not asserted."""
    chains = {}
    for name, overrides in {"plain": [], "dae": ["corruption=gaussian", "corruption.noise_factor=0.3"]}.items():
        train(tmp_path, real_mnist_root, name, "trainer.epochs=10", *overrides)
        run_cli("sample", str(tmp_path / name), "sample.steps=200", cwd=tmp_path)
        record = json.loads((tmp_path / name / "sample_sample.steps=200.json").read_text())["chain"]
        chains[name] = {row["step"]: row for row in record}
    plain, dae = chains["plain"], chains["dae"]
    assert plain[200]["change"] < 1e-6 and plain[200]["change"] < plain[50]["change"] / 10  # converging
    assert dae[200]["change"] > 1e-4 and dae[200]["change"] > dae[50]["change"] / 3  # still moving, as much
    assert dae[200]["change"] > 1000 * plain[200]["change"]  # seeds 0-3: 4.7e4 to 3.5e14
    run_cli("sample", str(tmp_path / "dae"), "sample.method=langevin", cwd=tmp_path)
    langevin = json.loads((tmp_path / "dae" / "sample_sample.method=langevin.json").read_text())["chain"][-1]
    # Langevin along the score does not collapse onto one kind of image either (3-6 classes at step 50 over
    # seeds 0-3), but its states are denoised noisy images: fainter than the chain's (0.20-0.47 of its sharpness)
    assert langevin["classes"] >= 2
    assert langevin["sharpness"] < 0.7 * dae[50]["sharpness"]
