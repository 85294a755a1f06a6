"""The training step under a CUDA graph: same math as eager, graph-safe parts, a clear fallback.

CUDA graphs need a GPU (tests/test_gpu.py captures real ones). Here a CPU stand-in for the capture
backend runs the very same GraphStep (warm-up, static batch, replay, eager partial batch, fallback),
and Dynamo's tracer (torch._dynamo.explain) proves no part reads a tensor back to the host mid-step.
"""
import json
from collections import Counter

import pytest
import torch
import torch._dynamo as dynamo
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.tensorboard import SummaryWriter

from aelab.build import build
from aelab.training.checkpoint import Position
from aelab.console import progress
from aelab.training.faults import FiniteWatch, StopSignals, TrainingFault
from aelab.training.objective import TERMS, loss_terms
from aelab.registry import ConfigError
from aelab.training.steps import GraphStep, capturable, make_step, train_step
from aelab.training.loop import start_epoch, train_epoch
from conftest import run_cli


class Rerun:
    """CPU stand-in for CudaGraphs: capture runs nothing and returns a replay of the static batch."""

    def __init__(self):
        self.warm_ups, self.captures, self.replays = 0, 0, 0

    def warm_up(self, step, clean):
        self.warm_ups += 1
        step(clean)

    def capture(self, step, static):
        self.captures += 1

        def replay():
            self.replays += 1
            step(static)
        return replay


class Refuses(Rerun):
    def capture(self, step, static):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def train(parts, epochs, tmp_path, backend=None, said=None):
    """`epochs` epochs through train_epoch with the step aelab train would make (or a backend's)."""
    pos = Position()
    watch = FiniteWatch(parts.device, TERMS, tmp_path / "none")
    writer = SummaryWriter(str(tmp_path / "events"))
    with progress(1) as bar, StopSignals() as stop:
        step = make_step(parts, pos, watch, (said if said is not None else []).append, backend)
        for _ in range(epochs):
            start_epoch(parts, pos)
            train_epoch(parts, pos, step, writer, bar, watch, stop)
            pos.order = None
    writer.close()
    watch.check()
    return pos, watch, step


def scheduled(cfg, epochs: int):
    """Parts built from cfg with their learning-rate schedule started for `epochs` epochs (what fit()
    does before the loop; `train` above runs the epochs without fit)."""
    parts = build(cfg)
    steps_per_epoch = -(-len(parts.data.train) // parts.trainer.batch_size)
    parts.schedule.start(parts.optimizer, parts.device, epochs * steps_per_epoch, steps_per_epoch)
    return parts


GRAPH_CFG = ("device=cpu", "trainer.batch_size=100", "trainer.log_every=4", "reg=kl", "corruption=gaussian")


def test_graph_replay_trains_exactly_like_eager(make_cfg, tmp_path):
    """1257 samples in batches of 100: 12 full batches (replayed) and a partial one (eager) per epoch."""
    eager = build(make_cfg(*GRAPH_CFG, "trainer.cuda_graph=off"))
    pos_e, watch_e, _ = train(eager, 3, tmp_path / "e")
    graphed = build(make_cfg(*GRAPH_CFG))
    backend = Rerun()
    pos_g, watch_g, step = train(graphed, 3, tmp_path / "g", backend)
    assert isinstance(step, GraphStep) and step.mode == "cuda graph"
    assert (backend.warm_ups, backend.captures, backend.replays) == (GraphStep.WARMUP, 1, 3 * 12 - GraphStep.WARMUP)
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        assert torch.equal(a, b)  # the same floats: capture must not change the math
    assert torch.equal(pos_e.epoch_sums, pos_g.epoch_sums) and torch.equal(pos_e.window, pos_g.window)
    assert pos_g.step == 39 and watch_g.clean.tolist() == [39] * 3 == watch_e.clean.tolist()  # counted on the device
    assert graphed.optimizer.param_groups[0]["capturable"] is False  # set for the capture only


def test_failed_capture_says_why_once_and_trains_on_eagerly(make_cfg, tmp_path):
    eager = build(make_cfg(*GRAPH_CFG, "trainer.cuda_graph=off"))
    train(eager, 2, tmp_path / "e")
    graphed, said = build(make_cfg(*GRAPH_CFG)), []
    _, _, step = train(graphed, 2, tmp_path / "g", Refuses(), said)
    assert said == ["cuda graph: capture failed (operation not permitted when stream is capturing); "
                    "training eagerly from here"]
    assert step.mode.startswith("eager (cuda graph capture failed")
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        assert torch.equal(a, b)  # the batch whose capture failed was still trained on, once


def test_failed_capture_under_on_stops_with_the_fix(make_cfg, tmp_path):
    parts = build(make_cfg(*GRAPH_CFG))
    parts.trainer = type(parts.trainer)(**{**vars(parts.trainer), "cuda_graph": "on"})
    with pytest.raises(TrainingFault, match=r"trainer.cuda_graph=on: capturing the training step failed "
                                            r"\(operation not permitted.*use trainer.cuda_graph=auto"):
        train(parts, 1, tmp_path, Refuses())


def test_off_and_cpu_run_the_plain_step(make_cfg, tmp_path):
    for overrides in (["trainer.cuda_graph=off"], ["trainer.cuda_graph=auto"]):
        parts = build(make_cfg("device=cpu", *overrides))
        step = make_step(parts, Position(), FiniteWatch(parts.device, TERMS, tmp_path), print)
        assert not isinstance(step, GraphStep)


def test_cuda_graph_on_needs_cuda(make_cfg):
    with pytest.raises(ConfigError) as e:
        build(make_cfg("device=cpu", "trainer.cuda_graph=on"))
    assert e.value.key == "trainer.cuda_graph"


def test_capturable_is_set_for_the_block_and_restored(make_cfg):
    parts = build(make_cfg("device=cpu"))
    with capturable(parts.optimizer):
        assert all(g["capturable"] for g in parts.optimizer.param_groups)
    assert not any(g["capturable"] for g in parts.optimizer.param_groups)


def test_watch_counts_steps_on_the_device_from_a_resumed_step(tmp_path):
    watch = FiniteWatch(torch.device("cpu"), TERMS, tmp_path / "ckpt", step=10)
    for terms in ([1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [float("nan"), 1.0, float("inf")], [float("nan")] * 3,
                  [1.0, 1.0, 1.0]):  # a term finite again later still reports its first bad step
        watch.update(torch.tensor(terms))
    with pytest.raises(TrainingFault, match="loss term.s. total, reg became NaN or inf at step 13"):
        watch.check()
    assert watch.state.tolist() == [[0, 0, 0], [2, 3, 2]]  # alive, clean steps before the first bad


def test_watch_passes_large_finite_terms_and_catches_minus_inf(tmp_path):
    watch = FiniteWatch(torch.device("cpu"), TERMS, tmp_path / "ckpt")
    watch.update(torch.tensor([3e38, -3e38, 0.0]))
    watch.check()
    watch.update(torch.tensor([1.0, float("-inf"), 0.0]))
    with pytest.raises(TrainingFault, match="loss term.s. recon became NaN or inf at step 2"):
        watch.check()


class Dispatched(TorchDispatchMode):
    """The aten ops run inside the block that do work (each a kernel launch on a GPU); views are free."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "as_strided",
            "detach", "alias", "slice", "select", "_record_function_enter_new", "_record_function_exit"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.FREE:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [[], ["reg=kl"], ["model=contractive", "reg=contractive"]],
                         ids=lambda o: "+".join(o) or "plain")
def test_step_bookkeeping_costs_six_kernels(make_cfg, tmp_path, overrides):
    """Every replayed step pays for its NaN watch and log sums in tiny kernels that each cost a GPU
    a launch slot: 4 for the watch, 1 per sum, none of them a host sync."""
    parts = build(make_cfg("device=cpu", *overrides))
    pos = Position()
    start_epoch(parts, pos)
    step = make_step(parts, pos, FiniteWatch(parts.device, TERMS, tmp_path / "none"), print)
    clean = parts.data.train.x[:32]
    step(clean)  # optimizer state made
    with Dispatched() as bare:
        train_step(parts, clean)
    with Dispatched() as recorded:
        step(clean)
    extra = Counter(recorded.ops) - Counter(bare.ops)  # an upper bound: a torch upgrade may fuse or split ops
    assert sum(extra.values()) <= 6 and len(recorded.ops) <= len(bare.ops) + 6, extra
    assert set(extra) <= {"abs", "lt", "mul_", "add_"} and "_local_scalar_dense" not in recorded.ops, extra


def test_kl_penalty_costs_nineteen_kernels_with_its_gradient(make_cfg):
    """reg=kl's term and its closed-form gradient, over the same model with reg=none: 9 kernels for
    the term, 2 to weight and add it, 7 backward, 1 to add its gradient to the decoder's (autograd
    through the formula took 37)."""
    def kernels(*overrides):
        parts = build(make_cfg("device=cpu", "model.latent_activation=sigmoid", *overrides))
        clean = parts.data.train.x[:32]
        with Dispatched() as run:
            loss_terms(parts, clean)["total"].backward()
        return run.ops
    extra = Counter(kernels("reg=kl")) - Counter(kernels())
    assert sum(extra.values()) <= 19 and "where" not in extra, extra  # at most: a torch upgrade may fuse ops


def test_no_penalty_adds_no_kernels_to_the_objective(make_cfg):
    """reg=none: total is the reconstruction loss itself (not recon + 0 * 0), bit for bit."""
    parts = build(make_cfg("device=cpu"))
    clean = parts.data.train.x[:32]
    with Dispatched() as plain:
        terms = loss_terms(parts, clean)
    assert terms["total"] is terms["recon"] and terms["reg"].item() == 0.0
    assert "mul" not in plain.ops and "add" not in plain.ops


PARTS = [[], ["reg=l1"], ["reg=kl"], ["model=contractive", "reg=contractive"],
         ["reg=contractive", "reg.method=hutchinson", "reg.samples=2"], ["model=conv", "reg=contractive"],
         ["loss=bce"], ["loss=mae"], ["corruption=gaussian"], ["corruption=salt_pepper"],
         ["corruption=masking"], ["corruption=block"]]


@pytest.mark.parametrize("overrides", PARTS, ids=lambda o: "+".join(o) or "plain")
def test_every_part_traces_as_one_graph_without_host_reads(make_cfg, overrides):
    """Dynamo breaks its graph at .item(), .tolist(), Python branches on tensor values: anything
    that would force a host sync (and break CUDA graph capture) inside the step."""
    parts = build(make_cfg("device=cpu", *overrides))
    clean = parts.data.train.x[:32]
    if parts.input_grad:  # the input leaf is made outside the traced code, as loss_terms makes it
        inputs, fn = parts.corruption(clean).requires_grad_(True), lambda x: parts.penalty(parts.model(x), parts.model)
    else:
        inputs, fn = clean, lambda x: loss_terms(parts, x)["total"]
    dynamo.reset()
    with dynamo.config.patch(trace_autograd_ops=True):
        found = dynamo.explain(fn)(inputs)
    assert (found.graph_count, found.graph_break_count) == (1, 0), found.break_reasons


def test_the_trace_check_catches_a_host_read():
    def synced(x):
        return x * x.sum().item()
    dynamo.reset()
    found = dynamo.explain(synced)(torch.ones(3))
    assert found.graph_break_count == 1 and "item()" in str(found.break_reasons[0].reason)


@pytest.mark.slow  # torch.compile's first compile takes seconds
def test_compiled_objective_from_the_cli_trains_like_eager(tmp_path):
    """trainer.compile=true (torch.compile, inductor on CPU here): the same numbers, to float tolerance."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=true"])):
        run_cli("train", "trainer.epochs=2", "reg=kl", "eval.probe=false", *extra,
                f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["eager"]["step_mode"] == runs["compiled"]["step_mode"] == "eager"  # CPU: no graph
    for split in ("train", "val"):
        for term in TERMS:
            assert runs["compiled"][split][term] == pytest.approx(runs["eager"][split][term], rel=1e-4)


def test_tf32_is_opt_in_and_set_on_every_build(make_cfg):
    build(make_cfg("device=cpu", "trainer.tf32=true"))
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
    build(make_cfg("device=cpu"))  # a later run in the same process is float32 again
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"


def test_tf32_and_cuda_graph_off_from_the_cli(tmp_path):
    """On the CPU both leave the numbers as they are: TF32 is a CUDA setting, and CPU steps are eager."""
    runs = {}
    for name, extra in (("default", []), ("set", ["trainer.tf32=true", "trainer.cuda_graph=off"])):
        run_cli("train", "trainer.epochs=1", "eval.probe=false", *extra, f"hydra.run.dir={tmp_path / name}",
                cwd=tmp_path)
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["set"]["step_mode"] == "eager"
    assert {s: runs["set"][s] for s in ("train", "val", "test")} == \
        {s: runs["default"][s] for s in ("train", "val", "test")}
