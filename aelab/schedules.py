"""Learning-rate schedules (the `sched` group): torch.optim.lr_scheduler's own, stepped after every
optimizer step (cosine with a linear warm-up, onecycle) or after every epoch on the validation
objective (plateau).

The schedulers work on the param groups' `lr` as torch's do (Python floats); each value is then
written into a tensor on the device (`lr_device`, one fill per step, no host sync) that aelab's Adam
hands its fused kernel: the kernel a captured CUDA graph replays reads the current rate there."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.optim import lr_scheduler

from .registry import Registry, number

SCHEDULES = Registry("sched")
Maker = Callable[[torch.optim.Optimizer, int, int], lr_scheduler.LRScheduler]  # (optimizer, steps, steps/epoch)


@dataclass
class Schedule:
    """A schedule as configured; `start` makes torch's scheduler for a run's optimizer. `per`: "step"
    (after each optimizer step), "epoch" (after each epoch, on the validation objective) or "never"."""
    name: str
    per: str
    make: Optional[Maker] = None
    scheduler: Optional[lr_scheduler.LRScheduler] = field(default=None, repr=False)
    base: list[float] = field(default_factory=list)  # each param group's optim.lr, as built (a resumed
    # optimizer's groups hold the rate it stopped at)

    def bind(self, optimizer: torch.optim.Optimizer) -> Schedule:
        self.base = [float(group["lr"]) for group in optimizer.param_groups]
        return self

    @property
    def active(self) -> bool:
        return self.per != "never"

    def start(self, optimizer: torch.optim.Optimizer, device: torch.device, total_steps: int,
              steps_per_epoch: int, step: int = 0, state: Optional[dict] = None) -> None:
        """The scheduler at optimizer step `step` of a run of `total_steps`: a per-step schedule is
        replayed from its start (the same float operations as an uninterrupted run, so a resumed run
        continues bit for bit, and one trained further follows the new horizon); plateau's state,
        which depends on the validation history, is loaded."""
        if not self.active:
            return
        dtype = torch.float64 if device.type == "cpu" else torch.float32  # the fused kernels' lr types
        for group, base in zip(optimizer.param_groups, self.base):
            group["lr"] = base
            for key in ("initial_lr", "max_lr", "min_lr"):
                group.pop(key, None)
            group["lr_device"] = torch.tensor(base, dtype=dtype, device=device)
        with warnings.catch_warnings():  # torch's "scheduler stepped before the optimizer" (a replay)
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler = self.make(optimizer, total_steps, steps_per_epoch)
            if self.per == "step":
                for _ in range(step):
                    self.scheduler.step()
            elif state:
                self.scheduler.load_state_dict(state)
        self.publish()

    def publish(self) -> None:
        for group in self.scheduler.optimizer.param_groups:
            group["lr_device"].fill_(group["lr"])

    def after_step(self) -> None:
        if self.per == "step":
            self.scheduler.step()
            self.publish()

    def after_epoch(self, val_total: float) -> None:
        if self.per == "epoch":
            self.scheduler.step(val_total)
            self.publish()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.per == "epoch" else {}


@SCHEDULES.register
def none() -> Schedule:
    return Schedule("none", "never")


@SCHEDULES.register
def cosine(warmup_epochs: float = 1, start_factor: float = 0.01, floor: float = 0.0) -> Schedule:
    """Linear warm-up from start_factor x lr over warmup_epochs, then cosine annealing to floor x lr at
    the last step (torch's LinearLR, then CosineAnnealingLR, in a SequentialLR)."""
    warmup_epochs = number(warmup_epochs, "warmup_epochs", low=0)
    start_factor = number(start_factor, "start_factor", low=0, high=1, low_open=True)
    floor = number(floor, "floor", low=0, high=1)

    def make(optimizer, total_steps, steps_per_epoch):
        warmup = min(round(warmup_epochs * steps_per_epoch), total_steps - 1)
        eta_min = floor * optimizer.param_groups[0]["lr"]
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=eta_min)
        if not warmup:
            return cosine
        linear = lr_scheduler.LinearLR(optimizer, start_factor=start_factor, total_iters=warmup)
        return lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    return Schedule("cosine", "step", make)


@SCHEDULES.register
def onecycle(pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> Schedule:
    """Up from lr / div_factor to lr over pct_start of the steps, then down to lr / div_factor /
    final_div_factor, both cosine (torch's OneCycleLR; Adam's beta1 is not cycled: the captured
    kernel reads it as a constant)."""
    pct_start = number(pct_start, "pct_start", low=0, high=1, low_open=True, high_open=True)
    div_factor = number(div_factor, "div_factor", low=1)
    final_div_factor = number(final_div_factor, "final_div_factor", low=1)

    def make(optimizer, total_steps, steps_per_epoch):
        return lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                       total_steps=total_steps + 1, pct_start=pct_start, div_factor=div_factor,
                                       final_div_factor=final_div_factor, cycle_momentum=False)
    return Schedule("onecycle", "step", make)


@SCHEDULES.register
def plateau(factor: float = 0.5, patience: int = 5, threshold: float = 1e-3, floor: float = 1e-3) -> Schedule:
    """lr x factor once the validation objective has not improved by threshold (relative) for patience
    epochs, down to floor x lr (torch's ReduceLROnPlateau)."""
    factor = number(factor, "factor", low=0, high=1, low_open=True, high_open=True)
    patience = number(patience, "patience", low=0, integer=True)
    threshold = number(threshold, "threshold", low=0)
    floor = number(floor, "floor", low=0, high=1)

    def make(optimizer, total_steps, steps_per_epoch):
        return lr_scheduler.ReduceLROnPlateau(optimizer, factor=factor, patience=patience, threshold=threshold,
                                              min_lr=[floor * g["lr"] for g in optimizer.param_groups])
    return Schedule("plateau", "epoch", make)
