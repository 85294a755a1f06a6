"""scripts/bench.py runs end to end (a smoke run on tiny data: its figures are not checked here, only
that every loop ran and the report holds what the issue asks for)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_bench_reports_every_loop_scaling_and_targets(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--steps", "2",
                           "--epochs", "1", "--repeat", "2", "--n", "300", "--cases", "none,contractive",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["rows"]] == ["none", "contractive"]
    for row in report["rows"]:
        assert all(row[k] > 0 for k in ("seed_faithful", "seed_tensordataset", "aelab")), row
        assert row["x_tensordataset"] == row["aelab"] / row["seed_tensordataset"]
        assert row["step_mode"] == "eager"
    assert sorted(report["epoch_seconds"]) == ["1", "2", "4"]
    assert [(t["case"], t["column"]) for t in report["targets"]] == [("none", "x_tensordataset"),
                                                                     ("contractive", "x_tensordataset")]
    assert sorted(report["adam_step_us"]) == ["aelab SplitFusedAdam", "torch fused Adam"]
    assert all(us > 0 for us in report["adam_step_us"].values())
    assert "| none |" in proc.stdout and "peak memory" in proc.stdout


def test_bench_times_aelab_compiled(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--steps", "2",
                           "--epochs", "1", "--repeat", "1", "--n", "300", "--cases", "none", "--compile",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["compile"] is True and report["rows"][0]["aelab"] > 0
    assert "compile=True" in proc.stdout.splitlines()[0]


def test_sigterm_stops_the_benchmark_in_aelabs_epochs(make_cfg, monkeypatch, capsys):
    """bench.py times aelab's epochs inside StopSignals (as training does), which let a SIGTERM or a Ctrl-C
    only end the epoch: `timeout` ran past its limit. Now the benchmark stops there, exit 128 + signal."""
    import importlib.util
    import os
    import signal

    import aelab.training.loop

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real_epoch, epochs = aelab.training.loop.train_epoch, []

    def signalled(*args):
        epochs.append(1)
        if len(epochs) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_epoch(*args)
    monkeypatch.setattr(aelab.training.loop, "train_epoch", signalled)
    from aelab.build import build
    with pytest.raises(SystemExit) as stopped:
        bench.aelab_epochs(build(make_cfg("device=cpu")), 5)
    assert stopped.value.code == 128 + signal.SIGTERM and len(epochs) == 1
    assert "bench: stopped by SIGTERM" in capsys.readouterr().err


def test_bench_stacked_reports_throughput_growth_and_sweeps(tmp_path):
    """scripts/bench_stacked.py end to end on tiny settings: every table it reports, and the same test
    MSE for each job whichever launcher trained it (the stacked sweep is the basic one's, job by job)."""
    out = tmp_path / "stacked.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_stacked.py"), "--device", "cpu", "--steps", "3",
                           "--repeat", "1", "--max-n", "2", "--sweep-args", "trainer.epochs=1 eval.probe=false",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert sorted(report["throughput"]) == ["digits", "mnist_shaped"]
    for row in report["throughput"].values():
        assert row["jobs"] == 8 and row["stacked_aggregate"] > 0 and row["alone_aggregate"] > 0
    assert [row["n"] for row in report["growth"]] == [1, 2]
    assert all(row["peak_mib"] > 0 for row in report["growth"])
    sweeps = report["sweeps"]
    assert {"stacked", "basic"} <= set(sweeps) and len(sweeps["stacked"]["test_mse"]) == 8
    assert sweeps["stacked"]["test_mse"] == pytest.approx(sweeps["basic"]["test_mse"], rel=1e-5)
    assert sweeps["stacked"]["end_seconds"] > 0 and sweeps["basic"]["end_seconds"] is None  # one job's end, warm
    assert 0 < sweeps["stacked"]["training_seconds"] < sweeps["stacked"]["seconds"]
    assert [t["target"] for t in report["targets"]][:2] == ["digits stacked / one by one, training",
                                                              "8-job sweep, basic / stacked, end to end"]
