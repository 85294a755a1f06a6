"""`aelab sample`: the corrupt-and-denoise chain, its measures, and the command on trained runs."""
import json
from types import SimpleNamespace

import pytest
import torch

from aelab.build import build
from aelab.corruptions import CORRUPTIONS
from aelab.sample import chain, measure, nearest, recorded_steps
from conftest import run_cli


class Halve(torch.nn.Module):
    """A stand-in autoencoder whose reconstruction is factor * its input."""

    def __init__(self, factor: float = 0.5):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return SimpleNamespace(recon=self.factor * x)


def test_recorded_steps_run_one_two_five_to_the_last():
    assert recorded_steps(50) == [0, 1, 2, 5, 10, 20, 50]
    assert recorded_steps(7) == [0, 1, 2, 5, 7]
    assert recorded_steps(1) == [0, 1]
    assert recorded_steps(1000)[-3:] == [200, 500, 1000]


def test_chain_applies_the_model_step_after_step_and_clamps():
    start, generator = torch.ones(3, 4), torch.Generator().manual_seed(0)
    states, change = chain(Halve(), CORRUPTIONS.get("none")(), start, 5, [0, 1, 2, 5], generator)
    assert list(states) == [0, 1, 2, 5]
    for step in states:
        assert torch.equal(states[step], torch.full((3, 4), 0.5 ** step))
    assert change[1] == pytest.approx(0.25) and change[5] == pytest.approx((0.5 ** 5 - 0.5 ** 4) ** 2)
    assert change[0] is None  # the start made no step
    doubled, _ = chain(Halve(2.0), CORRUPTIONS.get("none")(), torch.full((2, 2), 0.3), 3, [3], generator)
    assert torch.equal(doubled[3], torch.ones(2, 2))  # pixels stay in [0, 1]


def test_chain_noise_follows_the_seed():
    noisy = CORRUPTIONS.get("gaussian")(noise_factor=0.3)
    runs = [chain(Halve(0.9), noisy, torch.full((4, 9), 0.5), 4, [4], torch.Generator().manual_seed(seed))[0][4]
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_nearest_finds_the_closest_reference_across_chunks():
    reference = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.0, 1.0]])
    images = torch.tensor([[0.9, 1.0], [0.4, 0.5], [0.0, 0.8], [0.0, 0.0]])
    for chunk in (1, 3, 100):
        distance, index = nearest(images, reference, chunk)
        assert index.tolist() == [1, 2, 3, 0]
        assert distance.tolist() == pytest.approx([0.01 / 2, 0.01 / 2, 0.04 / 2, 0.0], abs=1e-6)


def test_measures_of_training_images_themselves(make_cfg):
    parts = build(make_cfg("device=cpu"))
    train = parts.data.train
    found = measure(train.x, parts)  # each image is its own nearest: distance 0, every class, as sharp
    assert found["nearest_mse"] == pytest.approx(0.0, abs=1e-6)
    assert found["classes"] == len(train.labels.unique())
    assert found["top_share"] == pytest.approx(train.labels.bincount().max().item() / len(train))
    assert found["sharpness"] == pytest.approx(1.0)
    sevens = train.x[train.labels == 7][:20]
    assert measure(sevens, parts)["classes"] == 1 and measure(sevens, parts)["top_share"] == 1.0
    blurred = measure(train.x.view(-1, 1, 8, 8).mean(-1, keepdim=True).expand(-1, 1, 8, 8).flatten(1), parts)
    assert blurred["sharpness"] < found["sharpness"] and blurred["nearest_mse"] > 0.005


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained runs on the digits, with and without gaussian training noise."""
    root = tmp_path_factory.mktemp("sample")
    made = {}
    for name, overrides in {"plain": [], "dae": ["corruption=gaussian", "corruption.noise_factor=0.3"]}.items():
        made[name] = root / name
        run_cli("train", *overrides, "device=cpu", "trainer.epochs=15", "eval.probe=false",
                f"hydra.run.dir={made[name]}", cwd=root)
    return made


def read(path):
    return json.loads(path.read_text())


def test_sample_command_draws_digits_from_random_pixels(runs):
    run_dir = runs["dae"]
    proc = run_cli("sample", str(run_dir), cwd=run_dir)
    record = read(run_dir / "sample.json")
    assert (run_dir / "sample.png").stat().st_size > 10_000
    assert record["corruption"] == {"name": "gaussian", "noise_factor": 0.3}  # the run's own training noise
    rows = {row["step"]: row for row in record["chain"]}
    assert list(rows) == [0, 1, 2, 5, 10, 20, 50]
    assert rows[50]["nearest_mse"] < 0.2 * rows[0]["nearest_mse"]  # random pixels became digit-like images
    assert rows[50]["nearest_mse"] < 1.5 * record["test_images"]["nearest_mse"]
    assert rows[50]["classes"] >= 5 and rows[50]["change"] > 1e-3  # still moving among several digits
    assert record["test_images"]["sharpness"] == pytest.approx(1.0, abs=0.1)
    assert "test images" in proc.stdout and "sample.png" in proc.stdout
    run_cli("sample", str(run_dir), cwd=run_dir)
    assert read(run_dir / "sample.json") == record  # the same seed, the same chains
    run_cli("sample", str(run_dir), "sample.seed=1", cwd=run_dir)
    assert read(run_dir / "sample_sample.seed=1.json")["chain"][-1] != record["chain"][-1]
    assert read(run_dir / "sample.json") == record  # kept: each setting writes its own file


def test_sample_settings_from_the_command_line(runs):
    run_dir = runs["dae"]
    run_cli("sample", str(run_dir), "sample.start=test", "sample.steps=7", "sample.count=16", "sample.noise=0.1",
            cwd=run_dir)
    record = read(run_dir / "sample_sample.start=test_sample.steps=7_sample.count=16_sample.noise=0.1.json")
    assert [row["step"] for row in record["chain"]] == [0, 1, 2, 5, 7]
    assert record["chain"][0]["nearest_mse"] == pytest.approx(record["test_images"]["nearest_mse"])
    assert record["corruption"] == {"name": "gaussian", "noise_factor": 0.1}


def test_a_plain_autoencoder_chain_runs_to_a_fixed_point(runs):
    run_dir = runs["plain"]
    proc = run_cli("sample", str(run_dir), cwd=run_dir)
    assert "corrupts nothing" in proc.stdout and "sample.noise=0.3" in proc.stdout
    rows = read(run_dir / "sample.json")["chain"]
    assert rows[-1]["change"] < 1e-3 * rows[1]["change"]


@pytest.mark.parametrize("args,message", [
    (["sample.steps=0"], "sample.steps: must be >= 1, got 0"),
    (["sample.start=middle"], "sample.start: must be one of noise, test, got 'middle'"),
    (["sample.noise=-1"], "sample.noise: must be >= 0, got -1"),
    (["sample.seed=abc"], "sample.seed: must be an integer, got 'abc'"),
    (["sample.count=0"], "sample.count: must be >= 1, got 0"),
    (["sample.start=test", "sample.count=100000"], "sample.count: must be <= the 270 test images"),
    (["sample.stpes=3"], "sample.stpes: no such key (did you mean sample.steps?)"),
    (["eval.threshold=0.2"], "takes KEY=VALUE overrides under sample.* or device.*, e.g. sample.steps=200"),
])
def test_bad_sample_input_is_one_line_and_writes_nothing(runs, args, message):
    run_dir = runs["plain"]
    before = sorted(p.name for p in run_dir.iterdir())
    proc = run_cli("sample", str(run_dir), *args, cwd=run_dir, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_sample_of_a_folder_that_is_no_run(tmp_path):
    proc = run_cli("sample", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is not an aelab run" in proc.stderr
    usage = run_cli("sample", cwd=tmp_path, check=False)
    assert usage.returncode == 2 and "usage: aelab sample RUN_DIR" in usage.stdout
