"""Stacked sweeps (launcher=stacked) against the same jobs one by one, in training throughput and end to end.

    python scripts/bench_stacked.py                          # CUDA if present, else CPU; everything
    python scripts/bench_stacked.py --skip-sweeps --json out.json

1. Training throughput, in one process: the 8 jobs of `reg=l1 reg.weight=<8 weights>` built from aelab's
   configs, trained as one stack (`training.stacked.Stack.step`) and one by one (each job's own step,
   `training.steps.make_step`), in alternation, the best of --repeat rounds: samples/s per job and
   aggregate, for the default digits MLP and for the seed's MNIST-shaped MLP (784-256-128-32, batch
   128, random images). Then the stack's throughput and peak memory as N grows (1, 2, 4, ..., --max-n).
2. End to end: `aelab train -m reg=l1 reg.weight=<8 weights>` (the default experiment on digits) in a
   fresh process with launcher=stacked, basic and parallel (if hydra-joblib-launcher is installed):
   wall seconds, and every job's test MSE, which must agree between launchers.

Targets (issue 32), on 2 CPU cores: stacked aggregate training throughput >= 1.5x the 8 jobs one by one on
digits; the 8-job sweep >= 2.5x faster end to end than launcher=basic. On a GPU: >= 2,000,000 samples/s
aggregate at N=8, batch 128, plain MLP, and >= 4x one job's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def members(device: str, n: int, extra: list[str], root: Path):
    """n jobs of the l1 sweep built as the stacked launcher builds them (training.stacked.Member)."""
    from hydra import compose, initialize_config_module

    from aelab.cli.job import start
    from aelab.training.faults import FiniteWatch
    from aelab.training.loop import start_epoch
    from aelab.training.objective import TERMS
    from aelab.training.stacked import Member

    out, data = [], None
    for index in range(n):
        with initialize_config_module("aelab.configs", version_base="1.3"):
            cfg = compose("train", overrides=[f"device={device}", "reg=l1", f"reg.weight={WEIGHTS[index % 8]}",
                                              f"trainer.seed={index // 8}", *extra])
        run_dir = root / f"job{n}_{index}"
        run_dir.mkdir(parents=True)
        s = start(cfg, run_dir, data=data)
        data = s.parts.data
        member = Member(s.parts, cfg, s.pos, run_dir, s.writer, f"job {index}")
        member.watch = FiniteWatch(member.parts.device, TERMS, run_dir / "none.pt")
        start_epoch(member.parts, member.pos, member.generator)
        out.append(member)
    return out


def steps_per_second(run, steps: int, device: str) -> float:
    sync(device)
    began = time.perf_counter()
    for batch in range(steps):
        run(batch)
    sync(device)
    return steps / (time.perf_counter() - began)


def throughput(device: str, extra: list[str], steps: int, repeat: int, root: Path, n: int = 8) -> dict:
    """Samples/s of n jobs as one stack and one by one (each job's own step), alternated, best of `repeat`."""
    from aelab.training.stacked import Stack
    from aelab.training.steps import make_step

    group = members(device, n, extra, root)
    batch_size = group[0].parts.trainer.batch_size
    per_epoch = len(group[0].parts.data.train) // batch_size  # full batches only
    singles = []
    for m in group:
        step = make_step(m.parts, m.pos, m.watch, print)
        x = m.parts.data.train.x
        singles.append(lambda b, step=step, m=m, x=x: step(x[m.pos.order[b * batch_size:(b + 1) * batch_size]]))
    stack = Stack(group)

    stacked_run = lambda b: stack.step(b % per_epoch)  # noqa: E731  (with each job's bookkeeping, as alone)
    alone_run = lambda b: [single(b % per_epoch) for single in singles]  # noqa: E731
    stacked_run(0), alone_run(0)  # warm-up
    best = {"stacked": 0.0, "alone": 0.0}
    for _ in range(repeat):
        best["stacked"] = max(best["stacked"], steps_per_second(stacked_run, steps, device))
        best["alone"] = max(best["alone"], steps_per_second(alone_run, steps, device))
    return {"jobs": n, "batch": batch_size,
            "stacked_per_job": best["stacked"] * batch_size, "stacked_aggregate": best["stacked"] * batch_size * n,
            "alone_per_job": best["alone"] * batch_size, "alone_aggregate": best["alone"] * batch_size * n,
            "x": best["stacked"] / best["alone"]}


def peak_bytes(device: str) -> int:
    """CUDA: the peak of allocated memory since the last reset. CPU: this process's peak resident set
    since the last reset_peak (Linux's VmHWM, which writing 5 to /proc/self/clear_refs resets)."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else status_bytes("VmHWM")


def status_bytes(field: str) -> int:
    """A size this process's /proc/self/status gives (Linux: VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/self/status has no {field}: the CPU memory figures need Linux")


def reset_peak(device: str) -> int:
    """Start measuring a new peak; returns what is resident (allocated) now, which the peak is measured from."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def grown(device: str, n: int, extra: list[str], steps: int, root: Path) -> dict:
    """One stack of n jobs: its training throughput, and the peak memory it adds from before its jobs were
    built (their parts, the stack, its steps: CUDA's allocated memory; the CPU's resident set, each N in a
    fresh process: scripts/bench_stacked.py --growth-child N)."""
    from aelab.training.stacked import Stack

    members(device, 1, extra, root / "warm")  # the data read and the imports made before measuring
    before = reset_peak(device)
    group = members(device, n, extra, root)
    stack = Stack(group)
    per_epoch = len(group[0].parts.data.train) // group[0].parts.trainer.batch_size
    for batch in range(3):  # warm-up
        stack.step(batch)
    rate = steps_per_second(lambda b: stack.step(b % per_epoch), steps, device)
    batch = group[0].parts.trainer.batch_size
    return {"n": n, "aggregate_samples_per_s": rate * batch * n, "per_job_samples_per_s": rate * batch,
            "peak_mib": (peak_bytes(device) - before) / 2**20}


def growth(device: str, extra: list[str], steps: int, max_n: int, root: Path) -> list[dict]:
    """grown() for N = 1, 2, 4, ... max_n (on the CPU each in its own process)."""
    rows, n = [], 1
    root.mkdir(parents=True, exist_ok=True)
    while n <= max_n:
        if device == "cuda":
            rows.append(grown(device, n, extra, steps, root / str(n)))
        else:
            out = root / f"growth{n}.json"
            subprocess.run([sys.executable, __file__, "--growth-child", str(n), "--steps", str(steps), "--json", str(out),
                            "--device", device, "--extra", " ".join(extra)], check=True, capture_output=True)
            rows.append(json.loads(out.read_text()))
        n *= 2
    return rows


def sweep_seconds(launcher: str, extra: list[str], root: Path) -> dict:
    """`aelab train -m launcher=L reg=l1 reg.weight=<8>` in a fresh process: wall seconds, each job's test
    MSE, the seconds its jobs trained (a stack's once: its jobs share them), and where the jobs end one
    after another (a stack's: after all trained), the median gap between two jobs' finishes: one job's
    end (test metrics, probes, pictures, files) in a warm process."""
    sweep = root / f"sweep_{launcher}"
    command = [sys.executable, "-m", "aelab", "train", "-m", f"launcher={launcher}", "reg=l1",
               f"reg.weight={','.join(WEIGHTS)}", f"hydra.sweep.dir={sweep}",
               "hydra.job.config.override_dirname.exclude_keys=[launcher]", *extra]
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=root)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"launcher={launcher} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    records = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    stacked = launcher == "stacked"
    finished = [r["finished_at"] for r in records]
    return {"seconds": seconds, "test_mse": [r["test"]["mse"] for r in records],
            "training_seconds": max(r["seconds"] for r in records) if stacked else sum(r["seconds"] for r in records),
            "end_seconds": statistics.median(b - a for a, b in zip(finished, finished[1:])) if stacked else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200, help="timed steps per round")
    p.add_argument("--repeat", type=int, default=5, help="rounds; the best counts")
    p.add_argument("--max-n", type=int, default=32, help="the largest stack of the growth table")
    p.add_argument("--skip-sweeps", action="store_true", help="only the in-process throughput")
    p.add_argument("--sweep-args", default="", help="extra overrides for the end-to-end sweeps, e.g. trainer.epochs=5")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--growth-child", type=int, default=0, help=argparse.SUPPRESS)  # one row of the growth table
    p.add_argument("--extra", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.growth_child:
        with tempfile.TemporaryDirectory() as tmp:
            row = grown(args.device, args.growth_child, args.extra.split(), args.steps, Path(tmp))
        Path(args.json).write_text(json.dumps(row))
        return
    torch.set_num_threads(torch.get_num_threads())
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake = write_fake_mnist(root / "mnist")
        seed_mlp = ["data=mnist", f"data.root={fake}"]
        report["throughput"] = {
            "digits": throughput(args.device, [], args.steps, args.repeat, root / "a"),
            "mnist_shaped": throughput(args.device, seed_mlp, args.steps, args.repeat, root / "b"),
        }
        report["growth"] = growth(args.device, seed_mlp if args.device == "cuda" else [], args.steps, args.max_n,
                                  root / "c")
        if not args.skip_sweeps:
            extra = args.sweep_args.split()
            from aelab.cli.main import installed
            launchers = ["stacked", "basic"] + (["parallel"] if installed("hydra_plugins.hydra_joblib_launcher") else [])
            report["sweeps"] = {}
            for launcher in launchers:
                report["sweeps"][launcher] = sweep_seconds(launcher, extra, root)
    show(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def write_fake_mnist(root: Path) -> Path:
    """Random 28x28 images in torchvision's MNIST layout (10,000: 60,000 would only add reading time)."""
    import numpy as np
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 8000), ("t10k", 2000)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">HBB3I", 0, 8, 3, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">HBB1I", 0, 8, 1, n) + labels.tobytes())
    return root


def show(report: dict) -> None:
    print(f"device {report['device']}{' (' + report['gpu'] + ')' if report['gpu'] else ''}, "
          f"{report['threads']} threads, {report['date']}")
    print("| data | jobs | stacked samples/s per job | aggregate | one by one, aggregate | stacked / one by one |")
    print("|---|---|---|---|---|---|")
    for name, row in report["throughput"].items():
        print(f"| {name} | {row['jobs']} | {row['stacked_per_job']:,.0f} | {row['stacked_aggregate']:,.0f} | "
              f"{row['alone_aggregate']:,.0f} | {row['x']:.2f}x |")
    print("\n| N | aggregate samples/s | per job | peak memory (MiB) |\n|---|---|---|---|")
    for row in report["growth"]:
        print(f"| {row['n']} | {row['aggregate_samples_per_s']:,.0f} | {row['per_job_samples_per_s']:,.0f} | "
              f"{row['peak_mib']:,.0f} |")
    targets = [("digits stacked / one by one, training", report["throughput"]["digits"]["x"], 1.5)]
    if "sweeps" in report:
        print("\n| launcher | end to end (s) | training (s) | a job's end, warm (s) | test MSE of the 8 jobs |"
              "\n|---|---|---|---|---|")
        for launcher, row in report["sweeps"].items():
            end = "" if row["end_seconds"] is None else f"{row['end_seconds']:.2f}"
            training = "" if launcher == "parallel" else f"{row['training_seconds']:.1f}"  # 2 workers at once
            print(f"| {launcher} | {row['seconds']:.1f} | {training} | {end} | "
                  f"{' '.join(f'{m:.5f}' for m in row['test_mse'])} |")
        sweeps = report["sweeps"]
        targets.append(("8-job sweep, basic / stacked, end to end", sweeps["basic"]["seconds"] /
                        sweeps["stacked"]["seconds"], 2.5))
        report["max_mse_difference"] = max(abs(a - b) for a, b in zip(sweeps["stacked"]["test_mse"],
                                                                       sweeps["basic"]["test_mse"]))
        print(f"\nlargest test MSE difference, stacked vs basic: {report['max_mse_difference']:.2e}")
    if report["device"] == "cuda":
        plain = report["throughput"]["mnist_shaped"]
        targets += [("GPU aggregate samples/s, N=8", plain["stacked_aggregate"], 2_000_000),
                    ("GPU stacked aggregate / one job", plain["stacked_aggregate"] / plain["alone_per_job"], 4)]
    report["targets"] = [{"target": name, "value": value, "needs": need, "met": value >= need}
                         for name, value, need in targets]
    print()
    for t in report["targets"]:
        print(f"{t['target']}: {t['value']:,.2f} (target >= {t['needs']:,}): {'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
