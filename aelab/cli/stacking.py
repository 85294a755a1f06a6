"""`launcher=stacked`, aelab's side: a sweep's jobs grouped by what they share, each group's jobs set
up one by one by Hydra (their dirs, .hydra files, train.log) and then trained as one stacked model
(training.stacked), each job's end (test metrics, pictures, metrics.json) as a run's.

Jobs stack when they differ only in numbers a stacked step can hold per job: the keys of PER_JOB.
Any other difference (model, loss, reg or corruption type, data, batch size, epochs, optimizer type,
device) puts them in separate groups; a group of one trains as `aelab train` does alone."""
from __future__ import annotations

import math
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from .. import console

# the config keys in which the jobs of one stack may differ (a key, or a section: every key under it)
PER_JOB = ("reg.weight", "reg.rho", "corruption.noise_factor", "corruption.prob", "optim.lr", "optim.betas",
           "optim.weight_decay", "optim.momentum", "trainer.seed", "trainer.patience", "trainer.min_delta",
           "trainer.min_epochs", "trainer.log_every", "trainer.checkpoint_every", "sched", "eval", "sample", "resume")


def structure(cfg: DictConfig) -> str:
    """What the jobs of one stack must share: the job's config less hydra's and the PER_JOB keys."""
    shared = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    for key in PER_JOB:
        section, _, name = key.partition(".")
        if not name:
            shared.pop(section, None)
        elif section in shared and name in shared[section]:
            shared[section].pop(name)
    return OmegaConf.to_yaml(shared)


def groups(configs: list[DictConfig], size: int) -> list[list[int]]:
    """The jobs' indices in groups of at most `size` that may stack, in the order of their first job."""
    found: dict[str, list[list[int]]] = {}
    for index, cfg in enumerate(configs):
        chunks = found.setdefault(structure(cfg), [[]])
        if len(chunks[-1]) == size:
            chunks.append([])
        chunks[-1].append(index)
    return sorted((chunk for chunks in found.values() for chunk in chunks), key=lambda chunk: chunk[0])


@dataclass
class Entry:
    """A job of a group, built and placed by its task (aelab.cli.main.train) and waiting to train."""
    member: object  # training.stacked.Member
    started: object  # cli.job.Started
    job_num: int
    varied: list[str]
    mode: str = "stacked"  # how it trained, for metrics.json's step_mode
    seconds: float = 0.0  # and for how long (a stack's: the whole stack's training time)


class Collector:
    """The jobs of one group as Hydra's run_job sets them up: `add` (from the task) builds each, `train`
    trains them together and ends each; `values` are what each job's task would have returned."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = sweep_dir
        self.entries: list[Entry] = []
        self.values: dict[int, float] = {}
        self.data = None  # the group's splits, read once

    def add(self, cfg: DictConfig, run_dir: Path, resume: bool, job_num: int, command: str,
            varied: list[str]) -> float:
        """Build a job (its parts, its place: afresh or from its checkpoint) and keep it for `train`.
        Returns what its task returns for now (NaN: not trained yet), or the results of a job that has
        nothing left to train."""
        from ..training.stacked import Member
        from .job import start

        started = start(cfg, run_dir, resume, job_num, command, self.data)
        if isinstance(started, dict):  # finished already
            self.values[job_num] = started["val"]["recon"]
            return self.values[job_num]
        self.data = self.data or started.parts.data
        member = Member(started.parts, cfg, started.pos, run_dir, started.writer, f"job {job_num}")  # its random stream
        self.entries.append(Entry(member, started, job_num, varied))  # starts where its build left the global one
        return math.nan

    def train(self) -> dict[int, float]:
        """Train the group (as stacks of jobs at the same position, or one by one where a job cannot be
        stacked), then end each job as a run ends; a diverged job leaves failed.json, as it would alone."""
        from ..training.faults import TrainingFault, full_disk_stops
        from ..training.loop import fit
        from ..training.stacked import fit_stack, unstackable

        hint = f"continue with: aelab train resume={shlex.quote(str(self.sweep_dir))}"
        try:
            with full_disk_stops(self.sweep_dir):
                reason = unstackable(self.entries[0].member.parts) if self.entries else None
                if reason:
                    console.console.print(f"launcher=stacked: {len(self.entries)} jobs train one by one: {reason} "
                                          f"(docs/stacked.md)", markup=False, highlight=False, soft_wrap=True)
                for group in self.positions():
                    if reason or len(group) == 1:
                        for entry in group:
                            m = entry.member
                            entry.seconds, entry.mode = fit(m.parts, m.cfg, m.pos, m.run_dir, m.writer)
                        continue
                    seconds, mode = fit_stack([entry.member for entry in group], hint)
                    for entry in group:
                        entry.seconds, entry.mode = seconds, f"stacked ({len(group)} jobs): {mode}"
                for entry in self.entries:
                    self.values[entry.job_num] = self.end(entry)
        except TrainingFault as e:  # stopped by a signal, or a full disk: every job's checkpoint is kept
            console.error(str(e))
            sys.exit(e.exit_code)
        return self.values

    def positions(self) -> list[list[Entry]]:
        """The entries grouped by where they stand (epoch, step, batch): only jobs at the same place stack."""
        found: dict[tuple, list[Entry]] = {}
        for entry in self.entries:
            pos = entry.member.pos
            found.setdefault((pos.epoch, pos.step, pos.batch), []).append(entry)
        return list(found.values())

    def end(self, entry: Entry) -> float:
        """A job's end as a run's (what its task returns), or a diverged job's record as train() leaves it."""
        from .job import complete, diverged

        member = entry.member
        if member.failure is not None:
            return diverged(member.run_dir, entry.job_num, member.failure)
        return complete(entry.started, entry.seconds, entry.mode, entry.varied)["val"]["recon"]


collecting: Optional[Collector] = None  # set while a stacked launcher sets up a group's jobs


@contextmanager
def collect(sweep_dir: Path) -> Iterator[Collector]:
    """While the block runs, aelab's task builds each job and hands it to the collector instead of training it."""
    global collecting
    collecting = Collector(sweep_dir)
    try:
        yield collecting
    finally:
        collecting = None
