"""Sweeps end to end: multirun → aelab report (table, CSV, Markdown, plots); aelab eval; TensorBoard.
`sweep` (conftest) is each test's own copy of one sweep trained once per session."""
import csv
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aelab.runs import output_name
from conftest import run_cli

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml"))


@pytest.fixture(autouse=True)
def close_kept_plots():
    """Tests that keep a plot to read it (plots.save monkeypatched) leave its figure open: closed here,
    so that pyplot does not warn of too many open figures."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def test_report_folds_seeds_and_writes_table_csv_markdown_plots(sweep):
    proc = run_cli("report", str(sweep), cwd=sweep)
    assert "aelab report" in proc.stdout and "4 runs" in proc.stdout
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["reg.weight"] for r in rows] == ["0.001", "0.1"] and all(r["runs"] == "2" for r in rows)
    pairs = _pairs(sweep)
    for r in rows:
        a, b = pairs[r["reg.weight"]]
        assert float(r["mse_mean"]) == pytest.approx((a + b) / 2, rel=1e-9)
        assert float(r["mse_std"]) == pytest.approx(abs(a - b) / 2 ** 0.5, rel=1e-6)  # sample std of two
    assert "± " in (sweep / "report.md").read_text()
    header, _, *lines = [line.strip("| ").split(" | ") for line in (sweep / "report.md").read_text().splitlines()
                         if line.startswith("|")]
    mse_cells = [cells[header.index("mse")] for cells in lines]
    assert "…" not in proc.stdout and all(cell in proc.stdout for cell in mse_cells)  # piped: no cell cut short
    pngs = sorted(sweep.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"metrics_vs_reg.weight.png", "recon_vs_sparsity.png", "loss_curves.png", "compare_reconstructions.png",
            "compare_features.png", "compare_latents.png"} <= names
    assert "compare_denoising.png" not in names  # a penalty sweep: each run's own denoising.png is enough
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        with Image.open(png) as image:
            assert image.width >= 400 and image.height >= 300
    wrote = proc.stdout.strip().splitlines()[-1]  # where the files went, said last
    assert wrote.startswith("wrote report.csv, report.md, ") and wrote.endswith(f" in {sweep}")
    written = {name.strip() for name in wrote[len("wrote "):-len(f" in {sweep}")].split(",")}
    assert written == {"report.csv", "report.md"} | names


def test_side_by_side_shows_each_settings_own_pictures(sweep, tmp_path, monkeypatch):
    """compare_reconstructions.png / compare_features.png: one panel per setting, titled with it, showing
    the pixels of the picture its first run wrote; fewer than two settings: no comparison drawn."""
    import numpy as np
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import fold, load_jobs, swept_keys

    jobs, _ = load_jobs(sweep)
    rows = fold(jobs, swept_keys(jobs))
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    for name in ("reconstructions", "features", "denoising", "latents"):
        assert plots.side_by_side(rows, name, tmp_path) == tmp_path / f"compare_{name}.png"
        panels = [ax for ax in drawn[f"compare_{name}.png"].axes if ax.images]
        assert [ax.get_title() for ax in panels] == [f"{row.label} (2 seeds: the first)" for row in rows]
        for ax, row in zip(panels, rows):
            with Image.open(row.jobs[0].path / f"{name}.png") as own:  # the scatter of codes keeps its colours
                assert np.array_equal(ax.images[0].get_array(), np.asarray(own.convert("RGB" if name == "latents"
                                                                                       else "L")))
        assert plots.side_by_side(rows[:1], name, tmp_path) is None
    strip = next(ax for ax in drawn["compare_reconstructions.png"].axes if ax.images)
    assert not strip.axison  # the rows are named in each run's reconstructions.png itself, not again


def test_a_noise_sweep_compares_each_models_denoising_pictures(tmp_path, monkeypatch):
    """compare_denoising.png, for sweeps over the training noise: each setting's denoising.png, or with eval
    overrides the picture its `aelab eval` record wrote beside it (the inputs those metrics measured)."""
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import Job, Row

    rows = []
    for shift, level in enumerate(("0.1", "0.5")):
        run = tmp_path / level
        run.mkdir()
        for name, shade in (("denoising", 50), ("eval_eval.probe=false_denoising", 200)):
            Image.new("RGB", (40, 60), (shade + shift,) * 3).save(run / f"{name}.png")
        setting = {"corruption.noise_factor": level}
        rows.append(Row(setting, [Job(run, setting, {}, {"mse": 0.01, "mse_gaussian": 0.02})]))
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    for record, shade in ((None, 50), ("eval_eval.probe=false", 200)):
        drawn.clear()
        paths = plots.make_plots(rows, [row.jobs[0] for row in rows], ["corruption.noise_factor"], tmp_path,
                                 record=record)
        assert tmp_path / "compare_denoising.png" in paths
        panels = [ax for ax in drawn["compare_denoising.png"].axes if ax.images]
        assert [ax.get_title() for ax in panels] == [row.label for row in rows]
        assert [int(ax.images[0].get_array()[0, 0]) for ax in panels] == [shade, shade + 1]


def test_sampled_values_are_shown_short_and_kept_whole(tmp_path):
    """An Optuna trial's reg.weight=0.0015676677195506068: 0.001568 in the table, Markdown and plots,
    whole in report.csv; typed values (1e-3, 0.25, mse) as typed."""
    from aelab.sweeps.jobs import Job, Row, short
    from aelab.sweeps.report import write_tables

    assert [short(v) for v in ("0.0015676677195506068", "0.35759468318620974", "1e-3", "0.25", "mse", "[256, 128]",
                               "123456789")] == ["0.001568", "0.3576", "1e-3", "0.25", "mse", "[256, 128]", "123456789"]
    setting = {"reg.weight": "0.0015676677195506068", "loss": "mse"}
    row = Row(setting, [Job(Path("0"), setting, {}, {"mse": 0.5})])
    assert row.label == "reg.weight=0.001568, loss=mse"
    csv_path, md_path = write_tables([row], list(setting), ["mse"], [], [], tmp_path)
    assert csv_path.read_text().splitlines()[1].startswith("0.0015676677195506068,mse,1,?,0.5,")
    assert md_path.read_text().splitlines()[2] == "| 0.001568 | mse | 1 | ? | 0.5 |"  # ?: no converged record


def test_long_settings_are_drawn_whole(tmp_path, monkeypatch):
    """`aelab report outputs` over runs that differ in many keys: every bar's setting is written out whole
    (was cut off by the figure's edge, with a tight-layout warning per plot), and the trade-off plot
    numbers its points and keys them below."""
    import warnings
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import Job, Row

    settings = [{"trainer.epochs": str(e), "model.hidden": "[256, 128]", "model": "sparse_l1", "reg.weight": w,
                 "experiment": "l1_sweep", "reg": "l1"} for e in (2, 30) for w in ("0.001", "0.1", "1")]
    rows = [Row(s, [Job(Path(str(n)), s, {}, {"mse": 0.01 * n, "population_sparsity": 0.1 * n, "sensitivity": n,
                                               "probe_latent": 0.9})]) for n, s in enumerate(settings)]
    drawn = {}
    real_save = plots.save

    def save(fig, path):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # matplotlib warns when the labels do not fit
            drawn[path.name] = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes], [
                t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
            return real_save(fig, path)
    monkeypatch.setattr(plots, "save", save)
    plots.metrics_by(rows, "reg.weight", tmp_path)
    plots.trade_off(rows, "population_sparsity", "recon_vs_sparsity", tmp_path)
    ticks, _ = drawn["metrics_by_reg.weight.png"]
    assert [" ".join(t.split()) for t in ticks[0]] == [row.label for row in rows]
    _, keyed = drawn["recon_vs_sparsity.png"]
    assert [" ".join(t.split()) for t in keyed] == [f"{n}: {row.label}" for n, row in enumerate(rows, 1)]


def test_panels_follow_what_was_swept(tmp_path, monkeypatch):
    """A loss sweep is drawn with what tells losses apart (MSE, MAE, sharpness: Exercise 1 asks which is
    sharpest), a noise sweep with what denoising costs and buys (sharpness, encoder sensitivity), a
    penalty sweep with sparsity; each terminal table shows sharpness where loss or corruption was swept."""
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import Job, LABELS, Row
    from aelab.sweeps.report import shown_metrics

    titles = {}

    def save(fig, path):
        titles[path.name] = [ax.get_title() for ax in fig.axes]
        return path
    monkeypatch.setattr(plots, "save", save)
    metrics = {"mse": 0.02, "mae": 0.05, "sharpness": 0.8, "population_sparsity": 0.4, "sensitivity": 9.0,
               "probe_latent": 0.9}
    for key, values in (("loss", ("mse", "mae")), ("corruption.noise_factor", ("0.1", "0.3")),
                        ("reg.weight", ("0.001", "0.1"))):
        rows = [Row({key: v}, [Job(Path(v), {key: v}, {"reg": {"name": "l1"}}, metrics)]) for v in values]
        plots.make_plots(rows, [], [key], tmp_path)
    drawn = lambda name, *panels: titles[name] == [LABELS[m] for m in panels]  # noqa: E731
    assert drawn("metrics_by_loss.png", "mse", "mae", "sharpness", "probe_latent")
    assert drawn("metrics_vs_corruption.noise_factor.png", "mse", "sharpness", "sensitivity", "probe_latent")
    assert drawn("metrics_vs_reg.weight.png", "mse", "population_sparsity", "sensitivity", "probe_latent")
    assert "sharpness" in shown_metrics(["loss"]) and "sharpness" in shown_metrics(["corruption"])
    assert "sharpness" not in shown_metrics(["reg.weight"])


def test_loss_curves_name_every_run_even_two_of_one_setting(sweep, tmp_path, monkeypatch):
    """Two runs labelled alike (aelab report outputs over repeated runs) are two lines and two legend
    entries, each line the run's own train/total from its TensorBoard events; beside it each run's
    validation reconstruction loss and active fraction per epoch."""
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import load_jobs

    jobs = load_jobs(sweep)[0][:2]
    seen = {}
    real_save = plots.save

    def save(fig, path):
        seen["legend"] = [t.get_text() for t in fig.legends[0].get_texts()]
        seen["train"] = [(list(line.get_ydata()), line.get_color()) for line in fig.axes[0].lines]
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["active"] = [list(line.get_ydata()) for line in fig.axes[2].lines]
        return real_save(fig, path)
    monkeypatch.setattr(plots, "save", save)
    assert plots.loss_curves(jobs, {job.path: "reg.weight=0.001" for job in jobs}, tmp_path) == tmp_path / (
        "loss_curves.png")
    assert seen["legend"] == ["reg.weight=0.001", "reg.weight=0.001"]
    for job, (values, _) in zip(jobs, seen["train"]):
        events = EventAccumulator(str(job.path), size_guidance={"scalars": 0})
        events.Reload()
        assert values == pytest.approx([p.value for p in events.Scalars("train/total")])
    assert seen["train"][0][1] != seen["train"][1][1]
    # the validation reconstruction loss and how sparse the codes grow, per epoch: the training dynamics
    assert seen["titles"] == ["training loss", "validation reconstruction", "validation codes"]
    for job, values in zip(jobs, seen["active"]):
        events = EventAccumulator(str(job.path), size_guidance={"scalars": 0})
        events.Reload()
        assert values == pytest.approx([p.value for p in events.Scalars("val/population_sparsity")])
        assert len(values) == 2  # one per epoch


def test_many_long_lines_get_one_legend_below_and_no_two_alike(tmp_path, monkeypatch):
    """metrics_vs over twelve other settings, each long: one legend under the panels naming each line
    whole (a legend in every panel covered the lines and ran off the figure), and the lines past the
    colour cycle's ten told apart by their dash."""
    import warnings
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import Job, Row

    rows = []
    for epochs in range(1, 13):
        for weight in ("0.001", "0.1"):
            setting = {"trainer.epochs": str(epochs), "model.hidden": "[256, 128]", "experiment": "l1_sweep",
                       "reg.weight": weight}
            rows.append(Row(setting, [Job(Path(f"{epochs}-{weight}"), setting, {}, {"mse": 0.01 * epochs})]))
    seen = {}
    real_save = plots.save

    def save(fig, path):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            seen["legends"] = [[t.get_text() for t in legend.get_texts()] for legend in fig.legends]
            seen["per_panel"] = [ax.get_legend() for ax in fig.axes]
            seen["styles"] = [(c.lines[0].get_color(), c.lines[0].get_linestyle()) for c in fig.axes[0].containers]
            return real_save(fig, path)
    monkeypatch.setattr(plots, "save", save)
    plots.metrics_vs(rows, "reg.weight", tmp_path, panels=("mse",))
    (legend,) = seen["legends"]
    assert [" ".join(t.split()) for t in legend] == [
        f"trainer.epochs={e}, model.hidden=[256, 128], experiment=l1_sweep" for e in range(1, 13)]
    assert seen["per_panel"] == [None] and len(set(seen["styles"])) == 12


def _pairs(sweep):
    """Per reg.weight, the test MSE of its two seeds, read from each job's own files."""
    found = {}
    for metrics in sweep.glob("*/metrics.json"):
        overrides = (metrics.parent / ".hydra" / "overrides.yaml").read_text()
        weight = "0.001" if "reg.weight=0.001" in overrides else "0.1"
        found.setdefault(weight, []).append(json.loads(metrics.read_text())["test"]["mse"])
    return found


def test_where_and_how_a_job_ran_is_no_factor():
    """A job resumed on its own (resume=true), another launcher or data path: the same setting."""
    from aelab.sweeps.jobs import Job, swept_keys
    typed = [{"reg.weight": "1e-3", "resume": "true", "launcher": "parallel"}, {"reg.weight": "1e-1"},
             {"reg.weight": "1e-1", "paths.data": "/data", "hydra/launcher": "joblib", "trainer.seed": "1"}]
    assert swept_keys([Job(Path(str(n)), o, {}, {}) for n, o in enumerate(typed)]) == ["reg.weight", "trainer.seed"]


def test_a_key_a_job_did_not_set_shows_what_it_ran_with():
    """`aelab report outputs` over single runs: loss=bce in one, reg=l1 reg.weight=0.1 in the other.
    Each cell a run left at its default shows that default (was blank), read from its config."""
    from aelab.sweeps.jobs import fold, Job, swept_keys
    from aelab.sweeps.report import fmt
    config = {"reg": {"weight": 0.0}, "eval": {"probe": False}}
    bce = Job(Path("a"), {"loss": "bce"}, config, {"mse": 0.1}, {"loss": "bce", "reg": "none"})
    l1 = Job(Path("b"), {"reg": "l1", "reg.weight": "0.1", "eval.probe": "true"}, config, {"mse": 0.2},
             {"loss": "mse", "reg": "l1"})
    keys = swept_keys([bce, l1])
    assert keys == ["loss", "reg", "reg.weight", "eval.probe"]
    assert [row.setting for row in fold([bce, l1], keys)] == [
        {"loss": "bce", "reg": "none", "reg.weight": "0.0", "eval.probe": "false"},
        {"loss": "mse", "reg": "l1", "reg.weight": "0.1", "eval.probe": "true"}]
    assert fmt(float("nan"), float("nan"), 0) == "-"  # no job of the row has the metric
    optuna = Job(Path("c"), {"reg": "l1", "reg.weight": "0.1", "eval.probe": "True"}, config, {"mse": 0.3},
                 {"loss": "mse", "reg": "l1"})
    assert optuna.value("eval.probe") == "true"  # Optuna's sweeper records True: the same setting as true
    assert len(fold([l1, optuna], keys)) == 1


def test_a_job_whose_metrics_cannot_be_read_is_listed_not_a_traceback(sweep, tmp_path):
    """One job's metrics.json cut short: the others are reported, that one is named under the table
    with the fix, and nothing of the sweep is changed but the report's own files."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report.*", "*.png"))
    broken = sorted(copy.glob("*/metrics.json"))[0]
    broken.write_text(broken.read_text()[:40])
    proc = run_cli("report", str(copy), cwd=tmp_path)
    assert "3 runs" in proc.stdout and "1 job(s) without results" in proc.stdout
    assert f"{broken} is unreadable (" in proc.stdout and "evaluates the trained run again" in proc.stdout
    assert broken.read_text() == (sweep / broken.parent.name / "metrics.json").read_text()[:40]
    with (copy / "report.csv").open() as f:
        assert sorted(r["runs"] for r in csv.DictReader(f)) == ["1", "2"]


def test_a_stopped_job_is_continued_with_its_own_sweep_or_alone(sweep, tmp_path):
    """`aelab report outputs` over a sweep and a single run, one job of each stopped: the command each
    line names is that job's sweep (never the folder reported on, which no resume reads), or the run
    itself; and the run's command works."""
    outputs = tmp_path / "outputs"
    swept = outputs / "multirun" / "s"
    shutil.copytree(sweep, swept, ignore=shutil.ignore_patterns("report.*", "*.png"))
    shutil.copytree(sorted(sweep.glob("*/metrics.json"))[0].parent, outputs / "single")
    for job in (sorted(swept.glob("*/metrics.json"))[1].parent, outputs / "single"):
        (job / "metrics.json").unlink()
    proc = run_cli("report", "outputs", cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if "stopped before it finished" in line]
    assert len(lines) == 2 and "3 runs" in proc.stdout
    assert lines[0].startswith("- multirun/s/1_")
    assert lines[0].endswith(f"continue the sweep: aelab train resume={swept.relative_to(tmp_path)}")
    assert lines[1].startswith("- single:") and lines[1].endswith("continue it: aelab train resume=outputs/single")
    run_cli("train", "resume=outputs/single", cwd=tmp_path)
    assert (outputs / "single" / "metrics.json").is_file()


def test_sample_draws_from_each_job_of_a_sweep(sweep):
    proc = run_cli("sample", str(sweep), "sample.steps=3", "sample.count=5", cwd=sweep)
    written = sorted(sweep.glob("*/sample_sample.steps=3_sample.count=5.json"))
    assert len(written) == 4 and proc.stdout.count("aelab sample: ") == 4
    assert all(path.with_suffix(".png").is_file() for path in written)
    assert all([row["step"] for row in json.loads(path.read_text())["chain"]] == [0, 1, 2, 3] for path in written)
    report = run_cli("report", str(sweep), cwd=sweep)  # the chains' last state, folded over seeds like the rest
    assert "sample_* columns: the last state of sample_sample.steps=3_sample.count=5.json (chain) in 4 of 4 runs" \
        in report.stdout and "sample classes" in report.stdout
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        jobs = [p for p in written if f"reg.weight={row['reg.weight']}," in p.parent.name]
        last = [json.loads(path.read_text())["chain"][-1] for path in jobs]
        assert len(jobs) == 2 and float(row["sample_nearest_mse_mean"]) == pytest.approx(
            sum(state["nearest_mse"] for state in last) / 2)
        assert float(row["sample_classes_mean"]) == pytest.approx(sum(state["classes"] for state in last) / 2)
    langevin = ["sample.method=langevin", "sample.noise=0.3", "sample.steps=2", "sample.count=5"]
    run_cli("sample", str(sweep), *langevin, cwd=sweep)  # the newest record is the one reported, with its method
    report = run_cli("report", str(sweep), cwd=sweep)
    assert f"the last state of {output_name('sample', langevin)}.json (langevin) in 4 of 4 runs" in report.stdout


def test_report_names_a_damaged_sample_record(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    job = sorted(copy.glob("*/metrics.json"))[0].parent
    (job / "sample.json").write_text('{"chain": []}')
    proc = run_cli("report", str(copy), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and f"{job / 'sample.json'} is unreadable (not an aelab sample record); remove it" \
        in proc.stderr and "Traceback" not in proc.stderr


def test_report_of_a_folder_without_runs_is_a_clear_error(tmp_path):
    proc = run_cli("report", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no finished jobs" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_draws_features_again_when_told_another_value(sweep, tmp_path):
    """eval.feature_value (or eval.features) on aelab eval: EVAL_features.png beside its record, the
    run's own features.png kept; at the training value the same pixels, at typical other ones."""
    job = tmp_path / "job"
    shutil.copytree(sorted(p.parent for p in sweep.glob("*/metrics.json"))[0], job)
    own = (job / "features.png").read_bytes()
    proc = run_cli("eval", str(job), "eval.feature_value=1", "eval.probe=false", cwd=job)
    assert "eval_eval.feature_value=1_eval.probe=false_features.png" in proc.stdout
    proc = run_cli("eval", str(job), "eval.feature_value=typical", "eval.probe=false", cwd=job)
    assert (job / "features.png").read_bytes() == own

    def pixels(name):
        with Image.open(job / name) as image:
            return image.convert("L").tobytes()
    at_one = pixels("eval_eval.feature_value=1_eval.probe=false_features.png")
    assert at_one == pixels("features.png")
    assert pixels("eval_eval.feature_value=typical_eval.probe=false_features.png") != at_one
    run_cli("eval", str(job), "eval.threshold=0.2", "eval.probe=false", cwd=job)  # feature_value 1: the same picture
    assert not list(job.glob("eval_eval.threshold=0.2*_features.png"))


def test_a_run_trained_on_a_gpu_is_evaluated_and_sampled_here_with_device_cpu(sweep, tmp_path):
    """A run whose config says device=cuda, on a machine without a GPU: the error names device=cpu, and
    aelab eval / aelab sample take it (the device group's option, not only its keys)."""
    import torch

    job = tmp_path / "job"
    shutil.copytree(sorted(p.parent for p in sweep.glob("*/metrics.json"))[0], job)
    config = job / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("device:\n  name: cpu", "device:\n  name: cuda\n  index: null"))
    if not torch.cuda.is_available():
        proc = run_cli("eval", str(job), "eval.probe=false", cwd=job, check=False)
        assert proc.returncode == 2 and "device: no CUDA GPU is visible to torch; use device=cpu" in proc.stderr
    stored = json.loads((job / "metrics.json").read_text())["test"]
    proc = run_cli("eval", str(job), "device=cpu", "eval.probe=false", cwd=job)
    assert "wrote eval_device=cpu_eval.probe=false.json" in proc.stdout
    again = json.loads((job / "eval_device=cpu_eval.probe=false.json").read_text())["test"]
    assert again["mse"] == pytest.approx(stored["mse"], rel=1e-6)
    run_cli("sample", str(job), "device=cpu", "sample.steps=2", "sample.count=4", cwd=job)
    assert (job / "sample_device=cpu_sample.steps=2_sample.count=4.json").is_file()
    bad = run_cli("eval", str(job), "device=../train", cwd=job, check=False)
    assert bad.returncode == 2 and "device: unknown device '../train'; choose from: auto, cpu, cuda" in bad.stderr
    for command, group in (("eval", "eval"), ("sample", "sample")):  # only the device group's option is taken
        bad = run_cli(command, str(job), f"{group}=5", cwd=job, check=False)
        assert bad.returncode == 2 and f"got '{group}=5'" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_recomputes_metrics_with_other_noise_levels(sweep):
    job = sorted(p.parent for p in sweep.glob("*/metrics.json"))[0]
    stored = json.loads((job / "metrics.json").read_text())["test"]
    proc = run_cli("eval", str(job), cwd=job)
    assert proc.stdout.strip().splitlines()[-1] == f"wrote eval.json, eval_denoising.png in {job}"
    again = json.loads((job / "eval.json").read_text())["test"]
    for key in ("mse", "psnr", "sharpness", "population_sparsity", "sensitivity", "mse_gaussian", "probe_latent"):
        assert again[key] == pytest.approx(stored[key], rel=1e-6)
    run_cli("eval", str(job), "eval.noise.gaussian.noise_factor=0.9", "eval.probe=false", cwd=job)
    louder = json.loads(next(job.glob("eval_eval.noise.gaussian*.json")).read_text())["test"]
    assert louder["mse_gaussian"] > stored["mse_gaussian"] and louder["mse"] == pytest.approx(stored["mse"])
    run_cli("eval", str(job), "eval.noise.gaussian.noise_factor=[0.3,0.9]", "eval.probe=false", cwd=job)
    levels = json.loads(next(job.glob("eval_eval.noise.gaussian.noise_factor=[[]0.3,0.9[]]*.json")).read_text())["test"]
    assert "mse_gaussian" not in levels  # a list: one metric per level, each the number that level alone gives
    assert levels["mse_gaussian_0.3"] == pytest.approx(stored["mse_gaussian"], rel=1e-6)
    assert levels["mse_gaussian_0.9"] == pytest.approx(louder["mse_gaussian"], rel=1e-6)
    pictures = sorted(p.name for p in job.glob("eval*_denoising.png"))  # one per record, beside it
    assert pictures == sorted(p.name[:-len(".json")] + "_denoising.png" for p in job.glob("eval*.json"))
    assert len(pictures) == 3
    bad = run_cli("eval", str(job), "reg.weight=3", cwd=job, check=False)
    assert bad.returncode == 2 and "eval.* or device.*" in bad.stderr
    bad = run_cli("eval", str(job), "eval.noise={}", cwd=job, check=False)  # all kept: said, not run
    assert bad.returncode == 2 and "or every one with eval.noise=null" in bad.stderr and "Traceback" not in bad.stderr
    typo = run_cli("eval", str(job), "eval.treshold=0.2", cwd=job, check=False)
    assert typo.returncode == 2 and "eval.treshold: no such key (did you mean eval.threshold?)" in typo.stderr
    assert len(list(job.glob("eval*.json"))) == 3  # the failed calls wrote nothing
    quiet = run_cli("eval", str(job), "eval.noise=null", "eval.probe=false", cwd=job)  # no test noise: no picture
    assert quiet.stdout.strip().splitlines()[-1] == f"wrote eval_eval.noise=null_eval.probe=false.json in {job}"
    measured = json.loads((job / "eval_eval.noise=null_eval.probe=false.json").read_text())["test"]
    assert measured["mse"] == pytest.approx(stored["mse"]) and not [m for m in measured if m.startswith("mse_")]
    everyone = run_cli("eval", str(sweep), "eval.threshold=0.5", "eval.probe=false", cwd=sweep)  # each job
    written = sorted(sweep.glob("*/eval_eval.threshold=0.5_eval.probe=false.json"))
    assert len(written) == 4 and everyone.stdout.count("aelab eval: ") == 4
    for path in written:
        stored = json.loads((path.parent / "metrics.json").read_text())["test"]
        higher = json.loads(path.read_text())["test"]
        assert higher["population_sparsity"] <= stored["population_sparsity"]
        assert higher["mse"] == pytest.approx(stored["mse"])


def test_report_of_the_metrics_aelab_eval_recomputed(sweep, tmp_path):
    """aelab report SWEEP_DIR eval.KEY=VALUE ...: the test metrics of the aelab eval records those
    overrides name, in their own folder; the training-time report is left as it was."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    run_cli("report", str(copy), cwd=tmp_path)
    before = {name: (copy / name).read_bytes() for name in ("report.csv", "report.md")}
    overrides = ["eval.threshold=0.6", "eval.probe=false"]
    missing = run_cli("report", str(copy), *overrides, cwd=tmp_path, check=False)  # not evaluated yet
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert f"no finished job under {copy} holds eval_eval.threshold=0.6_eval.probe=false.json (aelab eval records " \
           f"there: " in missing.stderr and missing.stderr.strip().endswith(
               f"; write them: aelab eval {copy} eval.threshold=0.6 eval.probe=false")
    assert not list(copy.glob("report_*"))  # nothing written
    run_cli("eval", str(copy), *overrides, cwd=tmp_path)
    proc = run_cli("report", str(copy), *overrides, cwd=tmp_path)
    out = copy / "report_eval.threshold=0.6_eval.probe=false"
    assert "test metrics: those aelab eval eval.threshold=0.6 eval.probe=false recomputed " \
           "(eval_eval.threshold=0.6_eval.probe=false.json), not the end of training's" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith(f" in {out}")
    assert {name: (copy / name).read_bytes() for name in before} == before  # the training-time report: kept
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        jobs = [p for p in copy.glob(f"*reg.weight={row['reg.weight']},*")]
        recomputed = [json.loads((job / "eval_eval.threshold=0.6_eval.probe=false.json").read_text())["test"]
                      for job in jobs]
        trained = [json.loads((job / "metrics.json").read_text())["test"] for job in jobs]
        assert len(jobs) == 2 and float(row["population_sparsity_mean"]) == pytest.approx(
            sum(t["population_sparsity"] for t in recomputed) / 2)  # at the new threshold
        assert sum(t["population_sparsity"] for t in recomputed) < sum(t["population_sparsity"] for t in trained)
        assert float(row["mse_mean"]) == pytest.approx(sum(t["mse"] for t in trained) / 2)  # the same model
    assert (out / "metrics_vs_reg.weight.png").stat().st_size > 10_000
    dropped = sorted(copy.glob("*/eval_eval.threshold=0.6_eval.probe=false.json"))[0]
    dropped.unlink()  # a job without the record: said under the table, with how to write it; the rest reported
    proc = run_cli("report", str(copy), *overrides, cwd=tmp_path)
    assert "1 job(s) without results" in proc.stdout and "3 runs" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith(f"- {dropped.parent.name}: "))
    assert f"{dropped.parent.name}: no eval_eval.threshold=0.6_eval.probe=false.json (aelab eval records here: " \
           in line and line.endswith(f"; write it: aelab eval {copy} eval.threshold=0.6 eval.probe=false")
    bad = run_cli("report", str(copy), "reg.weight=3", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr == "error: override: takes KEY=VALUE overrides under eval.* or " \
        "device.*, e.g. eval.threshold=0.2, as given to aelab eval SWEEP_DIR; got 'reg.weight=3'\n"
    assert "Traceback" not in bad.stderr + missing.stderr and not list(copy.glob("report_reg*"))
    on_cpu = ["eval.probe=false", "device.name=cpu"]  # aelab eval takes device.* too, and names its record by them
    run_cli("eval", str(copy), *on_cpu, cwd=tmp_path)
    assert run_cli("report", str(copy), *on_cpu, cwd=tmp_path).stdout.strip().endswith(
        f" in {copy / 'report_eval.probe=false_device.name=cpu'}")
    usage = run_cli("report", cwd=tmp_path, check=False)
    assert usage.returncode == 2 and "usage: aelab report SWEEP_DIR [eval.KEY=VALUE ...]" in usage.stdout


def test_hparams_live_in_the_run_dir_not_a_sub_run(sweep):
    job = sorted(p.parent for p in sweep.glob("*/metrics.json"))[0]
    # no sub-run of add_hparams' making; only aelab sample's own TensorBoard runs, if it sampled the sweep, and
    # the Projector's folder of the last step (its files, no events)
    projector = f"{json.loads((job / 'metrics.json').read_text())['steps']:05d}"
    assert not [p for p in job.iterdir() if p.is_dir() and p.name not in (".hydra", projector)
                and not p.name.startswith("sample")]
    assert not list((job / projector).glob("**/events.out.tfevents.*"))
    acc = EventAccumulator(str(job))
    acc.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(
        acc.PluginTagToContent("hparams"))
    assert "~final/test_mse" in acc.Tags()["scalars"]
    assert {"~test/reconstructions", "~test/features", "~test/denoising"} <= set(acc.Tags()["images"])
    assert {"~test/latent_activations", "~test/lifetime_sparsity"} <= set(acc.Tags()["histograms"])
    for name in ("reconstructions.png", "features.png", "histograms.png", "denoising.png"):
        with Image.open(job / name) as image:
            assert image.width > 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_lists_scalars_and_images(sweep):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--port", str(port),
                               "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    on_disk = {p.parent.relative_to(sweep).as_posix() for p in sweep.glob("**/events.out.tfevents.*")}
    sampled = {run for run in on_disk if "/" in run}  # aelab sample's runs inside the jobs, where it sampled them
    try:
        deadline, scalars = time.time() + 90, {}
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    scalars = json.load(r)
                if set(scalars) == on_disk:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert set(scalars) == on_disk and len(on_disk - sampled) == 4  # one TensorBoard run per job
        for run, tags in scalars.items():
            assert ({"sample/nearest_mse", "sample/classes", "test_images/nearest_mse"} if run in sampled else
                    {"train/total", "train/recon", "train/reg", "val/total", "val/recon", "val/reg"}) <= set(tags)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags", timeout=5) as r:
            images = json.load(r)
        assert all(("sample/chains" if run in sampled else "val/clean_corrupted_reconstructed") in tags
                   for run, tags in images.items())
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_compose_to_a_sweep(name):
    if name == "optuna_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs pip install 'aelab[sweep]'")
    with initialize_config_module("aelab.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params and all(len(str(v).split(",")) >= 2 for v in params.values())
    assert f"experiment/{name}" in cfg.hydra.sweep.dir
    for key in params:
        group = key.split(".")[0]
        assert group in cfg, key


def test_noise_levels_preset_tests_every_model_at_every_level():
    """Exercise 5 asks whether a model trained on high noise denoises low noise: each job of the preset
    measures the gaussian test error at each training level, besides the other corruptions; a model
    trained without noise is the baseline (its test input at 0.0 is the clean one, mse)."""
    from aelab.build import eval_settings
    with initialize_config_module("aelab.configs", version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=noise_levels"], return_hydra_config=True)
    levels = cfg.hydra.sweeper.params["corruption.noise_factor"].split(",")
    assert levels[0] == "0.0" and levels[1:] == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    noise = eval_settings(cfg.eval, (1, 8, 8)).noise
    assert list(noise) == [f"gaussian_{level}" for level in levels[1:]] + ["salt_pepper", "masking", "block"]


def test_eight_seed_exercises_are_presets():
    assert set(EXPERIMENTS) >= {"loss_comparison", "latent_dim_search", "l1_sweep", "kl_sweep", "l1_vs_kl",
                                "contractive_lambda", "noise_levels", "noise_types"}


def test_noise_level_sweep_draws_train_noise_by_test_noise(tmp_path, monkeypatch):
    """noise_levels (Exercise 5) tests each model at every level: the heatmap's columns are the test inputs
    in level order (0.25 before 1), each column's lowest error framed; the line plot draws a panel per
    setting of the other swept key, a line per test input, keyed once."""
    import warnings
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import Job, Row

    tests = {"mse": 0.01, "mse_gaussian_1": 0.05, "mse_gaussian_0.25": 0.02, "mse_masking": 0.03}
    rows = []
    for loss in ("mse", "bce"):
        for level, shift in (("0.1", 0.0), ("0.5", 0.004)):
            setting = {"corruption.noise_factor": level, "loss": loss}
            # the low-noise model is best on clean and 0.25, the high-noise one on 1 and masking
            metrics = {m: v + (shift if m in ("mse", "mse_gaussian_0.25") else -shift) for m, v in tests.items()}
            run = tmp_path / f"{loss}{level}"
            run.mkdir()
            rows.append(Row(setting, [Job(run, setting, {}, metrics)]))
    assert plots.noise_metrics(rows) == ["mse", "mse_gaussian_0.25", "mse_gaussian_1", "mse_masking"]
    measured = {"mse": 0.02, "mse_gaussian_0.3": 0.03, "mse_gaussian_0.1": 0.02, "mse_salt_pepper": 0.04,
                "mse_masking": 0.04, "mse_block": 0.04}  # in eval.noise's order, the levels as listed
    assert plots.noise_metrics([Row({}, [Job(tmp_path, {}, {}, measured)])]) == [
        "mse", "mse_gaussian_0.1", "mse_gaussian_0.3", "mse_salt_pepper", "mse_masking", "mse_block"]
    seen = {}
    real_save = plots.save

    def save(fig, path):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            seen[path.name] = fig
            return real_save(fig, path)
    monkeypatch.setattr(plots, "save", save)
    paths = plots.make_plots(rows, [job for row in rows for job in row.jobs], ["corruption.noise_factor", "loss"],
                             tmp_path)
    assert {"robustness_heatmap.png", "denoising_vs_noise.png"} <= {p.name for p in paths}
    (heat, _) = seen["robustness_heatmap.png"].axes
    assert [t.get_text() for t in heat.get_xticklabels()] == ["none", "gaussian_0.25", "gaussian_1", "masking"]
    framed = sorted((int(p.get_x() + 0.5), int(p.get_y() + 0.5)) for p in heat.patches)
    low = [r.label for r in rows].index("corruption.noise_factor=0.1, loss=mse")
    high = [r.label for r in rows].index("corruption.noise_factor=0.5, loss=mse")
    assert framed == [(0, low), (1, low), (2, high), (3, high)]
    del rows[0].jobs[0].metrics["mse_masking"]  # `aelab report outputs` over runs tested differently
    plots.robustness_heatmap(rows, tmp_path)
    (heat, _) = seen["robustness_heatmap.png"].axes
    framed = sorted((int(p.get_x() + 0.5), int(p.get_y() + 0.5)) for p in heat.patches)
    assert framed[3] == (3, high)  # the untested cell is blank, never the best
    assert "-" in [t.get_text() for t in heat.texts]
    lines = seen["denoising_vs_noise.png"]
    panels = [ax for ax in lines.axes if ax.containers]
    assert [ax.get_title() for ax in panels] == ["loss=mse", "loss=bce"]
    assert all(len(ax.containers) == 4 for ax in panels)
    assert [t.get_text() for t in lines.legends[0].get_texts()] == [
        "clean test input", "test gaussian_0.25", "test gaussian_1", "test masking"]
    mse_panel = panels[0]
    assert list(mse_panel.containers[2].lines[0].get_ydata()) == pytest.approx([0.05, 0.046])
    assert len(lines.axes) == 2  # runs without score_cos (an older aelab's): the MSE row alone
    for row in rows:  # the gaussian levels' score estimate: a row of panels below, each level in its MSE line's colour
        row.jobs[0].metrics.update({"score_cos_gaussian_0.25": 0.4, "score_cos_gaussian_1": 0.7
                                    + (0.1 if row.setting["corruption.noise_factor"] == "0.5" else 0)})
    plots.denoising_vs_noise(rows, tmp_path)
    lines = seen["denoising_vs_noise.png"]
    top, bottom = lines.axes[:2], lines.axes[2:4]  # row by row
    assert [len(ax.containers) for ax in top + bottom] == [4, 4, 2, 2]
    assert [ax.get_title() for ax in top] == ["loss=mse", "loss=bce"]
    assert list(bottom[0].containers[1].lines[0].get_ydata()) == pytest.approx([0.7, 0.8])
    assert bottom[0].containers[1].lines[0].get_color() == top[0].containers[2].lines[0].get_color()  # gaussian_1
    assert "score" in bottom[0].get_ylabel() and bottom[0].get_xlabel().startswith("training noise_factor")


def test_eval_of_a_folder_goes_on_past_a_bad_run_and_reads_older_runs(sweep, tmp_path):
    """`aelab eval FOLDER`: a run saved by an older aelab (no eval section and fewer trainer keys in its
    config, a checkpoint of the model, optimizer, epoch and step only) is evaluated with today's
    defaults for what it lacks; a run whose
    checkpoint is damaged is named in its own error line and the others are evaluated all the same
    (exit 2); a bad override, the same for every run, is said once and nothing is written."""
    import torch
    import yaml

    folder = tmp_path / "runs"
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))[:3]
    for job in jobs:
        shutil.copytree(job, folder / job.name, ignore=shutil.ignore_patterns("eval*.json"))
    old, damaged, fine = (folder / job.name for job in jobs)
    config = yaml.safe_load((old / ".hydra" / "config.yaml").read_text())
    del config["eval"]
    for key in ("cuda_graph", "compile", "tf32"):  # trainer keys added after the first runs
        del config["trainer"][key]
    (old / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    torch.save({"model": state["model"], "optimizer": state["optimizer"], "epoch": 2, "step": 10,
                "config": state["config"]}, old / "checkpoint.pt")
    (damaged / "checkpoint.pt").write_bytes((damaged / "checkpoint.pt").read_bytes()[:1000])

    typo = run_cli("eval", str(folder), "eval.treshold=0.2", cwd=tmp_path, check=False)
    assert typo.returncode == 2 and typo.stderr.count("error: ") == 1 and "did you mean eval.threshold?" in typo.stderr
    assert not list(folder.glob("*/eval*.json"))

    proc = run_cli("eval", str(folder), "eval.probe=false", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {damaged}: RUN_DIR: {damaged / 'checkpoint.pt'} is unreadable or truncated "
        f"(not a whole file written by torch.save); evaluate another run, or train this one again"]
    for run in (old, fine):
        stored = json.loads((run / "metrics.json").read_text())["test"]
        again = json.loads((run / "eval_eval.probe=false.json").read_text())["test"]
        for key in ("mse", "population_sparsity", "sensitivity", "mse_gaussian"):
            assert again[key] == pytest.approx(stored[key], rel=1e-6)
    assert not list(damaged.glob("eval*.json"))


def test_contractive_trade_off_shows_what_noise_adds(tmp_path, monkeypatch):
    """recon_vs_sensitivity of a contractive sweep: the sensitivities span seven decades, so the axis is
    logarithmic (a linear one piled four of five points at zero); the points are one curve in order of
    sensitivity; the second panel draws, per test noise, its error minus the clean error."""
    from aelab.sweeps import plots
    from aelab.sweeps.jobs import Job, Row

    measured = {"0.0001": (3.8, 0.022, 0.033), "0.001": (0.74, 0.0255, 0.034), "0.01": (0.076, 0.035, 0.040),
                "0.1": (2.7e-4, 0.0739, 0.0739), "1": (3.8e-7, 0.0739, 0.0739)}
    rows = [Row({"reg.weight": w}, [Job(Path(w), {"reg.weight": w}, {}, {"sensitivity": j, "mse": m,
                                                                        "mse_gaussian": g})])
            for w, (j, m, g) in measured.items()]
    seen = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: seen.setdefault(path.name, fig) and path)
    plots.trade_off(rows, "sensitivity", "recon_vs_sensitivity", tmp_path)
    recon, gap = seen["recon_vs_sensitivity.png"].axes
    assert recon.get_xscale() == "log" and gap.get_xscale() == "log"
    (curve,) = recon.lines
    assert list(curve.get_xdata()) == sorted(j for j, _, _ in measured.values())
    (noise,) = gap.lines
    by_x = sorted(measured.values())
    assert list(noise.get_ydata()) == pytest.approx([g - m for _, m, g in by_x])
    assert [t.get_text() for t in gap.get_legend().get_texts()] == ["test gaussian"]
    assert noise.get_linestyle() == "-"  # one swept key: one curve
    grid = [Row({"corruption.noise_factor": n, "reg.weight": w}, [Job(Path(n + w), {}, {}, {
        "sensitivity": j, "mse": 0.02, "mse_gaussian": 0.02 + g})])
        for n, w, j, g in (("0.0", "0.0", 12.9, 0.017), ("0.3", "0.0", 5.2, 0.004), ("0.0", "1e-3", 0.7, 0.008))]
    plots.trade_off(grid, "sensitivity", "grid_vs_sensitivity", tmp_path)
    recon, gap = seen["grid_vs_sensitivity.png"].axes
    assert not recon.lines and gap.lines[0].get_linestyle() == "None"  # a grid's settings are no curve
    numbers = {t.get_text(): t.xy for t in gap.texts}  # as in the first panel, above each column of points
    assert numbers == {"1": (12.9, pytest.approx(0.017)), "2": (5.2, pytest.approx(0.004)),
                       "3": (0.7, pytest.approx(0.008))}
    sparsity = [Row({"reg.weight": w}, [Job(Path(w), {"reg.weight": w}, {}, {"population_sparsity": p, "mse": 0.02})])
                for w, p in (("0.001", 0.6), ("0.01", 0.3))]
    plots.trade_off(sparsity, "population_sparsity", "recon_vs_sparsity", tmp_path)
    (only,) = seen["recon_vs_sparsity.png"].axes  # no noise panel for a sparsity sweep; a narrow span: linear
    assert only.get_xscale() == "linear"


def test_report_marks_jobs_that_had_not_converged(sweep, tmp_path):
    """metrics.json's `converged` per job: the table's converged column counts them per setting, and a
    line under it says that the unconverged ones measure the training budget."""
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    for job, converged in zip(jobs, (True, False, True, True)):
        record = json.loads((job / "metrics.json").read_text())
        record["converged"] = converged
        (job / "metrics.json").write_text(json.dumps(record))
    out = run_cli("report", str(sweep), cwd=tmp_path).stdout
    assert "1 job(s) had not converged" in out and "trainer.epochs=MORE" in out
    table = list(csv.DictReader((sweep / "report.csv").open()))
    assert sorted(row["converged"] for row in table) == ["1/2", "2/2"]
    assert "1 job(s) had not converged" in (sweep / "report.md").read_text()
