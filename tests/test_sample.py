"""`aelab sample`: the corrupt-and-denoise chain, its measures, and the command on trained runs."""
import json
from types import SimpleNamespace

import pytest
import torch

from aelab.build import build
from aelab.corruptions import CORRUPTIONS
from aelab.runs import SAMPLE_MEASURES
from aelab.analysis.sampling import measure, nearest, recorded_steps
from aelab.samplers import SAMPLERS, chain_walk, langevin_walk
from conftest import copied, events, run_cli


class Halve(torch.nn.Module):
    """A stand-in autoencoder whose reconstruction is factor * its input."""

    def __init__(self, factor: float = 0.5):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return SimpleNamespace(recon=self.factor * x)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_is_chosen_by_its_name_and_keeps_the_recorded_steps(make_cfg, name):
    """sample.method=NAME builds the registry's entry; its chains keep the start and each recorded step.
    Without noise, at a = 2, each kind steps x <- f(x) (f halves): after 3 steps the chain shows x / 8,
    Langevin the model's f of its state, x / 16."""
    sampler = build(make_cfg("device=cpu", f"sample.method={name}")).sampling.method
    assert sampler.name == name
    start, none = torch.full((2, 4), 0.8), CORRUPTIONS.get("none")()
    states, change = sampler.draw([(Halve(), 0.0)], none, 2.0, start, 3, [0, 1, 3], torch.Generator().manual_seed(0))
    assert list(states) == [0, 1, 3] and change[0] is None
    torch.testing.assert_close(states[3], start / {"chain": 8, "langevin": 16, "annealed": 16}[name])


def test_recorded_steps_run_one_two_five_to_the_last():
    assert recorded_steps(50) == [0, 1, 2, 5, 10, 20, 50]
    assert recorded_steps(7) == [0, 1, 2, 5, 7]
    assert recorded_steps(1) == [0, 1]
    assert recorded_steps(1000)[-3:] == [200, 500, 1000]


def test_chain_applies_the_model_step_after_step_and_clamps():
    start, generator = torch.ones(3, 4), torch.Generator().manual_seed(0)
    states, change = chain_walk(Halve(), CORRUPTIONS.get("none")(), start, 5, [0, 1, 2, 5], generator)
    assert list(states) == [0, 1, 2, 5]
    for step in states:
        assert torch.equal(states[step], torch.full((3, 4), 0.5 ** step))
    assert change[1] == pytest.approx(0.25) and change[5] == pytest.approx((0.5 ** 5 - 0.5 ** 4) ** 2)
    assert change[0] is None  # the start made no step
    doubled, _ = chain_walk(Halve(2.0), CORRUPTIONS.get("none")(), torch.full((2, 2), 0.3), 3, [3], generator)
    assert torch.equal(doubled[3], torch.ones(2, 2))  # pixels stay in [0, 1]


def test_chain_noise_follows_the_seed():
    noisy = CORRUPTIONS.get("gaussian")(noise_factor=0.3)
    runs = [chain_walk(Halve(0.9), noisy, torch.full((4, 9), 0.5), 4, [4], torch.Generator().manual_seed(seed))[0][4]
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


class GaussianDenoiser(torch.nn.Module):
    """The best denoiser of data N(mu, tau² I) under gaussian noise sigma: f(x) = mu + c (x - mu),
    c = tau² / (tau² + sigma²), whose score estimate (f(x) - x) / sigma² = -(x - mu) / (tau² + sigma²) is
    the noised density's exactly."""

    def __init__(self, mu: float, tau: float, sigma: float):
        super().__init__()
        self.mu, self.c = mu, tau ** 2 / (tau ** 2 + sigma ** 2)

    def forward(self, x):
        return SimpleNamespace(recon=self.mu + self.c * (x - self.mu))


@pytest.mark.parametrize("step_size", [0.2, 1.0, 2.0])
def test_langevin_samples_the_noised_density_the_score_describes(step_size):
    """On N(mu, tau²) data with the best denoiser, Langevin's state x is an AR(1) process around mu whose
    stationary variance is v / (1 - a sigma² / (4 v)), v = tau² + sigma² (-> v, the noised density's, as
    the step a -> 0); what it shows, f(x), has c² times that. Mean mu either way."""
    mu, tau, sigma = 0.5, 0.05, 0.1
    model, v = GaussianDenoiser(mu, tau, sigma), tau ** 2 + sigma ** 2
    start = torch.full((4096, 16), mu)
    states, change = langevin_walk([(model, sigma)], step_size, start, 80, [0, 80], torch.Generator().manual_seed(0))
    shown = states[80]
    stationary = v / (1 - step_size * sigma ** 2 / (4 * v))
    assert shown.mean().item() == pytest.approx(mu, abs=1e-3)
    assert shown.var().item() == pytest.approx(model.c ** 2 * stationary, rel=0.03)
    assert change[80] == pytest.approx(2 * model.c ** 2 * stationary * (1 - (1 - step_size * sigma ** 2 / (2 * v))),
                                       rel=0.05)  # E(f(x') - f(x))² = 2 c² V (1 - rho), rho the AR coefficient


def test_the_corrupt_and_denoise_chain_has_another_stationary_law():
    """The same denoiser in x <- f(x + sigma z): variance c² sigma² / (1 - c²), not the noised density's."""
    mu, tau, sigma = 0.5, 0.05, 0.1
    model = GaussianDenoiser(mu, tau, sigma)
    states, _ = chain_walk(model, CORRUPTIONS.get("gaussian")(noise_factor=sigma), torch.full((4096, 16), mu), 40, [40],
                      torch.Generator().manual_seed(0))
    assert states[40].var().item() == pytest.approx(model.c ** 2 * sigma ** 2 / (1 - model.c ** 2), rel=0.03)


def test_langevin_without_noise_relaxes_to_the_denoisers_fixed_point():
    """sigma 0: x <- x + (a/2)(f(x) - x) converges geometrically (factor 1 - (a/2)(1 - c)) to f's fixed point."""
    model = GaussianDenoiser(0.5, 0.05, 0.1)
    states, change = langevin_walk([(model, 0.0)], 1.0, torch.ones(3, 4), 5, [0, 1, 5], torch.Generator().manual_seed(0))
    rho = 1 - 0.5 * (1 - model.c)
    x5 = 0.5 + 0.5 * rho ** 5  # the state after 5 steps; shown: f of it
    assert torch.allclose(states[5], torch.full((3, 4), 0.5 + model.c * (x5 - 0.5)))
    assert torch.equal(states[0], torch.ones(3, 4)) and change[0] is None
    assert change[1] == pytest.approx((0.5 + model.c * 0.5 * rho - 1.0) ** 2)


def test_annealed_langevin_follows_each_levels_law_in_turn():
    """Levels sigma 0.1, 0.03, 0.005, each with its own best denoiser, 100 steps each: x is an AR(1)
    process whose coefficient rho_i = 1 - (a/2)(1 - c_i) and added variance a sigma_i² change at each
    level, so its mean and variance after each level follow from the recursion, step by step. The
    smallest sigma alone mixes slowly (rho 0.99): from the same start in as many steps it is still far
    from the data's mean, which annealing reached."""
    mu, tau, a, steps = 0.5, 0.05, 1.0, 100
    levels = [(GaussianDenoiser(mu, tau, sigma), sigma) for sigma in (0.1, 0.03, 0.005)]
    start = torch.zeros(4096, 16)
    record = [1, 100, 101, 200, 201, 300]  # each level's end, and the first step of the next (its own model's)
    states, _ = langevin_walk(levels, a, start, steps, record, torch.Generator().manual_seed(0))
    mean, var = 0.0, 0.0
    for step in range(1, 3 * steps + 1):
        model, sigma = levels[(step - 1) // steps]
        rho = 1 - a / 2 * (1 - model.c)
        mean, var = mu + rho * (mean - mu), rho ** 2 * var + a * sigma ** 2
        if step in record[1:]:  # f_i(x): c_i times x's spread around mu
            assert states[step].mean().item() == pytest.approx(mu + model.c * (mean - mu), abs=1e-3)
            assert states[step].var().item() == pytest.approx(model.c ** 2 * var, rel=0.03)
    alone, _ = langevin_walk(levels[-1:], a, start, 3 * steps, [300], torch.Generator().manual_seed(0))
    assert alone[300].mean().item() < mu - 0.05


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
    shape = parts.data.image_shape
    found = measure(train.x, train, shape)  # each image is its own nearest: distance 0, every class, as sharp
    assert found["nearest_mse"] == pytest.approx(0.0, abs=1e-6)
    assert found["classes"] == len(train.labels.unique())
    assert found["top_share"] == pytest.approx(train.labels.bincount().max().item() / len(train))
    assert found["sharpness"] == pytest.approx(1.0)
    sevens = train.x[train.labels == 7][:20]
    assert measure(sevens, train, shape)["classes"] == 1 and measure(sevens, train, shape)["top_share"] == 1.0
    blurred = measure(train.x.view(-1, 1, 8, 8).mean(-1, keepdim=True).expand(-1, 1, 8, 8).flatten(1), train, shape)
    assert blurred["sharpness"] < found["sharpness"] and blurred["nearest_mse"] > 0.005


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two trained runs on the digits, with and without gaussian training noise."""
    root = tmp_path_factory.mktemp("sample")
    made = {}
    for name, overrides in {"plain": [], "dae": ["corruption=gaussian", "corruption.noise_factor=0.3"]}.items():
        made[name] = root / name
        run_cli("train", *overrides, "device=cpu", "trainer.epochs=15", "eval.probe=false",
                f"hydra.run.dir={made[name]}", cwd=root)
    return made


@pytest.fixture
def runs(trained, tmp_path_factory):
    """This test's own copies of the two trained runs: it writes its samples into them."""
    return {name: copied(run_dir, tmp_path_factory) for name, run_dir in trained.items()}


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
    assert "test images" in proc.stdout and "sample.png" in proc.stdout and "TensorBoard: sample/" in proc.stdout
    board = events(run_dir / "sample")  # a TensorBoard run of its own, beside the training run's
    for name in SAMPLE_MEASURES:
        logged = {e.step: e.value for e in board.Scalars(f"sample/{name}")}
        kept = {step: row[name] for step, row in rows.items() if row[name] is not None}
        assert list(logged) == list(kept) and list(logged.values()) == pytest.approx(list(kept.values()))
    assert [e.step for e in board.Scalars("sample/change")] == [1, 2, 5, 10, 20, 50]
    yardstick = board.Scalars("test_images/nearest_mse")
    assert [e.step for e in yardstick] == [0, 50]
    assert [e.value for e in yardstick] == pytest.approx([record["test_images"]["nearest_mse"]] * 2)
    assert [e.step for e in board.Images("sample/chains")] == list(rows)
    assert "sample/nearest_mse" not in events(run_dir).Tags()["scalars"]  # the training run's own: untouched
    run_cli("sample", str(run_dir), cwd=run_dir)
    assert read(run_dir / "sample.json") == record  # the same seed, the same chains
    assert len(list((run_dir / "sample").glob("events.out.tfevents.*"))) == 1  # replaced, not written twice
    assert len(events(run_dir / "sample").Scalars("sample/classes")) == len(rows)
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


def test_langevin_sample_command_draws_digits_of_every_kind(runs):
    """Langevin steps along the DAE's score from random pixels: digit-like, many classes, still moving."""
    run_dir = runs["dae"]
    proc = run_cli("sample", str(run_dir), "sample.method=langevin", "sample.step_size=1", cwd=run_dir)
    record = read(run_dir / "sample_sample.method=langevin_sample.step_size=1.json")
    assert record["sample"]["method"] == "langevin" and record["sample"]["step_size"] == 1
    assert record["corruption"] == {"name": "gaussian", "noise_factor": 0.3}  # sigma: the run's training noise
    rows = {row["step"]: row for row in record["chain"]}
    assert rows[50]["nearest_mse"] < 0.2 * rows[0]["nearest_mse"]
    assert rows[50]["classes"] >= 7 and rows[50]["change"] > 1e-3
    assert (run_dir / "sample_sample.method=langevin_sample.step_size=1.png").stat().st_size > 10_000
    assert "test images" in proc.stdout


def test_a_plain_autoencoder_chain_runs_to_a_fixed_point(runs):
    run_dir = runs["plain"]
    proc = run_cli("sample", str(run_dir), cwd=run_dir)
    assert "adds no noise" in proc.stdout and "sample.noise=0.3" in proc.stdout
    rows = read(run_dir / "sample.json")["chain"]
    assert rows[-1]["change"] < 1e-3 * rows[1]["change"]
    proc = run_cli("sample", str(run_dir), "sample.method=langevin", "sample.noise=0", "sample.steps=200", cwd=run_dir)
    assert "adds no noise (Langevin x <- x + 0.5/2 (f(x) - x) + sqrt(0.5) 0 z, showing f(x))" in proc.stdout
    rows = read(run_dir / "sample_sample.method=langevin_sample.noise=0_sample.steps=200.json")["chain"]
    assert rows[-1]["change"] < 1e-2 * rows[2]["change"]  # quarter steps toward f: slower, still to a fixed point


@pytest.mark.parametrize("args,message", [
    (["sample.steps=0"], "sample.steps: must be >= 1, got 0"),
    (["sample.start=middle"], "sample.start: must be one of noise, test, got 'middle'"),
    (["sample.noise=-1"], "sample.noise: must be >= 0, got -1"),
    (["sample.seed=abc"], "sample.seed: must be an integer, got 'abc'"),
    (["sample.count=0"], "sample.count: must be >= 1, got 0"),
    (["sample.start=test", "sample.count=100000"], "sample.count: must be <= the 270 test images"),
    (["sample.method=gibbs"], "sample.method: must be one of annealed, chain, langevin, got 'gibbs'"),
    (["sample.step_size=0"], "sample.step_size: must be in (0, 2], got 0"),
    (["sample.step_size=3"], "sample.step_size: must be in (0, 2], got 3"),
    (["sample.method=langevin"], "sample.noise: sample.method=langevin needs the gaussian sigma of the score "
                                 "estimate (f(x) - x) / sigma^2, and this run trained with corruption=none; give "
                                 "one, e.g. sample.noise=0.3"),
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


@pytest.fixture(scope="module")
def trained_noise_sweep(tmp_path_factory):
    """A sweep of gaussian denoising models at noise 0, 0.2 and 0.4 on the digits (jobs 0, 1, 2)."""
    root = tmp_path_factory.mktemp("levels")
    run_cli("train", "-m", "corruption=gaussian", "corruption.noise_factor=0,0.2,0.4", "device=cpu", "trainer.epochs=15",
            "eval.probe=false", f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    return root / "sweep"


@pytest.fixture
def noise_sweep(trained_noise_sweep, tmp_path_factory):
    """This test's own copy of the noise sweep: annealed sampling writes into the sweep's folder."""
    return copied(trained_noise_sweep, tmp_path_factory)


def test_annealed_sample_command_steps_through_the_sweeps_models_largest_sigma_first(noise_sweep):
    proc = run_cli("sample", str(noise_sweep), "sample.method=annealed", "sample.steps=20", cwd=noise_sweep)
    assert "annealed Langevin: 20 steps at each sigma 0.4, 0.2 (jobs 2, 1); left out: job 0 (corruption=gaussian, " \
           "noise_factor=0)" in proc.stdout
    name = "sample_sample.method=annealed_sample.steps=20"
    record = read(noise_sweep / f"{name}.json")
    jobs = sorted(p.parent for p in noise_sweep.glob("*/checkpoint.pt"))
    assert record["levels"] == [{"job": jobs[2].name, "sigma": 0.4}, {"job": jobs[1].name, "sigma": 0.2}]
    rows = {row["step"]: row for row in record["chain"]}
    assert list(rows) == [0, 1, 2, 5, 10, 20, 40]
    assert [row["sigma"] for row in rows.values()] == [None, 0.4, 0.4, 0.4, 0.4, 0.4, 0.2]
    assert rows[40]["nearest_mse"] < 0.2 * rows[0]["nearest_mse"]  # random pixels became digit-like images
    # the same chains drawn here from each job's own saved model, in that order
    from aelab.training import checkpoint
    from aelab.build import run_config
    from aelab.analysis.sampling import starts
    parts, levels = None, []
    for job, sigma in ((jobs[2], 0.4), (jobs[1], 0.2)):
        job_parts = build(run_config(job, ["sample.steps=20"], allowed=("sample.",)))
        checkpoint.load(job_parts, job, model_only=True)
        parts, levels = parts or job_parts, [*levels, (job_parts.model, sigma)]
    generator = torch.Generator().manual_seed(0)
    states, _ = langevin_walk(levels, 0.5, starts(parts, parts.sampling, generator), 20, [40], generator)
    found = measure(states[40], parts.data.train, parts.data.image_shape)
    assert found == pytest.approx({k: rows[40][k] for k in found})
    assert (noise_sweep / f"{name}.png").stat().st_size > 10_000
    board = events(noise_sweep / name)
    sigmas = board.Scalars("sample/sigma")
    assert [e.step for e in sigmas] == [1, 2, 5, 10, 20, 40]
    assert [e.value for e in sigmas] == pytest.approx([0.4] * 5 + [0.2])
    assert [e.step for e in board.Images("sample/chains")] == list(rows)
    run_cli("sample", str(noise_sweep), "sample.method=annealed", "sample.steps=20", cwd=noise_sweep)
    assert read(noise_sweep / f"{name}.json") == record  # the same seed, the same chains
    report = run_cli("report", str(noise_sweep), cwd=noise_sweep)  # the sweep's folder holds it; its jobs, 3
    last = rows[40]
    line = (f"- {name}.json: 20 steps at each sigma 0.4, 0.2; the last state: {last['classes']} classes (commonest "
            f"{last['top_share']:.2f}), sharpness {last['sharpness']:.3g}, nearest_mse {last['nearest_mse']:.3g}")
    assert "3 runs" in report.stdout and "annealed Langevin through the sweep's models" in report.stdout
    assert line in report.stdout and line in (noise_sweep / "report.md").read_text()


@pytest.mark.parametrize("where,args,message", [
    ("job", [], "sample.method: annealed Langevin steps through the models of a sweep, one per gaussian sigma, and"),
    ("sweep", ["sample.noise=0.3"], "sample.noise: annealed Langevin takes each job's own training sigma; drop "
                                    "sample.noise"),
    ("one level", [], "SWEEP_DIR: annealed Langevin steps through models trained at two or more gaussian sigmas, "
                      "and"),
    ("other data", [], "SWEEP_DIR: job 1 and job 2 trained on different data"),
    ("empty", [], "holds no trained jobs (*/checkpoint.pt); give the folder of an `aelab train -m` sweep"),
    ("sweep", ["sample.steps=0"], "sample.steps: must be >= 1, got 0"),
])
def test_bad_annealed_input_is_one_line_and_writes_nothing(noise_sweep, tmp_path, where, args, message):
    import shutil

    jobs = sorted(p.parent for p in noise_sweep.glob("*/checkpoint.pt"))
    target = {"job": jobs[2], "sweep": noise_sweep, "empty": tmp_path}.get(where, tmp_path / "sweep")
    if where in ("one level", "other data"):
        for job in jobs[:2] if where == "one level" else jobs[1:]:
            shutil.copytree(job, target / job.name)
    if where == "other data":
        config = next(target.glob("1_*")) / ".hydra" / "config.yaml"
        config.write_text(config.read_text().replace("split_seed: 0", "split_seed: 5"))
    before = sorted(str(p) for p in target.rglob("*"))
    proc = run_cli("sample", str(target), "sample.method=annealed", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(str(p) for p in target.rglob("*")) == before


def test_a_run_configured_to_anneal_is_told_to_give_its_sweep(noise_sweep, tmp_path):
    """sample.method=annealed saved in a run's own config (trained with it): `aelab sample RUN_DIR`
    refuses it in one line, as it does the override."""
    import shutil

    job = tmp_path / "job"
    shutil.copytree(sorted(p.parent for p in noise_sweep.glob("*/checkpoint.pt"))[2], job)
    config = job / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("method: chain", "method: annealed"))
    proc = run_cli("sample", str(job), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "sample.method: annealed Langevin steps through the models of a sweep" in proc.stderr
    assert "give its sweep's folder, or sample.method=langevin" in proc.stderr
    assert not list(job.glob("sample*"))


def test_report_names_a_broken_annealed_record_and_passes_over_other_json(noise_sweep, tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(noise_sweep, sweep)
    for path in sweep.glob("sample*.json"):
        path.unlink()
    (sweep / "sample_notes.json").write_text('{"what": "my own notes"}')  # not aelab's: passed over
    assert "annealed Langevin" not in run_cli("report", str(sweep), cwd=sweep).stdout
    (sweep / "sample_sample.method=annealed.json").write_text('{"sample": {"method": "annealed"}, "chain": []}')
    proc = run_cli("report", str(sweep), cwd=sweep, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "sample_sample.method=annealed.json is unreadable (not an aelab sample record); remove it" in proc.stderr
