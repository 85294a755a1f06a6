"""Optimizers over the model's parameters (Adam's and AdamW's fused kernels on CPU and CUDA)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from .registry import ConfigError, Registry, number

OPTIMIZERS = Registry("optim")

# torch's fused Adam kernel (multi-tensor apply) takes at most 36 tensors per launch, 4 lists deep, and
# gives each 65,536-element chunk of a tensor one thread block, which strides over it 2,048 elements
# at a time (512 threads, 4 each).
TENSORS_PER_LAUNCH, CHUNK, STRIDE = 36, 65536, 2048


def piece_size(numels: list[int]) -> Optional[int]:
    """Elements per piece so that tensors of these sizes, cut into pieces, fill one launch's 36 slots;
    None where cutting cannot help (the tensors already fill the slots, or every piece would be a whole
    chunk anyway). Each tensor's rounding adds at most one piece: sum ceil(n / size) <= 36."""
    slots = TENSORS_PER_LAUNCH - len(numels)
    if slots <= 0:
        return None
    size = -(-sum(numels) // slots)
    size = -(-size // STRIDE) * STRIDE
    return size if size < CHUNK else None


class SplitFusedAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) (or AdamW, with decoupled_weight_decay), its kernel handed the
    tensors cut into equal contiguous pieces.

    The fused kernel runs one thread block per 65,536-element chunk, so a small model's update runs
    on a handful of an H100's 132 SMs: for the seed's 475k-parameter MLP that is ~14 blocks, 72 us of
    a 290 us training step (measured, batch 128). Cut into <= 36 pieces, the same kernel runs ~32
    blocks in one launch. Same arithmetic on the same elements, same state and state_dict as torch's.

    A scheduled run's rate is read from the group's `lr_device` tensor (schedules.Schedule writes it),
    which a captured CUDA graph's kernel reads at every replay.

    `cut`: None (the default) cuts CUDA tensors only. The CPU kernel already runs each tensor's
    elements in parallel, and pieces only add per-tensor work there (the seed MLP's step: 565 us cut,
    290 us whole, on 2 cores).
    """

    reads_device_lr = True  # the kernel takes the rate from `lr_device` (torch.optim.SGD reads group["lr"])

    def __init__(self, params, decoupled_weight_decay: bool = False, cut: Optional[bool] = None, **kwargs):
        super().__init__(params, fused=True, decoupled_weight_decay=decoupled_weight_decay, **kwargs)
        self.cut = cut

    def __setstate__(self, state):
        """A loaded state keeps the kind of weight decay this optimizer was built with (as torch's
        AdamW does): a group saved without the key would otherwise load as Adam's L2 decay."""
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = self.defaults["decoupled_weight_decay"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
            if not params:
                continue
            torch._foreach_add_(steps, 1)
            cut = params[0].is_cuda if self.cut is None else self.cut
            lists = split(params, grads, exp_avgs, exp_avg_sqs, steps, cut=cut)
            for tensors, _ in self._group_tensors_by_device_and_dtype(lists).values():
                kernel(group, *tensors)
        return loss

    def tensors(self) -> list[list[Tensor]]:
        """Its one group's params, exp_avgs, exp_avg_sqs and step counts, its state made where a step has
        not made it yet (as torch's Adam makes it): what `steps_together` hands the kernel."""
        (group,) = self.param_groups
        for p in group["params"]:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # fused: on p's device
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in group["params"]]
        return [list(group["params"]), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states]]


def kernel(group: dict, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
           exp_avg_sqs: list[Tensor], steps: list[Tensor]) -> None:
    """torch's fused Adam (AdamW) kernel on these tensors, with the group's settings (its rate from
    `lr_device` where a schedule keeps one)."""
    fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
    fused(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group.get("lr_device", group["lr"]),
          beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"], eps=group["eps"],
          amsgrad=False, maximize=group["maximize"])


def together(optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether `steps_together` can step these optimizers: aelab's Adams (AdamW) of one param group each."""
    return all(type(o) is SplitFusedAdam and len(o.param_groups) == 1 for o in optimizers)


@torch.no_grad()
def steps_together(optimizers: list[SplitFusedAdam], tensors: list[list[list[Tensor]]],
                   grads: list[list[Tensor]], counts: Optional[Tensor] = None) -> None:
    """One step of each optimizer (its `tensors()`, its gradients `grads` in its params' order, which
    need not be set on the params): one kernel call for all the optimizers whose settings agree (one per
    distinct setting), each tensor still its own in that call, so each optimizer's numbers are those of
    its own step(), bit for bit, without the N calls' Python work (a stacked sweep's step). `counts`:
    one tensor whose elements the step counts are views of, counted with one add (a foreach add of
    96 scalars took 0.25 ms on the CPU)."""
    calls: dict[tuple, tuple[dict, list[list[Tensor]]]] = {}
    for optimizer, (params, exp_avgs, exp_avg_sqs, steps), own in zip(optimizers, tensors, grads):
        group = optimizer.param_groups[0]
        key = (group["lr"], "lr_device" in group, tuple(group["betas"]), group["eps"], group["weight_decay"],
               group["decoupled_weight_decay"], group["maximize"])
        _, lists = calls.setdefault(key, (group, [[], [], [], [], []]))
        for column, part in zip(lists, (params, own, exp_avgs, exp_avg_sqs, steps)):
            column.extend(part)
        optimizer._opt_called = True  # what Optimizer.step's wrapper tells an lr scheduler (it stepped)
    if counts is not None:
        counts.add_(1)
    for group, lists in calls.values():
        if counts is None:
            torch._foreach_add_(lists[4], 1)
        kernel(group, *lists)


def split(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          steps: list[Tensor], cut: bool = True) -> list[list[Tensor]]:
    """The fused kernel's five lists, each tensor cut into views of piece_size elements (a parameter's
    four tensors alike; each piece reads its parameter's one step count); whole where not `cut`."""
    size = piece_size([p.numel() for p in params]) if cut else None
    out: list[list[Tensor]] = [[], [], [], [], []]
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        tensors = (p, g, m, v)
        if size is not None and p.numel() > size and all(t.is_contiguous() for t in tensors):
            pieces = [t.view(-1).split(size) for t in tensors]
        else:
            pieces = [(t,) for t in tensors]
        for column, part in zip(out, pieces):
            column.extend(part)
        out[4].extend([s] * len(pieces[0]))
    return out


def _adam_args(lr, betas, weight_decay) -> dict:
    if isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ConfigError(f"must be two numbers [beta1, beta2], e.g. [0.9, 0.999], got {betas!r}", "betas")
    b1, b2 = betas
    return dict(lr=number(lr, "lr", low=0, low_open=True),
                betas=(number(b1, "betas", low=0, high=1, high_open=True),
                       number(b2, "betas", low=0, high=1, high_open=True)),
                weight_decay=number(weight_decay, "weight_decay", low=0))


@OPTIMIZERS.register
def adam(params: Iterable[torch.nn.Parameter], device: torch.device, lr: float = 1e-3,
         betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return SplitFusedAdam(params, **_adam_args(lr, betas, weight_decay))


@OPTIMIZERS.register
def adamw(params: Iterable[torch.nn.Parameter], device: torch.device, lr: float = 1e-3,
          betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    return SplitFusedAdam(params, decoupled_weight_decay=True, **_adam_args(lr, betas, weight_decay))


@OPTIMIZERS.register
def sgd(params: Iterable[torch.nn.Parameter], device: torch.device, lr: float = 1e-2,
        momentum: float = 0.9) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=number(lr, "lr", low=0, low_open=True),
                           momentum=number(momentum, "momentum", low=0, high=1, high_open=True))
