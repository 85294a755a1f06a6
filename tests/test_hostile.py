"""Hostile and clumsy input (issue 33's list, and docs/reliability.md's table): each is one line naming
the key or file and the fix, exit code 2, never a traceback, and never loses or rewrites earlier results."""
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, cli, signal_at_step, torchvision_root, write_idx


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_that_trains_nothing_leaves_the_run_as_it_was(run_copy, capfd):
    """A finished run resumed: "nothing to do", and not a byte of it changes (Hydra's .hydra/ records
    included, which Hydra writes before the job starts); a resume that fails (a truncated checkpoint)
    leaves it as it was too."""
    before = files(run_copy)
    code, out, err = cli(capfd, "train", f"resume={run_copy}")
    assert code == 0 and "nothing to do" in out, err
    assert files(run_copy) == before
    checkpoint = run_copy / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    before = files(run_copy)
    code, out, err = cli(capfd, "train", f"resume={run_copy}", "trainer.epochs=2")
    assert code == 2 and "unreadable or truncated" in err and "Traceback" not in err
    assert files(run_copy) == before


def test_resume_of_a_finished_sweep_leaves_it_as_it_was(sweep, capfd):
    """Every job finished: each says so, and neither the jobs' records nor multirun.yaml change."""
    before = files(sweep)
    code, out, err = cli(capfd, "train", f"resume={sweep}")
    assert code == 0 and out.count("finished already, its results kept") == 4, out
    assert files(sweep) == before


GARBAGE = "{unclosed: [1, 2\n"


def assert_one_line(code, out, err, *texts):
    assert code == 2 and "Traceback" not in out + err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for text in texts:
        assert text in err, err


def test_a_hand_broken_run_record_is_named_with_its_fix(run_copy, capfd):
    """Garbage in .hydra/overrides.yaml (read by resume) or .hydra/config.yaml (read by aelab eval and
    sample), or an empty config.yaml: one line naming the file, nothing written."""
    overrides, config = run_copy / ".hydra" / "overrides.yaml", run_copy / ".hydra" / "config.yaml"
    whole = config.read_text()
    for path, text in ((overrides, GARBAGE), (overrides, "just a string\n")):
        path.write_text(text)
        before = files(run_copy)
        assert_one_line(*cli(capfd, "train", f"resume={run_copy}"), f"resume: {path} is unreadable")
        assert files(run_copy) == before
    for text in (GARBAGE, ""):
        config.write_text(text)
        before = files(run_copy)
        for command in ("eval", "sample"):
            code, out, err = cli(capfd, command, str(run_copy))
            assert_one_line(code, out, err, f"RUN_DIR: {config} is unreadable", "the run's composed config")
            assert "+device" not in err
        assert files(run_copy) == before
    config.write_text(whole)


def test_a_checkpoint_of_another_model_is_called_that(run_copy, capfd, make_cfg):
    """A checkpoint.pt copied from a run of another architecture is whole, not truncated: say what it is."""
    import torch
    from aelab.build import build

    other = build(make_cfg("device=cpu", "model.latent_dim=3"))
    state = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    weights = other.model.state_dict()  # the last state and the best epoch's (which eval reads) alike
    torch.save({**state, "model": weights, "position": {**state["position"], "best_model": weights}},
               run_copy / "checkpoint.pt")
    code, out, err = cli(capfd, "eval", str(run_copy))
    assert_one_line(code, out, err, "holds the weights of another model", "size mismatch")
    assert "truncated" not in err


def test_a_hand_broken_multirun_yaml_is_named_with_its_fix(sweep, capfd):
    (sweep / "multirun.yaml").write_text(GARBAGE)
    before = files(sweep)
    assert_one_line(*cli(capfd, "train", f"resume={sweep}"), f"resume: {sweep / 'multirun.yaml'} is unreadable")
    assert files(sweep) == before


def damaged(path: Path, how: str) -> str:
    """Damage an idx file as a failed download or a careless copy would; the words the error uses."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
        return "is cut short"
    if how == "magic":
        path.write_bytes(b"\x1f\x8b" + data[2:])  # a gzip file's first bytes, say
        return "is not an idx file"
    if how == "count":  # the header claims one image less than the file holds
        count = int.from_bytes(data[4:8], "big") - 1
        path.write_bytes(data[:4] + count.to_bytes(4, "big") + data[8:])
        return "is cut short or too long"
    path.write_bytes(b"")
    return "is empty"


@pytest.mark.parametrize("how", ["truncated", "magic", "count", "empty"])
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_damaged_mnist_file_is_named_with_its_fix(tmp_path, capfd, how, sweep):
    """A damaged idx file: one line naming it, what is wrong and the fix; no run or sweep dir left."""
    rng = np.random.default_rng(0)
    root = torchvision_root(tmp_path / "data", "MNIST", rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 10, 60), 50)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    words = damaged(path, how)
    args = ["-m", "reg.weight=0.1,1"] if sweep else []
    code, out, err = cli(capfd, "train", *args, "data=mnist", f"paths.data={root}", "device=cpu",
                         f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_one_line(code, out, err, f"data.root: {path} {words}", "delete it and set data.download=true")
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_image_and_label_files_that_disagree_are_named(tmp_path, capfd):
    rng = np.random.default_rng(0)
    root = torchvision_root(tmp_path / "data", "MNIST", rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 10, 60), 50)
    raw = root / "MNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 7))  # 10 test images, 7 labels
    code, out, err = cli(capfd, "train", "data=mnist", f"paths.data={root}", "device=cpu",
                         f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line(code, out, err, f"data.root: {raw / 't10k-images-idx3-ubyte'} holds 10 images and "
                                    f"{raw / 't10k-labels-idx1-ubyte'} 7 labels")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,text", [
    (["hydra.job.name=../../x"], "hydra.job.name: names the run's log (NAME.log) in its dir; '../../x' would put it "
                                 "outside: give a name without '/'"),
    (["-m", "+tag=a/../../../x", "reg.weight=1,2"], "tag: a/../../../x would put a sweep job's dir outside the sweep "
                                                    "dir (a job's dir is named by its overrides); give a value "
                                                    "without '..'"),
])
def test_a_name_that_would_leave_its_dir_is_refused(tmp_path, capfd, monkeypatch, args, text):
    inside = tmp_path / "a" / "b" / "c"
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    code, out, err = cli(capfd, "train", *args, "hydra.run.dir=run", "hydra.sweep.dir=sweep")
    assert_one_line(code, out, err, text)
    assert [p.name for p in tmp_path.rglob("*")] == ["a", "b", "c"]  # nothing written, inside or out


def test_a_full_disk_is_one_line_and_the_run_goes_on_from_where_it_was(tmp_path, capfd, monkeypatch):
    """No space left while a checkpoint is written (epoch 2), then while the pictures are (the end):
    one line that says so, where, and the command that continues; the last whole checkpoint is kept
    and the resume, once there is room, finishes the run."""
    import errno
    import json

    import torch
    from PIL import Image

    run_dir, real_write, real_save = tmp_path / "run", Path.write_bytes, Image.Image.save
    full = {"checkpoints": 1}

    def write_bytes(self, data):
        if self.name == ".checkpoint.pt.tmp":
            full["checkpoints"] -= 1
            if full["checkpoints"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    code, out, err = cli(capfd, "train", "trainer.epochs=3", "eval.probe=false", "device=cpu",
                         f"hydra.run.dir={run_dir}")
    assert code == 4 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"the disk is full: cannot write {run_dir / '.checkpoint.pt.tmp'} (No space left on device)" in err
    assert f"free space, then continue with: aelab train resume={run_dir}" in err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["position"]["epoch"] == 1
    assert not (run_dir / ".checkpoint.pt.tmp").exists()

    def no_room(self, fp, *args, **kwargs):  # a PNG file; TensorBoard's images go to memory first
        if not isinstance(fp, (str, Path)):
            return real_save(self, fp, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))
    monkeypatch.setattr(Path, "write_bytes", real_write)
    monkeypatch.setattr(Image.Image, "save", no_room)
    code, out, err = cli(capfd, "train", f"resume={run_dir}")
    assert code == 4 and "the disk is full: cannot write" in err and len(err.strip().splitlines()) == 1, err
    assert not (run_dir / "metrics.json").exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["position"]["epoch"] == 3
    monkeypatch.setattr(Image.Image, "save", real_save)
    code, out, err = cli(capfd, "train", f"resume={run_dir}")
    assert code == 0 and json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3, err
    monkeypatch.setattr(Image.Image, "save", no_room)
    code, out, err = cli(capfd, "eval", str(run_dir))  # the commands that measure a run say it too
    assert code == 4 and err.startswith("error: the disk is full: cannot write") and "run it again" in err, err


def test_a_top_level_tag_still_names_the_run(tmp_path, capfd):
    """+KEY=VALUE with a name unlike aelab's keys is a tag: it runs, and names a sweep's job dirs."""
    code, out, err = cli(capfd, "train", "--cfg", "job", "+tag=baseline")
    assert code == 0 and "tag: baseline" in out, err


def test_report_with_an_eval_key_that_does_not_exist_names_it(sweep, capfd):
    code, out, err = cli(capfd, "report", str(sweep), "eval.foo=1")
    assert_one_line(code, out, err, "eval.foo: no such key; aelab eval takes eval.threshold, eval.probe")
    assert "eval_eval.foo=1.json" not in err
    code, out, err = cli(capfd, "report", str(sweep), "eval.treshold=0.2")
    assert_one_line(code, out, err, "eval.treshold: no such key (did you mean eval.threshold?)")


def test_ctrl_c_while_the_job_imports_torch_leaves_no_empty_run_dir(tmp_path, capfd, monkeypatch):
    """Hydra makes the run dir before the job imports torch (seconds): a Ctrl-C then leaves nothing."""
    import sys
    import types

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt
    monkeypatch.setitem(sys.modules, "aelab.cli.job", Importing("aelab.cli.job"))
    code, out, err = cli(capfd, "train", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 130 and err.startswith("error: aelab train: interrupted (SIGINT)") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_sigterm_before_training_is_one_line_and_leaves_no_empty_run_dir(tmp_path, capfd, monkeypatch):
    """SIGTERM before the training loop takes the signals over (importing torch, reading the data):
    one line and exit 143, not a silent -15; no empty run dir."""
    import os
    import signal
    import time

    import aelab.cli.job

    def terminated(cfg, run_dir, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    monkeypatch.setattr(aelab.cli.job, "run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = cli(capfd, "train", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 143 and err.startswith("error: aelab train: stopped (SIGTERM) before it finished") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and signal.getsignal(signal.SIGTERM) is before


def test_environment_json_records_the_aelab_command_of_each_job(l1_seed_sweep, monkeypatch, tmp_path, capfd):
    """A SLURM job's process is submitit's (its argv names submitit's _submit.py): environment.json also
    records the aelab command that runs the job, from the job's own overrides."""
    import json
    import shlex
    import sys

    import yaml

    for job in sorted(l1_seed_sweep.glob("*/environment.json")):
        overrides = yaml.safe_load((job.parent / ".hydra" / "overrides.yaml").read_text())
        assert json.loads(job.read_text())["command"] == "aelab train " + shlex.join(overrides)
    from aelab.cli import job as the_job
    from aelab.training import faults
    real = faults.environment

    def as_submitit_runs_it(*args, **kwargs):  # what environment() sees in a SLURM job's process
        monkeypatch.setattr(sys, "argv", ["/venv/lib/submitit/core/_submit.py", "/tmp/jobs"])
        return real(*args, **kwargs)
    monkeypatch.setattr(the_job, "environment", as_submitit_runs_it)
    code, out, err = cli(capfd, "train", "trainer.epochs=1", "eval.probe=false", "reg=l1", "device=cpu",
                         f"hydra.run.dir={tmp_path / 'run'}")
    record = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert code == 0 and record["argv"][0].endswith("_submit.py"), err
    assert record["command"] == "aelab train trainer.epochs=1 eval.probe=false reg=l1 device=cpu"  # its settings


def test_the_pictures_a_run_leaves_are_drawn_at_a_size_a_person_can_read(trained_run):
    """On the 8x8 digits reconstructions.png was 82x32 pixels and features.png 62x62: now each is drawn
    large, its rows labelled, as denoising.png is."""
    from PIL import Image

    for name in ("reconstructions.png", "features.png", "denoising.png"):
        with Image.open(trained_run / name) as image:
            assert image.width >= 400 and image.height >= 150, (name, image.size)


def test_a_run_dir_given_as_an_interpolation_is_left_to_hydra(tmp_path, capfd, monkeypatch):
    """hydra.run.dir=runs/${now:%Y}: Hydra names the dir; aelab makes no folder named after the text."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capfd, "train", *FAST, "hydra.run.dir=runs/${now:%Y}")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [time.strftime("%Y")]


def test_tensorboard_opens_on_the_loss_curves_and_hparams_on_the_swept_keys(l1_seed_sweep):
    """TensorBoard's Time Series opens the first two groups of tags (sorted by name): those are the
    train and val curves, and no one-dot `final_*` cards repeat the HParams metrics. The HParams tab
    shows its first five hparams (those marked `differs` first, then by name) and first five metrics:
    the keys the sweep varies lead, and the main metrics, under their own names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    job = sorted(p.parent for p in l1_seed_sweep.glob("*/metrics.json"))[0]
    acc = EventAccumulator(str(job))
    acc.Reload()
    tags = [tag for kind in ("scalars", "images", "histograms") for tag in acc.Tags()[kind]]
    groups = sorted({tag.split("/", 1)[0] for tag in tags})
    assert groups[:2] == ["train", "val"], groups
    assert not [tag for tag in tags if tag.startswith("final_")]
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = HParamsPluginData.FromString(content).experiment
    shown = sorted(experiment.hparam_infos, key=lambda info: (not info.differs, info.name))[:5]
    assert [info.name for info in shown[:2]] == ["reg.weight", "trainer.seed"]
    assert not any(info.differs for info in shown[2:])
    metrics = [info.display_name for info in experiment.metric_infos[:5]]
    assert metrics == ["val_recon", "test_recon", "test_mse", "test_probe_latent", "test_population_sparsity"]
    scalars = set(acc.Tags()["scalars"])
    assert {info.name.tag for info in experiment.metric_infos} <= scalars


def test_slurm_time_out_signal_checkpoints_the_step_then_hands_over_to_submitit(tmp_path, make_cfg, monkeypatch):
    """submitit's time-out signal (SIGUSR2, sent `hydra.launcher.signal_delay_s` before the limit) is
    handled as SIGTERM is: the step's checkpoint first, then submitit's own handler (requeue, exit),
    which the job found installed; the requeued job continues to the same numbers as a run never
    stopped, and the handler is put back."""
    import sys

    import torch
    from aelab.cli import job as train
    from aelab.training import loop

    cfg = make_cfg("device=cpu", "trainer.epochs=2", "eval.probe=false", "eval.projector=0")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    handed = []

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        handed.append((signum, torch.load(run_dir / "checkpoint.pt", weights_only=False)["position"]["step"]))
        sys.exit(-1)
    real_make_step = loop.make_step
    signal_at_step(monkeypatch, 13, signal.SIGUSR2)
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            train.run(cfg, run_dir)
        assert handed == [(signal.SIGUSR2, 13)]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.setattr(loop, "make_step", real_make_step)
    resumed = train.run(cfg, run_dir, resume=True)
    (tmp_path / "whole").mkdir()
    whole = train.run(cfg, tmp_path / "whole")
    assert resumed["test"] == whole["test"] and resumed["steps"] == whole["steps"] == 20


def test_a_submission_sbatch_refuses_is_one_line_naming_the_key(tmp_path, capfd, monkeypatch):
    """A SLURM sweep whose sbatch call is refused (a fake sbatch stands in for a cluster without GPUs):
    one line with the key to change and sbatch's own message, where the refused script is, exit 2."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs pip install 'aelab[sweep]'")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Invalid generic resource (gres) specification' >&2"
                                    "\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep"
    code, out, err = cli(capfd, "train", "-m", "launcher=slurm", f"hydra.sweep.dir={sweep}")
    assert code == 2 and err.strip().splitlines() == [
        "error: launcher=slurm: no SLURM here (no srun on PATH); run the sweep where SLURM's commands are, or on "
        "this machine with launcher=local or launcher=parallel"], err
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    code, out, err = cli(capfd, "train", "-m", "launcher=slurm", "hydra.launcher.gpus_per_node=1", "reg=l1",
                         "reg.weight=0.1,1", f"hydra.sweep.dir={sweep}")
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "hydra.launcher.gpus_per_node" in err and "Invalid generic resource (gres) specification" in err
    assert str(sweep / ".submitit" / ".submission_file_") in err
