"""Surviving faults: non-finite losses, SIGINT/SIGTERM (e.g. a SLURM preemption), and provenance."""
from __future__ import annotations

import math
import os
import platform
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .. import console
from ..runs import disk_full


DIVERGED = 3  # the exit code of a run stopped by a NaN or inf loss
DISK_FULL = 4  # the exit code of a run stopped by a full disk


class TrainingFault(RuntimeError):
    """Training cannot go on; the message says what happened and what to do. Carries an exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class FiniteWatch:
    """Remembers, on the device, the first step at which each loss term went NaN or inf.

    `update` costs four tiny in-place kernels (a CUDA graph can hold them) and no host sync: per
    term, `alive` stays 1 until the term is first non-finite and `clean` counts the steps before
    that. `check` (every log_every steps and at the end of each epoch, before any checkpoint is
    written) reads both back and stops the run.
    """

    def __init__(self, device: torch.device, names: Sequence[str], last_good: Path, step: int = 0):
        self.names, self.last_good, self.start = list(names), last_good, step  # steps before this watch
        self.state = torch.zeros(2, len(names), dtype=torch.int64, device=device)
        self.alive, self.clean = self.state[0], self.state[1]
        self.alive.fill_(1)

    def update(self, terms: Tensor) -> None:
        """After each optimizer step, with its (total, recon, reg)."""
        self.alive.mul_(terms.abs() < math.inf)  # NaN < inf and inf < inf are both false
        self.clean.add_(self.alive)

    def check(self) -> None:
        alive, clean = self.state.tolist()
        bad = {name: self.start + c + 1 for name, a, c in zip(self.names, alive, clean) if not a}
        if not bad:
            return
        step = min(bad.values())
        terms = ", ".join(name for name, s in bad.items() if s == step)
        kept = (f"the last good checkpoint is kept at {self.last_good}" if self.last_good.is_file()
                else "no checkpoint had been written yet")
        raise TrainingFault(f"loss term(s) {terms} became NaN or inf at step {step}; {kept}; "
                            f"lower optim.lr or reg.weight and run again", exit_code=DIVERGED)


class Signals:
    """Installs `_handle` for SIGINT and SIGTERM while in the `with` block (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# submitit's time-out and preemption signal (SLURM sends it `signal_delay_s` before the time limit):
# SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another, as submitit reads it
TIME_OUT = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class StopSignals(Signals):
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once. The
    time-out signal stops it the same way; the handler it found (submitit's, which requeues the job and
    exits) then runs, after the step's checkpoint is written."""

    SIGNALS = (*Signals.SIGNALS, TIME_OUT)

    def __init__(self):
        self.received: int | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def fault(self, detail: str) -> TrainingFault:
        """The stop as a TrainingFault: `detail` says where and how to continue."""
        return TrainingFault(f"stopped by {signal.Signals(self.received).name} {detail}", exit_code=128 + self.received)

    def exit(self, saved: Path, step: int) -> None:
        name = signal.Signals(self.received).name
        handover = self._previous.get(self.received)
        if self.received == TIME_OUT and callable(handover):
            console.console.print(f"{name} after step {step}: checkpoint saved to {saved}; the requeued job "
                                  f"continues from it", markup=False, highlight=False, soft_wrap=True)
            handover(self.received, None)
        raise self.fault(f"after step {step}; checkpoint saved to {saved}; "
                         f"continue with: aelab train resume={shlex.quote(str(saved.parent))}")


class StopNow(Signals):
    """SIGINT/SIGTERM where there is no step to finish first (the final evaluation): stop at once, with
    `doing` and what to do next in the message. The handler raises a BaseException, as SIGINT's own
    KeyboardInterrupt does, so that no library's `except Exception` swallows it; leaving the block
    turns it into a TrainingFault."""

    class Received(BaseException):
        pass

    def __init__(self, doing: str):
        self.doing = doing

    def _handle(self, signum, frame) -> None:
        raise self.Received(signum)

    def __exit__(self, kind, error, trace) -> None:
        super().__exit__()
        if isinstance(error, self.Received):
            signum = error.args[0]
            raise TrainingFault(f"stopped by {signal.Signals(signum).name} {self.doing}",
                                exit_code=128 + signum) from None


def environment(device: torch.device, seed: int, command: str | None = None) -> dict:
    """What a rerun needs to reproduce the numbers: seed, versions, device, and the aelab command with the
    run's own settings (argv is the process's: under SLURM, submitit's)."""
    versions = {}
    for package in ("aelab", "torch", "torchvision", "hydra-core", "omegaconf", "numpy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"seed": seed, "device": str(device), "gpu": gpu, "python": sys.version.split()[0],
            "platform": platform.platform(), "argv": sys.argv, "command": command, "versions": versions,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


@contextmanager
def full_disk_stops(run_dir: Path) -> Iterator[None]:
    """A full disk while a run writes is a TrainingFault (DISK_FULL) that says where and how to go on."""
    try:
        yield
    except OSError as e:
        what = disk_full(e)
        if what is None:
            raise
        raise TrainingFault(f"{what}: free space, then continue with: aelab train resume={shlex.quote(str(run_dir))}",
                            DISK_FULL) from None
