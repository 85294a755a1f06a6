"""Sweeps beyond one process: joblib and submitit_local launchers, SLURM config, Optuna, GPU spreading."""
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from aelab.devices import gpu_for_job
from conftest import run_cli, run_process

SHORT = ["trainer.epochs=3", "device=cpu", "eval.probe=false"]
# Jobs long enough to overlap on a busy 2-core machine: a worker process starts a few seconds after the
# first (importing torch); 3-epoch jobs (~2 s) could finish before it began, and the test failed.
CONCURRENT = ["trainer.epochs=20", "device=cpu", "eval.probe=false"]


def plugin(name):
    return pytest.importorskip(f"hydra_plugins.{name}", reason="needs pip install 'aelab[sweep]'")


def finished_jobs(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]


def assert_overlapping(jobs: list[dict]) -> None:
    (a, b) = jobs
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"], "jobs ran one after another"


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_concurrently(tmp_path):
    plugin("hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    run_process("train", "-m", "launcher=parallel", "hydra.launcher.n_jobs=2", "reg=l1", "reg.weight=1e-3,1e-1", *CONCURRENT,
            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = finished_jobs(sweep)
    assert len(jobs) == 2
    assert_overlapping(jobs)
    report = run_cli("report", str(sweep), cwd=tmp_path)
    assert "2 runs" in report.stdout and (sweep / "report.csv").is_file()


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_concurrently(tmp_path):
    plugin("hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    run_process("train", "-m", "launcher=local", "corruption=gaussian", "corruption.noise_factor=0.1,0.3", *CONCURRENT,
            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = finished_jobs(sweep)
    assert len(jobs) == 2
    assert_overlapping(jobs)


def test_local_preset_caps_the_batch():
    plugin("hydra_submitit_launcher")
    with initialize_config_module("aelab.configs", version_base="1.3"):
        cfg = compose("train", overrides=["launcher=local"], return_hydra_config=True)
    assert cfg.hydra.sweeper.max_batch_size == 4 and cfg.hydra.launcher.gpus_per_node == 0


@pytest.mark.parametrize("job,count,visible,expected", [
    (0, 4, None, 0), (1, 4, None, 1), (5, 4, None, 1), (7, 2, None, 1),  # k mod n
    (3, 4, "2", None), (3, 4, "0,1", None),  # the scheduler chose: respect it
    (3, 1, None, None), (3, 0, None, None), (None, 4, None, None),  # one GPU, none, or not a sweep
])
def test_gpu_for_job(job, count, visible, expected):
    assert gpu_for_job(job, count, visible) == expected


def test_cuda_device_spreads_sweep_jobs(monkeypatch):
    import torch

    from aelab.devices import DEVICES
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [DEVICES.get("cuda")(job_num=k).index for k in range(5)] == [0, 1, 2, 0, 1]
    assert DEVICES.get("auto")(job_num=4) == torch.device("cuda", 1)
    assert DEVICES.get("cuda")(index=2, job_num=4).index == 2  # an explicit index wins
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert DEVICES.get("cuda")(job_num=4).index == 0


def optuna_trials(storage: str, study: str) -> int:
    import optuna
    return len(optuna.load_study(study_name=study, storage=storage).trials)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "stacked"])
def test_optuna_study_in_memory(tmp_path, launcher):
    """The sweeper minimises what the jobs return; with launcher=stacked, each batch of trials it hands
    over trains as one stack, and the values it reads are each job's own."""
    plugin("hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    batch = ["hydra.sweeper.n_jobs=3"] if launcher == "stacked" else []  # the sweeper's batch: the stack
    proc = run_cli("train", "-m", "+experiment=optuna_search", "hydra.sweeper.n_trials=3", *SHORT, *batch,
                   f"launcher={launcher}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert len(finished_jobs(sweep)) == 3
    if launcher == "stacked":
        assert all(j["step_mode"] == "stacked (3 jobs): eager" for j in finished_jobs(sweep))
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    values = [j["val"]["recon"] for j in finished_jobs(sweep)]
    assert best.best_value == pytest.approx(min(values))  # the sweeper minimised what the runs returned
    assert "Best value" in proc.stdout + proc.stderr
    report = run_cli("report", str(sweep), cwd=tmp_path)
    assert "3 runs" in report.stdout and (sweep / "metrics_vs_reg.weight.png").is_file()
    again = run_cli("train", f"resume={sweep}", cwd=tmp_path, check=False)  # trials would be sampled afresh
    assert again.returncode == 2 and "is an Optuna study" in again.stderr and "hydra.sweeper.storage" in again.stderr


@pytest.mark.slow
def test_optuna_study_resumes_from_sqlite(tmp_path):
    plugin("hydra_optuna_sweeper")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for attempt in (1, 2):
        run_cli("train", "-m", "+experiment=optuna_search", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}",
                "hydra.sweeper.study_name=resumable", *SHORT, f"hydra.sweep.dir={tmp_path / f'sweep{attempt}'}",
                cwd=tmp_path)
        assert optuna_trials(storage, "resumable") == 3 * attempt


@pytest.mark.parametrize("args,text", [
    (["+experiment=optuna_search", "reg.weight=interval(-1,1)"],
     "reg.weight: must be >= 0, got -1 (a trial of the search can take: reg.weight=-1"),  # the range's low end
    (["hydra/sweeper=optuna", "model.latent_dim=choice(8,0)"], "model.latent_dim: must be >= 1, got 0 (a trial"),
])
def test_an_optuna_range_that_reaches_a_bad_value_stops_before_any_trial(tmp_path, args, text):
    plugin("hydra_optuna_sweeper")
    proc = run_cli("train", "-m", *args, *SHORT, f"hydra.sweep.dir={tmp_path / 'study'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and text in proc.stderr, proc.stderr
    assert not (tmp_path / "study").exists()


def test_slurm_preset_renders_the_expected_sbatch(tmp_path, monkeypatch):
    plugin("hydra_submitit_launcher")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_module("aelab.configs", version_base="1.3"):
        cfg = compose("train", overrides=["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                                          "hydra.launcher.timeout_min=120", "hydra.launcher.gpus_per_node=2",
                                          f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    assert cfg.resume == "auto"  # a requeued job continues from its checkpoint
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # the same parameter mapping as hydra_submitit_launcher's launch(); a stub srun stands in for a cluster
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    init = {"submitit_folder", "max_num_timeout"}
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init})
    script = executor._executor._make_submission_file_text("python -m aelab train", "UID")
    for line in ("--partition=gpu", "--account=proj", "--time=120", "--gpus-per-node=2", "--requeue",
                 "--signal=USR2@120", "--cpus-per-task=4", "--mem=16GB"):
        assert f"#SBATCH {line}" in script
    assert params["max_num_timeout"] == 3


def no_module(name):
    raise ModuleNotFoundError(f"No module named '{name.split('.')[0]}'")


@pytest.mark.parametrize("absent", [lambda name: None, no_module], ids=["plugin", "hydra_plugins"])
def test_missing_plugin_is_a_clear_error(tmp_path, monkeypatch, capsys, absent):
    """No such plugin, or no hydra_plugins package at all (find_spec raises): one line, exit 2."""
    import importlib.util

    from aelab.cli.main import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: absent(name) if name.startswith("hydra_plugins") else real(name, *a))
    assert main(["train", "-m", "launcher=parallel", "reg.weight=1,2"]) == 2
    err = capsys.readouterr().err
    assert "needs the Hydra plugin hydra-joblib-launcher; install it with: pip install 'aelab[sweep]'" in err
    assert "Traceback" not in err


def test_requeued_job_resumes_automatically(tmp_path):
    """resume=auto (the slurm preset's): a checkpoint without metrics resumes; a finished job is not redone."""
    run_dir = tmp_path / "job"
    run_cli("train", "trainer.epochs=2", "device=cpu", "eval.probe=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    finished = (run_dir / "metrics.json").read_text()
    again = run_cli("train", "trainer.epochs=2", "device=cpu", "eval.probe=false", "resume=auto",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert (run_dir / "metrics.json").read_text() == finished and "epoch" not in again.stdout
    (run_dir / "metrics.json").unlink()  # as if preempted after the checkpoint of epoch 2
    longer = run_cli("train", "trainer.epochs=3", "device=cpu", "eval.probe=false", "resume=auto",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert "epoch 3/3" in longer.stdout and "epoch 1/3" not in longer.stdout


def test_misspelled_launcher_key_is_one_line_before_any_job(tmp_path, capsys):
    plugin("hydra_joblib_launcher")
    from aelab.cli.main import main
    code = main(["train", "-m", "launcher=parallel", "hydra.launcher.n_jbs=2", "reg=l1", "reg.weight=1,2",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "hydra.launcher.n_jbs: no such key (did you mean hydra.launcher.n_jobs?)" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("launcher", ["basic", pytest.param("stacked", marks=pytest.mark.slow),
                                      pytest.param("parallel", marks=pytest.mark.slow)])
def test_a_diverged_job_does_not_stop_the_sweep(tmp_path, launcher):
    """lr=1e12 turns the loss NaN: that job leaves failed.json, the next job still runs (stacked: the
    stack goes on without it), the sweep exits 3 naming it (also when joblib ran the jobs in other
    processes), and the report lists it under the table instead of dropping it silently."""
    if launcher == "parallel":
        plugin("hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    run = run_cli if launcher == "basic" else run_process  # joblib's workers write to the process's own stderr
    proc = run("train", "-m", f"launcher={launcher}", "optim=sgd", "optim.lr=1e12,0.1", "trainer.epochs=1",
                   "device=cpu", f"hydra.sweep.dir={sweep}", "hydra.job.config.override_dirname.exclude_keys=[launcher]",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "job 0 (0_device=cpu,optim.lr=1000000000000.0,optim=sgd,trainer.epochs=1): loss term(s)" in proc.stderr
    assert "1 job(s) of the sweep stopped on a NaN or inf loss" in proc.stderr
    assert "; 1 other job(s) finished" in proc.stderr
    diverged, finished = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert "became NaN or inf at step" in json.loads((diverged / "failed.json").read_text())["error"]
    assert not (diverged / "metrics.json").exists() and (finished / "metrics.json").is_file()
    shown = run_cli("report", str(sweep), cwd=tmp_path)
    assert "1 job(s) without results:" in shown.stdout and diverged.name in shown.stdout
    assert f"- {diverged.name}: loss term(s)" in (sweep / "report.md").read_text()


def test_a_rerun_that_finishes_drops_the_earlier_failed_json(tmp_path):
    """failed.json is the verdict of a job's latest attempt: a rerun in its dir (resume=auto) that
    finishes removes it, so the report does not list a job with results as diverged."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "failed.json").write_text('{"error": "an earlier attempt diverged", "exit_code": 3}\n')
    run_cli("train", "trainer.epochs=1", "eval.probe=false", "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert (run_dir / "metrics.json").is_file() and not (run_dir / "failed.json").exists()


def test_one_job_of_a_sweep_resumes_on_its_own(tmp_path):
    """A job's dir name holds '=' and ',' (0_reg.weight=0.001,reg=l1): Hydra could not read it back as
    hydra.run.dir until aelab quoted it; resuming the job with more epochs trains on."""
    sweep = tmp_path / "sweep"
    run_cli("train", "-m", "reg=l1", "reg.weight=1e-3", "trainer.epochs=1", "eval.probe=false",
            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    longer = run_cli("train", f"resume={job}", "trainer.epochs=2", cwd=tmp_path)
    assert "epoch 2/2" in longer.stdout and "epoch 1/2" not in longer.stdout
    assert json.loads((job / "metrics.json").read_text())["epochs"] == 2 and (job / "metrics.epochs-1.json").is_file()
