"""How a training step runs: eagerly, or captured once as a CUDA graph and replayed.

A step is the whole of it: corruption, forward, losses, backward, optimizer step, and the
bookkeeping (the NaN watch, the summed terms for the logs), all in place on device tensors. So one
graph replay does everything, and nothing is read back to the host between log points.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Protocol

import torch
from torch import Tensor

from ..build import Parts
from .checkpoint import Position
from ..console import first_line
from .faults import FiniteWatch, TrainingFault
from .objective import loss_terms, stacked

Step = Callable[[Tensor], None]
Objective = Callable[[Parts, Tensor], dict]


def train_step(parts: Parts, clean: Tensor, objective: Objective = loss_terms) -> Tensor:
    """One optimizer step; returns the detached (total, recon, reg) without a host sync."""
    parts.optimizer.zero_grad(set_to_none=True)
    terms = objective(parts, clean)
    terms["total"].backward()
    parts.optimizer.step()
    return stacked(terms)


def recorded_step(parts: Parts, pos: Position, watch: FiniteWatch, objective: Objective = loss_terms) -> Step:
    """train_step, then in place: the NaN watch, the log window and the epoch's sample-weighted sums."""
    def step(clean: Tensor) -> None:
        terms = train_step(parts, clean, objective)
        watch.update(terms)
        pos.window += terms
        pos.epoch_sums.add_(terms, alpha=len(clean))
    return step


class GraphBackend(Protocol):
    def warm_up(self, step: Step, clean: Tensor) -> None: ...

    def capture(self, step: Step, static: Tensor) -> Callable[[], None]: ...


class CudaGraphs:
    """torch.cuda's recipe for whole-network capture: warm up on a side stream, capture, replay.
    `generators`: random streams besides the device's default one that the step draws from (a stack's
    members' own), registered with the graph so that each replay draws fresh numbers from them."""

    def __init__(self, generators: tuple[torch.Generator, ...] = ()):
        self.side = torch.cuda.Stream()
        self.generators = generators

    def warm_up(self, step: Step, clean: Tensor) -> None:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            step(clean)
        torch.cuda.current_stream().wait_stream(self.side)

    def capture(self, step: Step, static: Tensor) -> Callable[[], None]:
        """Records step(static) without running it; returns the replay."""
        graph, failure = torch.cuda.CUDAGraph(), None
        for generator in self.generators:
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph):
                try:
                    step(static)
                except Exception as e:  # the step's own error says more than the aborted capture's
                    failure = e
                    raise
        except Exception as e:
            raise (failure or e) from None
        return graph.replay


@contextmanager
def capturable(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Mark Adam-style param groups capturable for the capture only. aelab's CUDA Adam is fused, whose
    step count already lives on the device, so eager steps run the same kernels without the flag."""
    groups = [g for g in optimizer.param_groups if "capturable" in g]
    saved = [g["capturable"] for g in groups]
    for g in groups:
        g["capturable"] = True
    try:
        yield
    finally:
        for g, value in zip(groups, saved):
            g["capturable"] = value


class GraphStep:
    """Replays one captured graph of `step` for every full batch; a batch of another shape (the
    epoch's last, partial one) runs eagerly, as does everything after a failed capture."""

    WARMUP = 3  # eager steps before capture: optimizer state, cuBLAS handles, compiled kernels get made

    def __init__(self, step: Step, shape: tuple[int, ...], optimizer: torch.optim.Optimizer,
                 backend: GraphBackend, required: bool, say: Callable[[str], None]):
        self.step, self.shape, self.optimizer, self.backend = step, tuple(shape), optimizer, backend
        self.required, self.say = required, say
        self.static: Optional[Tensor] = None
        self.replay: Optional[Callable[[], None]] = None
        self.warm = 0
        self.failed: Optional[str] = None

    @property
    def mode(self) -> str:
        if self.failed:
            return f"eager (cuda graph capture failed: {self.failed})"
        return "cuda graph" if self.replay else "eager (not captured yet)"

    def __call__(self, clean: Tensor) -> None:
        if self.failed or tuple(clean.shape) != self.shape:
            return self.step(clean)
        if self.replay is None:
            if self.warm < self.WARMUP:
                self.warm += 1
                return self.backend.warm_up(self.step, clean)
            if not self.capture(clean):
                return self.step(clean)
        self.static.copy_(clean)
        self.replay()

    def capture(self, clean: Tensor) -> bool:
        """Capture (which runs nothing); on failure say why once, or stop under cuda_graph=on."""
        self.static = clean.clone()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads in the graph's pool
        try:
            with capturable(self.optimizer):
                self.replay = self.backend.capture(self.step, self.static)
        except Exception as e:  # any capture failure: the step is still intact, eager can take over
            self.optimizer.zero_grad(set_to_none=True)
            self.failed = first_line(e)
            if self.required:
                raise TrainingFault(f"trainer.cuda_graph=on: capturing the training step failed ({self.failed}); "
                                    f"use trainer.cuda_graph=auto to train eagerly instead", exit_code=2) from None
            self.say(f"cuda graph: capture failed ({self.failed}); training eagerly from here")
            return False
        self.say(f"cuda graph: whole training step captured for batches of {self.shape[0]}; "
                 f"a shorter last batch runs eagerly")
        return True


def make_step(parts: Parts, pos: Position, watch: FiniteWatch, say: Callable[[str], None],
              backend: Optional[GraphBackend] = None) -> Step:
    """The step `aelab train` runs: compiled if trainer.compile, graph-replayed on CUDA unless
    trainer.cuda_graph=off (or a schedule's rate could not reach the graph). `backend` stands in for
    torch.cuda's graphs in CPU tests."""
    objective = torch.compile(loss_terms) if parts.trainer.compile else loss_terms
    step = recorded_step(parts, pos, watch, objective)
    if not replayable([parts], backend, say):
        return step
    shape = (parts.trainer.batch_size, *parts.data.train.x.shape[1:])
    return GraphStep(step, shape, parts.optimizer, backend or CudaGraphs(),
                     required=parts.trainer.cuda_graph == "on", say=say)


def replayable(jobs: list[Parts], backend: Optional[GraphBackend], say: Callable[[str], None]) -> bool:
    """Whether the step of these jobs (one, or a stack's) is captured as a CUDA graph: on CUDA (or with a
    stand-in `backend`) unless trainer.cuda_graph=off or a schedule's rate could not reach the graph."""
    first = jobs[0]
    if first.trainer.cuda_graph == "off" or (first.device.type != "cuda" and backend is None):
        return False
    host = [p for p in jobs if p.schedule.active and not getattr(p.optimizer, "reads_device_lr", False)]
    if host:
        why = "this optimizer reads its learning rate on the host, where a captured graph would keep the first one"
        name = host[0].schedule.name
        if first.trainer.cuda_graph == "on":
            raise TrainingFault(f"trainer.cuda_graph=on: sched={name}: {why}; use optim=adam or adamw, or "
                                f"trainer.cuda_graph=auto to train eagerly", exit_code=2)
        say(f"cuda graph: not captured: {why}; sched={name} trains eagerly (optim=adam and adamw are replayed)")
        return False
    return True
