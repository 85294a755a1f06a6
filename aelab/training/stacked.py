"""N jobs of a sweep trained as one stacked model (`launcher=stacked`).

The jobs of a stack share everything but numbers: the model's architecture, the loss, the kind of
penalty and corruption, the data, the batch size. Their weights live side by side in (N, ...) tensors;
one step runs the N forward passes as batched products (torch.baddbmm for an MLP, torch.func.vmap for
other models, whose convolutions it batches as grouped ones), sums the N objectives (so each job's
gradient is its own: d(sum)/d(objective_i) = 1) and runs one backward pass. Each job keeps the rest of
what makes it a job: its own parts (each model's parameters are views of its slice of the stack, so
evaluating, checkpointing and the optimizer see an ordinary model), its own optimizer and schedule,
its own random stream (a generator started where its build left the global one: the same shuffles and
noise as the job trained alone), its own position, early stopping and best weights. A job that stops
(early stopping, a NaN) leaves the stack, which goes on without it.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from .. import console
from ..build import Parts
from ..models import Forward, MLPAutoencoder, jacobian_sq_norm
from ..optim import steps_together, together
from . import checkpoint
from .checkpoint import Position
from .faults import FiniteWatch, StopSignals, TrainingFault
from .loop import end_epoch, start_epoch, stepped
from .monitor import ACTIVITY, sparsity
from .objective import TERMS, batches
from .steps import CudaGraphs, GraphBackend, GraphStep, replayable


@dataclass
class Member:
    """One job of a stack: its built parts, config, position, run dir and TensorBoard writer."""
    parts: Parts
    cfg: DictConfig
    pos: Position
    run_dir: Path
    writer: SummaryWriter
    name: str  # the job's dir name, which its lines start with
    generator: torch.Generator = None  # the job's own random stream (shuffles, corruption noise)
    watch: Optional[FiniteWatch] = None
    cadence: Optional[checkpoint.Cadence] = None
    failure: Optional[TrainingFault] = None  # it diverged: the stack went on without it

    def __post_init__(self):
        if self.generator is None:  # started where the job's build (torch.manual_seed, the model's init) left it
            device = self.parts.device
            self.generator = torch.Generator(device)
            state = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
            self.generator.set_state(state)

    @property
    def training(self) -> bool:
        trainer = self.parts.trainer
        return self.failure is None and self.pos.stopped_epoch is None and self.pos.epoch < trainer.epochs


@contextmanager
def own_stream(generator: torch.Generator) -> Iterator[None]:
    """The global random stream of the generator's device is the member's own while the block runs (what
    draws from it there, as Hutchinson's probes in the validation pass do, draws as the job alone would)."""
    device = generator.device
    if device.type == "cpu":
        get, put = torch.get_rng_state, torch.set_rng_state
    else:
        get, put = (lambda: torch.cuda.get_rng_state(device)), (lambda state: torch.cuda.set_rng_state(state, device))
    saved = get()
    put(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(get())
        put(saved)


def unstackable(parts: Parts) -> Optional[str]:
    """Why a job cannot be trained in a stack (None: it can); its group then trains one job at a time."""
    if parts.trainer.compile:
        return "trainer.compile=true compiles one model's objective"
    if parts.data.train.x.device != parts.device:
        return f"the data does not fit on {parts.device}"
    return None


class Optimizers:
    """The members' optimizers as one, for a GraphStep: their groups, and their gradients let go."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


class Stack:
    """The members' weights stacked into (N, ...) leaf tensors, each member's parameters pointed at its
    slice; `step` trains them all on one batch each: eagerly, or captured once as a CUDA graph and
    replayed (as a single run's step, training.steps), the members' own random streams registered with it."""

    def __init__(self, members: list[Member], backend: Optional[GraphBackend] = None,
                 say: Callable[[str], None] = print):
        self.members = members
        models = [m.parts.model for m in members]
        self.template = models[0]
        self.names = [name for name, _ in self.template.named_parameters()]
        self.params = [dict(model.named_parameters()) for model in models]  # each member's, by name
        self.weights = {name: torch.stack([p[name].detach() for p in self.params]).requires_grad_()
                        for name in self.names}
        for i, p in enumerate(self.params):
            for name in self.names:
                p[name].data = self.weights[name].data[i]
        first = members[0].parts
        self.loss, self.penalty, self.trace = first.loss, first.penalty, first.trace
        self.scale = torch.tensor([m.parts.penalty.weight for m in members], device=first.device)
        self.options = {key: torch.tensor([[m.parts.penalty.options[key]] for m in members], device=first.device)
                        for key in first.penalty.options}
        if first.penalty.jacobian == "hutchinson":  # its random probes: each member's from its own stream
            self.options["draw"] = self.probes
        self.input_grad = first.input_grad
        if not isinstance(self.template, MLPAutoencoder):  # other models: their own forward, vmapped over the stack
            self.skeleton = copy.deepcopy(self.template).to("meta")
        self.optimizers = [m.parts.optimizer for m in members]
        self.adam: Optional[list] = None  # eager Adams: their tensors, stepped together (optim.steps_together)
        self.counts: Optional[Tensor] = None  # their step counts, of which theirs are views
        self.run: Callable[[Tensor], None] = self.recorded
        if replayable([m.parts for m in members], backend, say):
            shape = (len(members), first.trainer.batch_size, *first.data.train.x.shape[1:])
            self.run = GraphStep(self.recorded, shape, Optimizers(self.optimizers),
                                 backend or CudaGraphs(tuple(m.generator for m in members)),
                                 required=first.trainer.cuda_graph == "on", say=say)
        elif together(self.optimizers):  # a graph replays each member's own step: its rate may change
            self.adam = [optimizer.tensors() for optimizer in self.optimizers]
            for params, (own, *_) in zip(self.params, self.adam):
                assert all(a is b for a, b in zip(own, params.values())), "the optimizer's params are the model's"
            self.counts = torch.stack([count for *_, counts in self.adam for count in counts])
            views = iter(self.counts.unbind())  # each step count a view of the stack's: one add counts all
            for optimizer, (params, *_, counts) in zip(self.optimizers, self.adam):
                counts[:] = [next(views) for _ in counts]
                for param, count in zip(params, counts):
                    optimizer.state[param]["step"] = count

    @property
    def mode(self) -> str:
        return getattr(self.run, "mode", "eager")

    def forward(self, x: Tensor, trace: bool = False) -> Forward:
        """The N models' forward passes on their N batches x (N, B, ...)."""
        if isinstance(self.template, MLPAutoencoder):
            return self.mlp_forward(x, trace)
        return self.vmapped_forward(x)

    def linear(self, prefix: str, h: Tensor) -> Tensor:
        return _StackedLinear.apply(h, self.weights[f"{prefix}.weight"], self.weights[f"{prefix}.bias"])

    def mlp_forward(self, x: Tensor, trace: bool) -> Forward:
        model = self.template
        derivatives = [] if trace else None
        h = x
        for index, act in enumerate(model.enc_acts):
            u = self.linear(f"enc_layers.{index}", h)
            h = act.fn(u)
            if trace:
                derivatives.append(None if act.derivative is None else act.derivative(u, h))
        out = h
        for index, layer in enumerate(model.decoder):
            out = self.linear(f"decoder.{index}", out) if isinstance(layer, torch.nn.Linear) else layer(out)
        recon, logits = (torch.sigmoid(out), out) if model.sigmoid_output else (model.output_act.fn(out), None)
        return Forward(x, h, recon, logits, derivatives)

    def vmapped_forward(self, x: Tensor) -> Forward:
        from torch.func import functional_call, vmap

        def one(weights: dict, batch: Tensor):
            fwd = functional_call(self.skeleton, weights, (batch,))
            return fwd.latent, fwd.recon, fwd.logits
        latent, recon, logits = vmap(one)(self.weights, x)
        return Forward(x, latent, recon, logits)

    def objective(self, clean: Tensor, generators: list[torch.Generator]) -> tuple[Tensor, Forward]:
        """Each member's (total, recon, reg) on its batch, clean (N, B, ...), its corruption drawn from
        generators[i]: (N, 3), attached to the graph; and the forward pass (`inputs` is `clean` itself
        where no member corrupts it: corruption=none hands each batch back as it is)."""
        rows = clean.unbind()
        corrupted = [m.parts.corruption(c, g) for m, c, g in zip(self.members, rows, generators)]
        if self.input_grad or any(x is not c for x, c in zip(corrupted, rows)):
            inputs = torch.stack(corrupted)  # a leaf of its own where the penalty takes gradients at it
            inputs.requires_grad_(self.input_grad)
        else:
            inputs = clean
        fwd = self.forward(inputs, self.trace)
        recon = self.loss(fwd, clean)
        reg = self.penalty.term(fwd, self, **self.options)
        total = recon if self.penalty.zero else recon + self.scale * reg
        return torch.stack([total, recon, reg.expand_as(total)], 1), fwd

    def measure(self, x: Tensor) -> list[tuple[dict, dict]]:
        """Each member's validation numbers on x, as training.loop.end_epoch measures a job's alone: the
        mean objective (corruption drawn from a generator seeded with its trainer.seed) and the activity
        of its clean codes. One stacked pass over x for all members (the objective's forward gives the
        codes where the inputs are clean)."""
        first = self.members[0].parts
        n, size, device = len(self.members), first.trainer.batch_size, first.device
        generators = [torch.Generator(device).manual_seed(m.parts.trainer.seed) for m in self.members]
        sums, latents = torch.zeros(n, len(TERMS), device=device), []
        for clean in batches(x, size, device):
            stacked = clean.expand(n, *clean.shape).contiguous()  # each its own rows, as in training
            with torch.set_grad_enabled(self.input_grad):
                terms, fwd = self.objective(stacked, generators)
            sums += terms.detach() * len(clean)
            if fwd.inputs is stacked:
                latents.append(fwd.latent.detach())
            else:
                with torch.no_grad():
                    latents.append(self.forward(stacked).latent)
        latent = torch.cat(latents, 1)
        out = []
        for member, total, codes in zip(self.members, (sums / len(x)).tolist(), latent):
            found, _ = sparsity(codes, member.parts.evaluation.threshold)
            out.append((dict(zip(TERMS, total)), {name: found[name] for name in ACTIVITY}))
        return out

    def probes(self, shape: tuple) -> Tensor:
        """Gaussian probes (samples, N, B, k), member i's drawn from its own stream as it would alone."""
        samples, _, *rest = shape
        return torch.stack([torch.randn((samples, *rest), generator=m.generator, device=m.generator.device)
                            for m in self.members], 1)

    def jacobian_sq_norm(self, derivatives: list[Optional[Tensor]], batch: int) -> Tensor:
        """(N, B) per-sample ||J_f(x)||_F^2 of the N encoders (the contractive penalty, reg.method=exact)."""
        layers = len(self.template.enc_layers)
        return jacobian_sq_norm([self.weights[f"enc_layers.{i}.weight"] for i in range(layers)], derivatives, batch)

    def step(self, batch: int) -> None:
        """One optimizer step of every member on its batch number `batch` of its epoch's shuffle, and each
        member's bookkeeping (its NaN watch, log window, epoch sums), all on the device."""
        first = self.members[0].parts
        size = first.trainer.batch_size
        x = first.data.train.x
        self.run(torch.stack([x[m.pos.order[batch * size:(batch + 1) * size]] for m in self.members]))

    def recorded(self, clean: Tensor) -> None:
        """`train`, then each member's (total, recon, reg) recorded in place (a CUDA graph can hold it)."""
        for member, row in zip(self.members, self.train(clean)):
            member.watch.update(row)
            member.pos.window += row
            member.pos.epoch_sums.add_(row, alpha=clean.shape[1])

    def train(self, clean: Tensor) -> Tensor:
        """One optimizer step of every member on its batch, clean (N, B, ...); returns the detached (N, 3)
        (total, recon, reg) without a host sync."""
        terms, _ = self.objective(clean, [m.generator for m in self.members])
        for weight in self.weights.values():
            weight.grad = None
        terms[:, 0].sum().backward()  # each member's gradient is its own objective's
        if self.adam is not None:
            grads = [self.weights[name].grad.unbind() for name in self.names]
            steps_together(self.optimizers, self.adam, [list(own) for own in zip(*grads)], self.counts)
            return terms.detach()
        for i, (optimizer, params) in enumerate(zip(self.optimizers, self.params)):
            for name, param in params.items():
                param.grad = self.weights[name].grad[i]
            optimizer.step()
        return terms.detach()


class _StackedLinear(torch.autograd.Function):
    """N linear layers on N batches: h (N, B, in), weight (N, out, in), bias (N, out) -> (N, B, out), with
    the weight's gradient computed as grad^T h, in the weight's own layout, as torch computes a single
    Linear's (autograd's baddbmm gives h^T grad, whose transpose the weight's .grad then copies: a tenth
    of a digits stack's step). Twice differentiable (Hutchinson's estimate differentiates through it)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(h, weight)
        return torch.baddbmm(bias.unsqueeze(1), h, weight.mT)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        grad_h = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.mT, h) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_h, grad_weight, grad_bias


def fit_stack(members: list[Member], stop_hint: str, backend: Optional[GraphBackend] = None) -> tuple[float, str]:
    """Train the members together from their common position until each has trained trainer.epochs or
    stopped early; a diverged member leaves the stack (member.failure) and the others go on. A SIGINT or
    SIGTERM saves every member's checkpoint mid-epoch and raises a TrainingFault ending in `stop_hint`.
    `backend` stands in for torch.cuda's graphs in CPU tests. Returns (seconds, the step's mode)."""
    started = time.perf_counter()
    first = members[0]
    trainer = first.parts.trainer
    steps_per_epoch = -(-len(first.parts.data.train) // trainer.batch_size)
    for m in members:
        parts = m.parts
        parts.schedule.start(parts.optimizer, parts.device, trainer.epochs * steps_per_epoch, steps_per_epoch,
                             m.pos.step, m.pos.schedule)
        m.watch = FiniteWatch(parts.device, TERMS, m.run_dir / checkpoint.FILE, m.pos.step)
        m.cadence = checkpoint.Cadence(trainer.checkpoint_every)
    active = [m for m in members if m.training]
    if not active:
        return 0.0, "eager"
    description = f"train {len(active)} stacked jobs (at most {trainer.epochs} epochs)"
    with console.progress(trainer.epochs * steps_per_epoch, first.pos.step, description) as bar, StopSignals() as stop:
        stack = Stack(active, backend, bar.log)
        while active:
            for m in active:
                if m.pos.order is None:
                    start_epoch(m.parts, m.pos, m.generator)
            for batch in range(active[0].pos.batch, steps_per_epoch):
                stack.step(batch)
                size = min(trainer.batch_size, len(first.parts.data.train) - batch * trainer.batch_size)
                for m in active:
                    try:
                        stepped(m.parts, m.pos, size, m.writer, m.watch, bar.show)
                    except TrainingFault as e:
                        m.failure = e
                bar.advance()
                if stop.requested or any(m.failure for m in active):
                    break
            if stop.requested:
                for m in active:
                    m.writer.close()
                    with own_stream(m.generator):  # saved as the global stream, which the job alone draws from
                        checkpoint.save(m.parts, m.cfg, m.pos, m.run_dir)
                raise stop.fault(f"after step {active[0].pos.step}; every job's checkpoint is saved in its dir; "
                                 f"{stop_hint}")
            if not any(m.failure for m in active):
                for m in active:
                    try:
                        m.watch.check()
                    except TrainingFault as e:
                        m.failure = e
                if not any(m.failure for m in active):
                    measured = stack.measure(first.parts.data.val.x)
                    for m, found in zip(active, measured):
                        with own_stream(m.generator):  # its checkpoint saves the global stream, its own here
                            end_epoch(m.parts, m.cfg, m.pos, m.run_dir, m.writer, bar.log, m.cadence, f"{m.name}: ",
                                      found)
            still = [m for m in active if m.training]
            if len(still) < len(active):
                for m in active:
                    if m.failure:
                        bar.log(f"{m.name}: {m.failure}; the other jobs of the stack go on")
                active = still
                if active:
                    stack = Stack(active, backend, bar.log)
        bar.end_here()
    return time.perf_counter() - started, stack.mode  # the last stack's
