"""Reliability: one-line errors, NaN stops, SIGTERM/SIGINT checkpoints, bitwise resume, atomic saves."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aelab.training import checkpoint
from aelab.build import build, check_compatible
from aelab.training.checkpoint import Position
from aelab.data import Split, Splits
from aelab.registry import ConfigError
from conftest import cli, run_cli

LONG = ["trainer.epochs=12", "trainer.batch_size=16", "trainer.log_every=7", "device=cpu",
        "corruption=gaussian", "reg=l1"]


def assert_clean_failure(proc, code, text):
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("args,text", [
    (["model=resnet"], "model: unknown option 'resnet'; choose from: contractive, conv, mlp, sparse_kl, sparse_l1"),
    (["trainer.epohcs=3"], "trainer.epohcs: no such key (did you mean trainer.epochs?); aelab train --cfg job "
                           "lists the keys"),
    (["+trainer.epohcs=3"], "trainer.epohcs: no such key (did you mean trainer.epochs?); trainer has: epochs, "
                            "batch_size, seed"),  # added, it would be read by nothing
    (["+eval.probes=false"], "eval.probes: no such key (did you mean eval.probe?); eval has: threshold, noise"),
    (["model=mlp", "model.hiden=[64]"], "model.hiden: no such key (did you mean model.hidden?)"),
    (["epochs=5"], "epochs: no such key (did you mean trainer.epochs?); aelab train --cfg job lists the keys"),
    (["regg=l1"], "regg: no such key (did you mean reg?); aelab train --cfg job lists the keys"),  # no +regg=l1
    # a top-level key added with + only tags the run: one spelled like a key aelab reads is that key, mistyped
    (["+epochs=2"], "epochs: no such key (did you mean trainer.epochs?); a top-level +KEY=VALUE only names the "
                    "run, nothing reads it"),
    (["+regg=l1"], "regg: no such key (did you mean reg?); a top-level +KEY=VALUE only names the run"),
    # the config printed is checked as a run would check it, values too
    (["--cfg", "job", "trainer.epochs=-3"], "trainer.epochs: must be >= 1, got -3"),
    (["trainer.lr=0.1"], "trainer.lr: no such key (did you mean optim.lr?)"),
    (["noise_factor=0.3"], "noise_factor: no such key (did you mean corruption.noise_factor, with corruption=gaussian?)"),
    (["reg.rho=0.1"], "reg.rho: no such key under reg=none; it is a key of reg=kl: add reg=kl"),
    (["data.download=true"], "data.download: no such key under data=digits; it is a key of data=fashion_mnist"),
    (["device=cpu", "device.index=0"], "device.index: no such key under device=cpu; it is a key of device=cuda: "
                                       "add device=cuda"),  # a key whose default is null
    (["trainer.foo=true"], "trainer.foo: no such key; aelab train --cfg job lists the keys"),
    (["paths.cache=x"], "paths.cache: no such key; to add a new key, write +paths.cache=x"),  # for ${paths.cache}
    (["model.hidden=[256,"], "model.hidden: cannot read 'model.hidden=[256,'"),
    (["reg=l1,kl"], "reg: 'reg=l1,kl' is a sweep: add -m to run one job per value"),
    (["-m", "reg=l1,kll"], "reg: unknown option 'kll'; choose from: contractive, kl, l1, none"),
    (["-m", "reg=l1", "reg.weight=interval(0,1)"], "reg.weight: interval(...) is a search range for the Optuna"),
    # every job of a sweep is checked before the first one starts, not when its turn comes
    (["-m", "reg=l1", "reg.weight=1e-3,-1"], "reg.weight: must be >= 0, got -1 (job 1 of the sweep: reg=l1 "
                                             "reg.weight=-1)"),
    (["-m", "reg=l1,kl", "model.latent_activation=relu"], "model.latent_activation: reg=kl needs latent activations "
                                                          "in (0, 1)"),
    (["-m", "model=mlp,conv", "optim.lr=0.1,-1"], "optim.lr: must be > 0, got -1 (job 1 of the sweep: model=mlp "
                                                  "optim.lr=-1)"),
    (["-m", "corruption=block", "corruption.size=3,9"], "corruption.size: must be <= the image side 8 (images are "
                                                        "8x8), got 9 (job 1"),
    (["-m", "+experiment=l1_sweep", "model.latent_dim=0"], "model.latent_dim: must be >= 1, got 0 (job 0 of the sweep: "
                                                           "reg.weight=0.0001 +experiment=l1_sweep model.latent_dim=0)"),
    (["-m", "trainer.epochs=2,0"], "trainer.epochs: must be >= 1, got 0 (job 1"),
    (["-m", "trainer.batch_size=64,4096"], "trainer.batch_size: must be <= the 1257 training samples of data=digits, "
                                           "got 4096 (job 1 of the sweep: trainer.batch_size=4096)"),  # data read here
    (["-m", "data.val_fraction=0.1,0.9"], "val_fraction + test_fraction must be < 1, got 1.05 (job 1"),
    # data files not on this machine (a SLURM job's node may have them): the rest is checked with its image shape
    (["-m", "data=mnist", "paths.data=/nonexistent", "reg=l1", "reg.weight=1,-1"], "reg.weight: must be >= 0, got -1 "
                                                                                   "(job 1 of the sweep: data=mnist"),
    (["data=null"], "data: unknown option 'null'"),
    (["trainer=3"], "trainer: is a section of settings, not a value; set one of its keys, e.g. trainer.epochs="),
    (["~reg"], "reg: is a section of settings, not a value; choose one of its options: contractive, kl, l1, none"),
    (["~trainer.epochs"], "trainer.epochs: is missing from the config; put it back, e.g. +trainer.epochs=VALUE"),
    (["trainer.epochs=???"], "trainer.epochs: has no value; set it, e.g. trainer.epochs=VALUE"),
    (["reg=l1", "reg.weight=-0.1"], "reg.weight: must be >= 0"),
    (["reg=l1", "reg.weight=lots"], "reg.weight: must be a number"),
    (["reg=kl", "reg.rho=1.2"], "reg.rho: must be in (0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas: must be two numbers [beta1, beta2], e.g. [0.9, 0.999], got [0.9]"),
    (["reg=kl", "reg.rho=0"], "reg.rho: must be in (0, 1)"),
    (["corruption=salt_pepper", "corruption.prob=1.5"], "corruption.prob: must be in [0, 1]"),
    (["corruption=gaussian", "corruption.noise_factor=-0.2"], "corruption.noise_factor: must be >= 0"),
    (["corruption=block", "corruption.size=12"], "corruption.size: must be <= the image side 8"),
    (["reg=kl", "model.latent_activation=relu"], "model.latent_activation: reg=kl needs latent activations"),
    (["device=cuda"], "device: no CUDA GPU is visible"),
    (["data=mnist", "paths.data=/nonexistent"], "data.root: no MNIST files under /nonexistent/MNIST/raw"),
    (["model.latent_dim=0"], "model.latent_dim: must be >= 1"),
    (["model.hidden=[256,0]"], "model.hidden: must be >= 1"),
    (["trainer.batch_size=100000"], "trainer.batch_size: must be <= the 1257 training samples"),
    (["trainer.epochs=0"], "trainer.epochs: must be >= 1"),
    (["device=cpu", "trainer.cuda_graph=on"], "trainer.cuda_graph: =on needs a CUDA device, but device is cpu"),
    (["trainer.cuda_graph=sometimes"], "trainer.cuda_graph: must be one of auto, on, off, got 'sometimes'"),
    (["trainer.compile=1"], "trainer.compile: must be true or false, got 1"),
    (["eval.probe=yes"], "eval.probe: must be true or false, got 'yes'"),
    (["eval.projector=-1"], "eval.projector: must be >= 0, got -1"),
    (["eval.feature_value=abc"], "eval.feature_value: must be a code value > 0 or typical, got 'abc'"),
    (["eval.noise.gaussian=null"], "eval.noise.gaussian.noise_factor: missing value; add "
                                   "eval.noise.gaussian.noise_factor=... on the command line"),  # the fix: the whole key
    (["eval.noise={}"], "eval.noise: {} drops nothing"),
    (["eval.noise=5"], "eval.noise: takes corruptions and their settings, e.g. eval.noise.gaussian.noise_factor=0.3, "
                       "or null for none; got 5"),
    (["eval.noise.gaussian=5"], "eval.noise.gaussian: takes its settings by key, e.g. "
                                "eval.noise.gaussian.noise_factor=5; got 5"),
    (["model.encoder_activation=[relu]"], "model.encoder_activation: unknown activation '['relu']'; choose from: "),
    (["data=mnist", "paths.data=5"], "data.root: no MNIST files under 5/MNIST/raw"),  # a folder named 5
    (["+eval.noise.none=1"], "eval.noise.none: takes its settings by key, e.g. eval.noise.none=null; got 1"),
    (["-m", "eval.noise={}", "trainer.epochs=1,2"], "eval.noise: {} drops nothing"),
    # a value of the wrong shape: the shape the key takes, with the value where it would go
    (["eval.noise.gaussian=[0.1,0.3]"], "eval.noise.gaussian: is a section of settings, not a value; set one of its "
                                        "keys, e.g. eval.noise.gaussian.noise_factor=[0.1,0.3]"),
    (["eval.noise=[1,2]"], "eval.noise: is a section of settings, not a value; set one of its keys, e.g. "
                           "eval.noise.gaussian.noise_factor=[1,2]"),  # down to a setting
    (["model.hidden={a:1}"], "model.hidden: takes a list, e.g. model.hidden=[256,128]; got {a:1}"),
    (["eval={noise:{gaussian:[0.1,0.2]}}"], "eval.noise.gaussian: is a section of settings, not a value; set one of "
                                            "its keys, e.g. eval.noise.gaussian.noise_factor=[0.1,0.2]"),  # inside
    (["-m", "eval.noise.gaussian=[1,2]", "trainer.epochs=1,2"], "eval.noise.gaussian: is a section of settings"),
    (["trainer={a:1}"], "trainer.a: no such key; aelab train --cfg job lists the keys"),  # the key inside the dict
    # the calls that print the config check it as a run would
    (["--cfg", "job", "reg=kll"], "reg: unknown option 'kll'; choose from: contractive, kl, l1, none"),
    (["-c", "job", "trainer.epohcs=3"], "trainer.epohcs: no such key (did you mean trainer.epochs?)"),
    (["--cfg=job", "--resolve", "model.hidden={a:1}"], "model.hidden: takes a list"),
    (["--help", "reg=kll"], "reg: unknown option 'kll'"),
    # the sched group and the early-stopping keys
    (["sched=cosin"], "sched: unknown option 'cosin'; choose from: cosine, none, onecycle, plateau"),
    (["sched.factor=2"], "sched.factor: must be"),
    (["sched=cosine", "sched.warmup_epochs=-1"], "sched.warmup_epochs: must be >= 0, got -1"),
    (["sched=onecycle", "sched.pct_start=1"], "sched.pct_start: must be"),
    (["trainer.patience=0"], "trainer.patience: must be >= 1, got 0"),
    (["trainer.min_delta=1.5"], "trainer.min_delta: must be"),
    (["trainer.min_epochs=-2"], "trainer.min_epochs: must be >= 0, got -2"),
])
def test_bad_input_is_one_clear_line(tmp_path, capfd, args, text):
    """Through the console script's entry point, in process (test_cli.py runs a few as subprocesses)."""
    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out, err = cli(capfd, "train", *args, f"hydra.run.dir={tmp_path / 'run'}",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2
    assert text in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()  # nothing ran, nothing left


@pytest.mark.parametrize("override,text", [
    ("eval.noise.gaussian=[0.6,0.8]", "eval.noise.gaussian: is a section of settings, not a value; set one of its keys, "
                                      "e.g. eval.noise.gaussian.noise_factor=[0.6,0.8]"),
    ("eval.noise={gaussian:[0.6]}", "e.g. eval.noise.gaussian.noise_factor=[0.6]"),  # the key inside the dict
])
def test_eval_overrides_of_the_wrong_shape_name_the_shape(tmp_path, make_cfg, override, text):
    """`aelab eval RUN_DIR OVERRIDE` reads a finished run's saved config (build.run_config) and applies
    the overrides as the command line's are: a list where a section goes gets the same fix."""
    from omegaconf import OmegaConf
    from aelab.build import run_config

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(make_cfg("device=cpu"), tmp_path / ".hydra" / "config.yaml")
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # run_config reads only the config
    with pytest.raises(ConfigError) as error:
        run_config(tmp_path, [override])
    assert text in str(error.value) and len(str(error.value).splitlines()) == 1


def test_bce_with_data_outside_unit_interval_is_refused(make_cfg):
    parts = build(make_cfg("device=cpu", "loss=bce"))
    wide = Split(parts.data.train.x * 2 - 0.5, parts.data.train.labels)
    data = Splits("scaled", parts.data.image_shape, wide, wide, wide)
    with pytest.raises(ConfigError, match=r"loss=bce needs targets in \[0, 1\].*spans \[-0.5, 1.5\]"):
        check_compatible(data, parts.model, parts.loss, parts.penalty, parts.trainer, parts.device)


def test_existing_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli("train", "trainer.epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert_clean_failure(proc, 2, "already holds aelab results")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path, capfd, monkeypatch):
    """Under a file, or on a read-only disk: Hydra's own mkdir printed a traceback; now aelab tries it first."""
    import errno
    import tempfile
    (tmp_path / "afile").write_text("")
    code, out, err = cli(capfd, "train", f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    assert code == 2 and err == f"error: hydra.run.dir: cannot make {tmp_path / 'afile' / 'run'}: " \
                                f"{tmp_path / 'afile'}: Not a directory; give a dir you can write in, " \
                                f"e.g. hydra.run.dir=/tmp/aelab/run\n"

    def read_only(**kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capfd, "train", "-m", "reg.weight=1,2")  # the default sweep dir, under ./outputs
    assert code == 2 and err.startswith(f"error: hydra.sweep.dir: cannot make outputs: {tmp_path}: Read-only")
    assert not (tmp_path / "outputs").exists()


def test_resume_dir_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("train", f"resume={tmp_path / 'empty'}", cwd=tmp_path, check=False)
    assert_clean_failure(proc, 2, "resume: " + str(tmp_path / "empty") + " is not an aelab run")


@pytest.mark.parametrize("command,prefix,key", [("eval", "", "RUN_DIR"), ("sample", "", "RUN_DIR"),
                                                ("train", "resume=", "resume")])
def test_sweep_job_named_by_number_alone_points_to_its_dir(capfd, tmp_path, command, prefix, key):
    sweep = tmp_path / "sweep"
    job = sweep / "1_reg.weight=0.1,reg=l1"
    (job / ".hydra").mkdir(parents=True)
    (sweep / "10_reg.weight=1,reg=l1").mkdir()  # not job 1's: "1" is a whole number
    code, out, err = cli(capfd, command, prefix + str(sweep / "1"))
    assert code == 2 and "Traceback" not in out + err
    assert err.strip() == (f"error: {key}: {sweep / '1'}: no such dir; a sweep job's dir is named by its number and "
                           f"overrides: {job}")
    code, _, err = cli(capfd, command, prefix + str(sweep / "2"))
    assert code == 2 and err.strip() == f"error: {key}: {sweep / '2'}: no such dir; pass a run dir under outputs/"
    (sweep / "run_1").mkdir()  # a name that is not a number is no sweep job's: no hint
    code, _, err = cli(capfd, command, prefix + str(sweep / "run"))
    assert code == 2 and err.strip() == f"error: {key}: {sweep / 'run'}: no such dir; pass a run dir under outputs/"
    assert sorted(p.name for p in sweep.iterdir()) == ["10_reg.weight=1,reg=l1", "1_reg.weight=0.1,reg=l1", "run_1"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    proc = run_cli("train", f"resume={run_dir}", cwd=tmp_path, check=False)
    assert_clean_failure(proc, 2, "is unreadable or truncated (not a whole file written by torch.save)")
    proc = run_cli("eval", str(run_dir), cwd=tmp_path, check=False)
    assert_clean_failure(proc, 2, f"RUN_DIR: {ckpt} is unreadable or truncated (not a whole file written by "
                                  f"torch.save); evaluate another run, or train this one again")


def test_a_cut_short_metrics_json_is_named_and_resume_writes_it_again(tmp_path, capfd):
    """A finished run whose metrics.json is not whole (hand-edited, or from before the atomic write):
    resume names the file and the fix, writes nothing; following the fix evaluates the checkpoint again,
    to the same numbers."""
    run_dir = tmp_path / "run"
    run_cli("train", "trainer.epochs=1", "eval.probe_max_samples=300", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    whole = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text('{"train": {"total": 0.1')
    code, out, err = cli(capfd, "train", f"resume={run_dir}")
    assert code == 2 and "Traceback" not in err
    assert f"metrics.json: {run_dir / 'metrics.json'} is unreadable (Expecting" in err
    assert f"remove it, and aelab train resume={run_dir} evaluates the trained run again" in err
    assert (run_dir / "metrics.json").read_text() == '{"train": {"total": 0.1'
    (run_dir / "metrics.json").unlink()
    code, out, err = cli(capfd, "train", f"resume={run_dir}")
    again = json.loads((run_dir / "metrics.json").read_text())
    assert code == 0 and again["test"] == whole["test"] and again["val"] == whole["val"]


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """metrics.json, eval.json, failed.json, environment.json: a full disk mid-write keeps the old file."""
    from aelab.runs import write_json

    path = tmp_path / "metrics.json"
    write_json(path, {"test": {"mse": 0.5}})
    real_write = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write(self, text[:7])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        write_json(path, {"test": {"mse": 0.25}})
    assert json.loads(path.read_text()) == {"test": {"mse": 0.5}}


def test_pictures_and_tables_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run's PNGs (save_png, save_figure: reconstructions.png, histograms.png, sample.png, a report's
    plots) and a report's tables: a full disk mid-write keeps the earlier file and leaves no temporary one."""
    from matplotlib.figure import Figure
    from PIL import Image
    from aelab.analysis.figures import pyplot, save_figure
    from aelab.analysis.pictures import save_png
    from aelab.runs import write_text

    picture, table = tmp_path / "reconstructions.png", tmp_path / "report.csv"
    save_png(torch.full((3, 4, 4), 0.5), picture)
    write_text(table, "reg.weight,runs\r\n0.1,1\r\n")
    good = picture.read_bytes(), table.read_bytes()
    assert good[1] == b"reg.weight,runs\r\n0.1,1\r\n"  # the csv module's line ends, as written
    real_write = Path.write_text

    def half_picture(self, file, *args, **kwargs):  # an Image or a Figure, saving into `file`
        Path(file).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    def half_text(self, text, *args, **kwargs):
        real_write(self, text[:3])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", half_picture)
    monkeypatch.setattr(Figure, "savefig", half_picture)
    monkeypatch.setattr(Path, "write_text", half_text)
    figure = pyplot().figure()
    for write in (lambda: save_png(torch.ones(3, 4, 4), picture), lambda: save_figure(figure, picture, 50),
                  lambda: write_text(table, "other")):
        with pytest.raises(OSError):
            write()
    assert (picture.read_bytes(), table.read_bytes()) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reconstructions.png", "report.csv"]
    assert figure.number not in pyplot().get_fignums()  # the figure closed all the same


def test_resuming_a_finished_run_keeps_its_results(tmp_path):
    """Nothing left to train: nothing written. More epochs: trains on, the old results kept aside."""
    run_dir = tmp_path / "run"
    run_cli("train", "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    first = (run_dir / "metrics.json").read_text()
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    again = run_cli("train", f"resume={run_dir}", cwd=tmp_path)
    assert "has finished training (trainer.epochs=1); nothing to do" in again.stdout
    assert f"aelab train resume={run_dir} trainer.epochs=2" in again.stdout
    assert (run_dir / "metrics.json").read_text() == first and sorted(run_dir.glob("events.out.tfevents.*")) == events
    run_cli("train", f"resume={run_dir}", "trainer.epochs=2", cwd=tmp_path)
    assert (run_dir / "metrics.epochs-1.json").read_text() == first
    longer, shorter = (json.loads((run_dir / name).read_text()) for name in ("metrics.json", "metrics.epochs-1.json"))
    assert (longer["epochs"], longer["steps"]) == (2, 2 * shorter["steps"]) and longer["samples_per_second"] > 0


def test_a_resumed_run_keeps_what_it_trains(tmp_path, capfd):
    """More epochs, another device or eval setting: yes. Another loss or weight: refused, the run untouched
    (its results would be credited to a setting it trained only part of the way with)."""
    run_dir = tmp_path / "run"
    run_cli("train", "trainer.epochs=1", "reg=l1", "eval.probe=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for changed in (["reg.weight=0.5"], ["loss=bce"], ["trainer.epochs=2", "trainer.seed=3"], ["reg=none"]):
        code, out, err = cli(capfd, "train", f"resume={run_dir}", *changed)
        assert code == 2 and f"would change what {run_dir} trains" in err and "may change only trainer.epochs" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    code, out, err = cli(capfd, "train", f"resume={run_dir}", "reg=l1", "trainer.epochs=2", "device=cpu",
                         "trainer.log_every=3", "eval.threshold=0.2")  # reg=l1: as it ran
    assert code == 0 and "epoch 2/2" in out and (run_dir / "metrics.epochs-1.json").is_file()


def test_nan_loss_stops_at_once_naming_step_and_terms(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "optim=sgd", "optim.lr=1e12", "trainer.log_every=50", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path, check=False)
    assert_clean_failure(proc, 3, "became NaN or inf at step")
    assert "no checkpoint had been written yet" in proc.stderr and "lower optim.lr" in proc.stderr
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoint.pt").exists()


def test_checkpoints_every_few_seconds_and_a_killed_run_resumes_to_the_same_end(tmp_path, make_cfg, monkeypatch):
    """trainer.checkpoint_every: an epoch's end writes checkpoint.pt after the first and the last epoch and,
    between them, once that many seconds have passed (0: after every epoch). A run killed between two
    (an error out of epoch 4's end leaves its dir as a SIGKILL would) resumes from epoch 1's, trains
    epochs 2 to 4 again, and ends with the weights of the run never killed."""
    from aelab.cli.job import run
    from aelab.training import loop

    saved, real_save = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda parts, cfg, pos, run_dir: saved.append(pos.epoch) or
                        real_save(parts, cfg, pos, run_dir))
    quiet = ("device=cpu", "trainer.epochs=5", "trainer.patience=null", "eval.probe=false", "eval.projector=0")
    for every, written in (("1000", [1, 5]), ("0", [1, 2, 3, 4, 5])):
        saved.clear()
        run(make_cfg(*quiet, f"trainer.checkpoint_every={every}"), tmp_path / every)
        assert saved == written
    killed, real_judge = tmp_path / "killed", loop.judge

    def killing(pos, parts, val_total):
        if pos.epoch == 4:
            raise KeyboardInterrupt("killed")
        real_judge(pos, parts, val_total)
    monkeypatch.setattr(loop, "judge", killing)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*quiet, "trainer.checkpoint_every=1000"), killed)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["position"]["epoch"] == 1
    monkeypatch.setattr(loop, "judge", real_judge)
    saved.clear()
    run(make_cfg(*quiet, "trainer.checkpoint_every=1000", "resume=true"), killed, resume=True)
    assert saved == [2, 5]  # the resumed run's first epoch, and its last
    for every in ("1000", "0"):
        want = torch.load(tmp_path / every / "checkpoint.pt", weights_only=True)["model"]
        got = torch.load(killed / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_nan_after_a_good_epoch_keeps_the_good_checkpoint(tmp_path, make_cfg):
    from aelab.training.faults import TrainingFault
    from aelab.optim import SplitFusedAdam
    from aelab.cli.job import run

    cfg = make_cfg("device=cpu", "trainer.epochs=3")
    parts_run = tmp_path / "run"
    parts_run.mkdir()
    calls = {"n": 0}
    original = SplitFusedAdam.step

    def poisoned(self, *a, **k):  # the loss turns NaN during the second epoch
        calls["n"] += 1
        out = original(self, *a, **k)
        if calls["n"] == 15:
            for group in self.param_groups:
                group["params"][0].data.fill_(float("nan"))
        return out
    SplitFusedAdam.step = poisoned
    try:
        with pytest.raises(TrainingFault, match="at step 16") as err:
            run(cfg, parts_run)
    finally:
        SplitFusedAdam.step = original
    assert "last good checkpoint is kept" in str(err.value)
    state = torch.load(parts_run / "checkpoint.pt", weights_only=True)
    assert state["position"]["epoch"] == 1 and state["position"]["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_the_final_evaluation_stops_at_once_and_resume_finishes(tmp_path, make_cfg, monkeypatch, sig):
    """No step is left to finish: the signal stops the evaluation at once (through a library's
    `except Exception`, as scikit-learn's probes have), exit 128 + sig with the command that finishes
    the run; that command evaluates and writes metrics.json without training again."""
    from aelab.cli import job as train  # the job: train, then finish (measure), then log_final
    from aelab.training.faults import TrainingFault

    cfg = make_cfg("device=cpu", "trainer.epochs=2", "eval.probe=false")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_finish = train.finish

    def interrupted(*args, **kwargs):
        try:  # a library that catches every Exception must not swallow the stop
            os.kill(os.getpid(), sig)
            time.sleep(10)
        except Exception:
            pytest.fail("the stop was swallowed by an `except Exception`")
    monkeypatch.setattr(train, "finish", interrupted)
    before = signal.getsignal(sig)
    with pytest.raises(TrainingFault) as err:
        train.run(cfg, run_dir)
    assert err.value.exit_code == 128 + sig and "during the final evaluation" in str(err.value)
    assert f"finish with: aelab train resume={run_dir}" in str(err.value)
    assert not (run_dir / "metrics.json").exists() and signal.getsignal(sig) is before  # handler put back
    monkeypatch.setattr(train, "finish", real_finish)
    record = train.run(cfg, run_dir, resume=True)
    assert record["steps"] == 2 * 10 and (run_dir / "metrics.json").is_file()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("val/total")] == [10, 20]
    assert [e.step for e in events.Scalars("~final/val_total")] == [20]  # written once, by the resume


def test_a_signal_while_the_results_are_written_waits_for_them(tmp_path, make_cfg, monkeypatch):
    """TensorBoard's final entries and metrics.json are written in one go after the slow part: a
    SIGTERM then lets them finish (the run is complete), so no resume writes any of them twice."""
    from aelab.cli import job as train  # the job: train, then finish (measure), then log_final

    cfg = make_cfg("device=cpu", "trainer.epochs=1", "eval.probe=false")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_log_final = train.log_final

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        real_log_final(*args)
    monkeypatch.setattr(train, "log_final", signalled)
    record = train.run(cfg, run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == record["test"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("~final/test_mse")] == [10]
    assert {"~test/reconstructions", "~test/features"} <= set(events.Tags()["images"])


def test_ctrl_c_outside_a_training_loop_is_one_line(tmp_path, capfd, monkeypatch):
    """aelab eval or report interrupted: exit 130 and one line, not a KeyboardInterrupt traceback."""
    import aelab.sweeps.report

    def interrupted(sweep_dir, overrides):
        raise KeyboardInterrupt
    monkeypatch.setattr(aelab.sweeps.report, "report", interrupted)
    code, out, err = cli(capfd, "report", str(tmp_path))
    assert code == 130 and err == "error: aelab report: interrupted (SIGINT) before it finished; " \
                                  "what it had written is kept\n"



def test_ctrl_c_before_training_leaves_no_empty_run_dir(tmp_path, capfd, monkeypatch):
    import aelab.cli.job

    def interrupted(cfg, run_dir, **kwargs):  # as if Ctrl-C came while the data loaded
        raise KeyboardInterrupt
    monkeypatch.setattr(aelab.cli.job, "run", interrupted)
    code, out, err = cli(capfd, "train", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 130 and err.startswith("error: aelab train: interrupted (SIGINT)") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def start(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "aelab", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, text, timeout=120):
    deadline = time.time() + timeout
    for line in proc.stdout:
        if text in line:
            return
        assert time.time() < deadline, f"no '{text}' within {timeout}s"
    raise AssertionError(f"process ended before printing '{text}'")


def test_sigterm_in_a_fresh_process_checkpoints_and_names_the_resume(tmp_path, capfd):
    """The smoke test of signals as a process gets them (the bitwise resume after each: the slow tier).
    While it trains, its run dir is its own: a second `aelab train` into it, or a resume of it, is
    refused naming its PID, and writes nothing there (issue 33 item 4)."""
    stopped = tmp_path / "stopped"
    proc = start([*LONG, "eval.probe=false", f"hydra.run.dir={stopped}"], tmp_path)
    wait_for_line(proc, "epoch 1/12")
    hydra_records = {p: p.read_bytes() for p in (stopped / ".hydra").iterdir()}
    for argv in ([*LONG, f"hydra.run.dir={stopped}"], [f"resume={stopped}"]):
        code, out, err = cli(capfd, "train", *argv)
        assert code == 2 and err.strip() == (f"error: hydra.run.dir: {stopped} is in use by process {proc.pid} "
                                             f"(aelab train); wait for it to end, or stop it (Ctrl-C or kill "
                                             f"{proc.pid}: it saves a checkpoint) and continue it with aelab train "
                                             f"resume={stopped}"), err
    assert {p: p.read_bytes() for p in (stopped / ".hydra").iterdir()} == hydra_records
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and f"aelab train resume={stopped}" in err, err
    assert "Traceback" not in err and not (stopped / "metrics.json").exists()
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["position"]["step"] >= 79


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_matches_uninterrupted_run_bitwise(tmp_path, sig):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli("train", *LONG, f"hydra.run.dir={straight}", cwd=tmp_path)
    proc = start([*LONG, f"hydra.run.dir={stopped}"], tmp_path)
    wait_for_line(proc, "epoch 2/12")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err and f"aelab train resume={stopped}" in err
    assert "Traceback" not in err
    assert not (stopped / "metrics.json").exists()
    position = torch.load(stopped / "checkpoint.pt", weights_only=True)["position"]
    assert 0 < position["step"] < 12 * 79
    run_cli("train", f"resume={stopped}", cwd=tmp_path)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((stopped / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert a[split] == b[split]  # bitwise: the same floats
    acc = EventAccumulator(str(stopped))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/total")]
    assert steps == sorted(set(steps)) and steps[-1] == a["steps"] // 7 * 7  # no step logged twice
    assert [e.step for e in acc.Scalars("val/total")] == sorted({e.step for e in acc.Scalars("val/total")})


@pytest.mark.slow
def test_a_stopped_sweep_continues_with_resume_of_its_dir(tmp_path):
    """SIGINT in job 1 of three stops the sweep; aelab report names the stopped job and the command
    that goes on; `aelab train resume=SWEEP_DIR` (the command the error names too) reruns the sweep in
    its own dirs: job 0 kept, job 1 from its checkpoint, job 2 from the start."""
    sweep = tmp_path / "sweep"
    proc = start(["-m", *LONG, "eval.probe=false", "trainer.seed=0,1,2", f"hydra.sweep.dir={sweep}"], tmp_path)
    wait_for_line(proc, "epoch 12/12")  # job 0 has finished
    wait_for_line(proc, "epoch 2/12")  # job 1 is on its third epoch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"or the whole sweep: aelab train resume={sweep}" in err
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and (jobs[0] / "metrics.json").is_file() and not (jobs[1] / "metrics.json").exists()
    shown = run_cli("report", str(sweep), cwd=tmp_path)
    assert "(1 runs)" in shown.stdout and "1 job(s) without results:" in shown.stdout
    assert f"- {jobs[1].name}: stopped before it finished" in (sweep / "report.md").read_text()
    changed = run_cli("train", f"resume={sweep}", "trainer.epochs=20", cwd=tmp_path, check=False)
    assert changed.returncode == 2 and "trainer.epochs=20 would make other jobs" in changed.stderr
    kept = (jobs[0] / "metrics.json").read_text()
    resumed = run_cli("train", f"resume={sweep}", cwd=tmp_path)
    assert sorted(p for p in sweep.iterdir() if p.is_dir())[:2] == jobs  # the same dirs, not new ones
    assert all((sweep / f"{n}_{jobs[0].name[2:].replace('seed=0', f'seed={n}')}" / "metrics.json").is_file()
               for n in range(3))
    assert (jobs[0] / "metrics.json").read_text() == kept and "finished already" in resumed.stdout
    assert resumed.stdout.count("epoch 1/12") == 1 and resumed.stdout.count("epoch 12/12") == 2


def test_same_seed_same_metrics_and_environment_recorded(tmp_path):
    for name in ("a", "b"):
        run_cli("train", "trainer.epochs=2", "corruption=masking", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert a["test"] == b["test"] and a["val"] == b["val"]
    env = json.loads((tmp_path / "a" / "environment.json").read_text())
    assert env["seed"] == 0 and env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert env["device"] == "cpu" or env["device"].startswith("cuda")


def test_checkpoint_write_is_atomic(tmp_path, make_cfg, monkeypatch):
    parts = build(make_cfg("device=cpu"))
    cfg = make_cfg("device=cpu")
    good = checkpoint.save(parts, cfg, Position(epoch=1, step=5), tmp_path).read_bytes()

    real_write = Path.write_bytes

    def crash(self, data):  # the file half written, then the disk is full
        real_write(self, bytes(data)[:100])
        raise OSError(28, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError):
        checkpoint.save(parts, cfg, Position(epoch=2, step=10), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


KEYS = [("reg=l1", "reg.weight"), ("reg=kl", "reg.rho"), ("corruption=masking", "corruption.prob"),
        ("corruption=gaussian", "corruption.noise_factor"), ("corruption=block", "corruption.size"),
        (None, "model.latent_dim"), (None, "trainer.epochs"), (None, "trainer.batch_size"),
        (None, "optim.lr"), (None, "trainer.log_every"), (None, "eval.projector"), (None, "eval.feature_value"),
        (None, "sched.factor"), (None, "trainer.min_delta"), ("sched=cosine", "sched.warmup_epochs")]
INVALID = st.one_of(
    st.floats(max_value=-1e-6, allow_nan=False).map(repr),
    st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8),
    st.sampled_from(["nan", "inf", "-inf", "null", "[]", "[1,2]", "{a:1}", "''", "true"]),
)


def never_traceback(tmp_path, capfd, key, value):
    group, name = key
    run_dir = tmp_path / uuid.uuid4().hex
    argv = ["train", *([group] if group else []), f"{name}={value}", "device=cpu", f"hydra.run.dir={run_dir}"]
    code, out, err = cli(capfd, *argv)
    assert code not in (0, None), (argv, out)
    assert "Traceback" not in out + err and err.strip(), (argv, err)
    assert not (run_dir / "metrics.json").exists()


RANDOM = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=12, **RANDOM)  # about 0.7 s each: a few in the fast tier, many in the slow one
@given(key=st.sampled_from(KEYS), value=INVALID)
def test_random_invalid_values_never_traceback(tmp_path, capfd, key, value):
    never_traceback(tmp_path, capfd, key, value)


@pytest.mark.slow
@settings(max_examples=100, **RANDOM)
@given(key=st.sampled_from(KEYS), value=INVALID)
def test_many_random_invalid_values_never_traceback(tmp_path, capfd, key, value):
    never_traceback(tmp_path, capfd, key, value)
