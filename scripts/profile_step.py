"""Where a CUDA training step's time goes (CUDA only; a diagnosis, not a benchmark).

    python scripts/profile_step.py [--n 60000] [--cases none,kl,contractive]

For each case, on the bench's data and parts (scripts/bench.py): aelab's epoch throughput by default,
with trainer.compile=true and with trainer.tf32=true; the captured step's replay alone, and with the
batch gathered and copied in (is the host the bottleneck?); the step without the NaN watch and log
sums (what the bookkeeping costs); 2 and 8 steps in one graph (would fewer replays help?); and the
CUDA kernels of one eager step from the profiler, the costliest first. Its first form (the same
measurements in one flat script) gave docs/results/h100-2026-11-27/step-profile.txt on an H100,
read in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import gzip
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import bench
from aelab.training.checkpoint import Position
from aelab.training.faults import FiniteWatch
from aelab.training.objective import TERMS
from aelab.training.steps import CudaGraphs, capturable, make_step, recorded_step, train_step
from aelab.training.loop import start_epoch

CASES = {"none": [], "kl": ["reg=kl", "reg.weight=0.1"],
         "contractive": ["model=contractive", "reg=contractive", "reg.weight=0.1"]}


def sync() -> None:
    torch.cuda.synchronize()


def per_call(label: str, fn: Callable[[], None], calls: int) -> float:
    for _ in range(20):
        fn()
    sync()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    seconds = (time.perf_counter() - begin) / calls
    print(f"  {label:44s} {seconds * 1e6:8.1f} us/call", flush=True)
    return seconds


def captured(parts, fn: Callable[[], None]) -> Callable[[], None]:
    """fn warmed up and captured by aelab's own recipe (aelab.training.steps.CudaGraphs); returns the replay."""
    graphs, call = CudaGraphs(), lambda _: fn()
    for _ in range(3):
        graphs.warm_up(call, None)
    parts.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads in the graph's pool
    with capturable(parts.optimizer):
        return graphs.capture(call, None)


def profile_case(root: Path, logs: Path, overrides: list[str]) -> None:
    def fresh():
        parts = bench.aelab_parts(root, "cuda", overrides)
        pos = Position()
        start_epoch(parts, pos)
        return parts, pos, FiniteWatch(parts.device, TERMS, logs / "none")

    for extra in ([], ["trainer.compile=true"], ["trainer.tf32=true"]):
        sps, mode = bench.aelab_epochs(bench.aelab_parts(root, "cuda", overrides + extra), 2)
        print(f"  aelab epochs {' '.join(extra) or 'default':30s} {sps:10.0f} samples/s  {mode}  "
              f"({1e6 * bench.BATCH / sps:.1f} us/step)", flush=True)

    parts, pos, watch = fresh()
    step, x, batch = make_step(parts, pos, watch, print), parts.data.train.x, bench.BATCH
    for i in range(6):
        step(x[pos.order[i * batch:(i + 1) * batch]])
    per_call("GraphStep: replay() only", step.replay, 2000)
    count = iter(range(10**9))

    def gathered():
        i = next(count) % 400
        step(x[pos.order[i * batch:(i + 1) * batch]])
    per_call("GraphStep: gather + copy + replay", gathered, 2000)

    parts, _, _ = fresh()
    static = parts.data.train.x[:batch].clone()
    per_call("train_step only (no watch/sums) replay", captured(parts, lambda: train_step(parts, static)), 2000)

    for k in (2, 8):
        parts, pos, watch = fresh()
        step = recorded_step(parts, pos, watch)
        statics = [parts.data.train.x[j * batch:(j + 1) * batch].clone() for j in range(k)]
        replay = captured(parts, lambda: [step(s) for s in statics])
        seconds = per_call(f"{k} steps in one graph, per replay", replay, 2000 // k)
        print(f"  {'':44s} {seconds / k * 1e6:8.1f} us/step -> {batch * k / seconds:10.0f} samples/s", flush=True)

    from torch.profiler import ProfilerActivity, profile
    parts, pos, watch = fresh()
    step, xb = recorded_step(parts, pos, watch), parts.data.train.x[:batch].clone()
    for _ in range(5):
        step(xb)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(xb)
        sync()
    kernels = [k for k in prof.key_averages() if k.self_device_time_total > 0]
    print(f"  eager step: {sum(k.count for k in kernels) / 10:.1f} kernels/step, "
          f"{sum(k.self_device_time_total for k in kernels) / 10:.1f} us kernel time/step", flush=True)
    for k in sorted(kernels, key=lambda k: -k.self_device_time_total)[:14]:
        print(f"    {k.count / 10:5.1f}x {k.self_device_time_total / 10:8.1f} us  {k.key[:80]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60000, help="training images")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py: needs a CUDA GPU (on the CPU, use scripts/bench.py --device cpu)")
    found = [path for path in bench.MNIST_IMAGES if path.is_file()]
    if found:
        data = np.frombuffer(gzip.decompress(found[0].read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
    else:
        data = np.random.default_rng(0).integers(0, 256, (args.n, 28, 28), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        root = bench.write_root(np.resize(data, (args.n, 28, 28)), Path(tmp))
        for case in args.cases.split(","):
            print(f"== {case}", flush=True)
            try:
                profile_case(root, Path(tmp), CASES[case])
            except Exception:  # a diagnosis goes on to the next case
                print(f"  {case}: FAILED {traceback.format_exc().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
