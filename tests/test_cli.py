"""End to end through the real CLI, as a user runs it: in this process through the console script's
entry point, and one run and one sweep in a fresh process (`python -m aelab`)."""
import json
from pathlib import Path

import numpy as np
import pytest
from aelab.build import GROUPS
from conftest import FAST, events, run_cli

SIX_TAGS = {f"{split}/{term}" for split in ("train", "val") for term in ("total", "recon", "reg")}
ROOT = Path(__file__).resolve().parents[1]


def option_names(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


def test_top_level_help_lists_commands(tmp_path):
    out = run_cli("--help", cwd=tmp_path).stdout
    assert "train" in out and "usage: aelab" in out


def test_version_names_aelab_torch_and_hydra(tmp_path):
    from importlib.metadata import version
    out = run_cli("--version", cwd=tmp_path).stdout
    assert out.startswith(f"aelab {version('aelab')} (torch {version('torch')}, hydra-core {version('hydra-core')}")


def test_unknown_command_is_a_one_line_error(tmp_path):
    proc = run_cli("trian", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command 'trian'; choose from: train" in proc.stderr


def test_train_help_and_cfg_job(tmp_path):
    helped = run_cli("train", "--help", cwd=tmp_path).stdout
    for group in GROUPS:
        assert f"{group}:" in helped  # Hydra lists each config group with its options
    printed = run_cli("train", "--cfg", "job", "reg=l1", "reg.weight=0.5", cwd=tmp_path).stdout
    assert "name: l1" in printed and "weight: 0.5" in printed
    assert not (tmp_path / "outputs").exists()  # --cfg only prints


def test_bce_kl_run_writes_events_metrics_and_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "loss=bce", "reg=kl", "trainer.epochs=2", "trainer.log_every=5", "device=cpu",
                   "eval.noise.masking.prob=[0.1,0.5]", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == "results in run; look at them: tensorboard --logdir run"
    acc = events(run_dir)
    assert SIX_TAGS <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("val/total")) == 2 and len(acc.Scalars("train/total")) >= 2
    assert "val/clean_corrupted_reconstructed" in acc.Tags()["images"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert metrics[split]["total"] == pytest.approx(metrics[split]["recon"] + 0.1 * metrics[split]["reg"],
                                                        rel=1e-5)
    assert {"mse", "bce", "mae"} <= set(metrics["test"])
    masked = [metrics["test"][f"mse_masking_{level}"] for level in ("0.1", "0.5")]  # a list: each level measured
    assert "mse_masking" not in metrics["test"] and all(m > 0 for m in masked) and masked[0] != masked[1]
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "checkpoint.pt").exists()
    # each epoch logs how sparse the validation codes are: the last equals the saved model's own
    from aelab.training import checkpoint
    from aelab.build import build, run_config
    from aelab.training.monitor import codes
    parts = build(run_config(run_dir, []))
    checkpoint.load(parts, run_dir)
    latent = codes(parts.model, parts.data.val.x, parts.trainer.batch_size)
    active = latent > 0.1
    expected = {"population_sparsity": active.float().mean().item(), "mean_activation": latent.mean().item(),
                "dead_fraction": (active.sum(0) == 0).float().mean().item()}
    for name, value in expected.items():
        logged = acc.Scalars(f"val/{name}")
        assert len(logged) == 2 and logged[-1].value == pytest.approx(value, rel=1e-5, abs=1e-7)
    (last,) = [line for line in proc.stdout.splitlines() if line.startswith("epoch 2/2 ")]
    assert last.endswith(f"  active {acc.Scalars('val/population_sparsity')[-1].value:.3g}")  # said each epoch
    # the test codes: latents.png (in TensorBoard too) and, for the Projector tab, the saved model's own codes
    assert (run_dir / "latents.png").is_file() and "~test/latents" in acc.Tags()["images"]
    (folder,) = (run_dir / f"{metrics['steps']:05d}").iterdir()
    test = parts.data.test
    assert np.loadtxt(folder / "tensors.tsv", delimiter="\t") == pytest.approx(codes(parts.model, test.x, parts.trainer.batch_size).numpy(), abs=1e-6)
    assert (folder / "metadata.tsv").read_text().split() == [str(label) for label in test.labels.tolist()]
    assert f"{metrics['steps']:05d}/{folder.name}/sprite.png" in (run_dir / "projector_config.pbtxt").read_text()


def test_default_run_learns(tmp_path):
    """The validation loss falls; TensorBoard has it every epoch, and the validation picture at the epochs
    the terminal shows (the first 10, every 10th, the last)."""
    run_dir = tmp_path / "run"
    run = run_cli("train", "trainer.epochs=12", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    acc = events(run_dir)
    val = acc.Scalars("val/total")
    assert val[-1].value < 0.6 * val[0].value
    shown = [val[epoch - 1].step for epoch in (*range(1, 11), 12)]
    assert [e.step for e in acc.Images("val/clean_corrupted_reconstructed")] == shown
    assert "epoch 12/12" in run.stdout and "epoch 11/12" not in run.stdout


@pytest.mark.parametrize("group,extra", [
    ("model", []), ("loss", []), ("reg", ["model=sparse_kl"]), ("corruption", []), ("optim", []),
    ("data", ["trainer.batch_size=16"]), ("sched", ["trainer.patience=1", "trainer.min_delta=0.01"]),
])
def test_every_option_runs_one_epoch(tmp_path, synthetic_root, group, extra):
    """One multirun per group: every YAML option of the group trains one epoch and writes metrics."""
    sweep = tmp_path / "sweep"
    # digits, the default, runs in every other test; the torchvision sets share data.root
    options = [o for o in option_names(group) if not (group == "data" and o == "digits")]
    run_cli("train", "-m", f"{group}={','.join(options)}", *FAST, *extra, f"paths.data={synthetic_root}"
            if group == "data" else "trainer.log_every=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == len(options)
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["test"]["mse"] > 0 and metrics["steps"] >= 1


def test_devices(tmp_path):
    import torch
    run_cli("train", "device=cpu", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'cpu'}", cwd=tmp_path)
    auto = run_cli("train", "device=auto", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'auto'}", cwd=tmp_path)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["device"].startswith(expected), auto.stdout
    cuda = run_cli("train", "device=cuda", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'cuda'}", cwd=tmp_path,
                   check=False)
    if not torch.cuda.is_available():
        assert cuda.returncode == 2 and "device: no CUDA GPU is visible" in cuda.stderr
        assert "Traceback" not in cuda.stderr


def test_two_job_multirun_makes_two_run_dirs(tmp_path):
    proc = run_cli("train", "-m", "reg=l1", "reg.weight=1e-3,1e-1", *FAST, cwd=tmp_path)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    where = sweep.relative_to(tmp_path)  # said last, as the user would type it where they are
    assert proc.stdout.strip().splitlines()[-1] == (
        f"2 job(s) with results in {where}; the table and plots: aelab report {where}")
    jobs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/metrics.json"))
    names = [p.parent.name for p in jobs]
    assert len(names) == 2 and names[0].startswith("0_") and names[1].startswith("1_")
    assert "reg.weight=0.001" in names[0] and "reg.weight=0.1" in names[1]
    for job in jobs:
        assert list(job.parent.glob("events.out.tfevents.*"))  # one TensorBoard run per job


@pytest.mark.parametrize("args,message", [
    (["reg=kll"], "error: reg: unknown option 'kll'; choose from: contractive, kl, l1, none"),
    (["reg=l1", "reg.weight=-1"], "reg.weight: must be >= 0, got -1"),
    (["reg=l1", "reg.weight=abc"], "reg.weight: must be a number, got 'abc'"),
    (["reg.wieght=1"], "error: reg.wieght: no such key (did you mean reg.weight?)"),
    (["corruption=block", "corruption.size=20"], "corruption.size: must be <= the image side 8"),
    (["eval.noise.masking.prob=[0.1,1.5]"], "eval.noise.masking.prob: must be in [0, 1], got 1.5"),
    (["sample.steps=0"], "sample.steps: must be >= 1, got 0"),
    (["eval.noise={}"], "eval.noise: {} drops nothing: a dict merges into the entries there (gaussian, salt_pepper, "
                        "masking, block); drop one with ~eval.noise.gaussian, or every one with eval.noise=null"),
    (["-m", "reg.weight=1e-3,1e-2", "--cfg", "job"], "error: -m: -m and --cfg cannot be combined"),
])
def test_bad_input_fails_with_a_clear_message(tmp_path, args, message):
    proc = run_cli("train", *args, "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_remaining_keys_run_from_the_cli(tmp_path):
    """loss.reduction=sum, the Hutchinson estimator with several probes, on the conv model; eval.projector."""
    run_dir = tmp_path / "run"
    run_cli("train", *FAST, "model=conv", "loss.reduction=sum", "reg=contractive", "reg.method=hutchinson",
            "reg.samples=2", "optim=adamw", "eval.projector=25", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["recon"] == pytest.approx(metrics["test"]["mse"] * 64, rel=1e-4)  # sum over 8x8 pixels
    assert metrics["test"]["reg"] > 0 and metrics["test"]["sensitivity"] > 0
    (folder,) = (run_dir / f"{metrics['steps']:05d}").iterdir()  # the Projector's: the first 25 test codes
    assert np.loadtxt(folder / "tensors.tsv", delimiter="\t").shape == (25, 32)


def test_terminal_text_is_printed_as_written(capsys, tmp_path):
    """Square brackets in messages and table cells are text, not rich markup ('aelab[sweep]', '[relu]')."""
    from aelab import console
    from aelab.sweeps.jobs import Job, Row
    from aelab.sweeps.report import print_table
    console.error("install it with: pip install 'aelab[sweep]'")
    with console.progress(1) as bar:
        bar.log("cuda graph: capture failed ([bold]x[/])")
    job = Job(tmp_path, {"model.act": "[relu]"}, {}, {"mse": 0.5})
    title = f"aelab report: {tmp_path / ('a-long-sweep-folder-name-' * 4)}[1] (1 runs)"
    print_table([Row({"model.act": "[relu]"}, [job])], ["model.act"], ["mse"], title)
    out, err = capsys.readouterr()
    assert "pip install 'aelab[sweep]'" in err
    assert "capture failed ([bold]x[/])" in out and "[relu]" in out
    assert title in out.splitlines()[-6]  # piped, a title wider than the table stays whole on its line
