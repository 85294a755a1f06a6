"""Learning-rate schedules and early stopping (issue 31): each schedule's rate, step by step through
aelab's own loop, against torch.optim.lr_scheduler's sequence on a bare optimizer and against its
formula; a resumed run continues the schedule bit for bit; the CUDA-graph step reads the scheduled
rate from the device (a CPU stand-in backend); the best epoch on a crafted validation curve."""
import json
import math
import signal

import pytest
import torch
from torch.optim import lr_scheduler

from aelab.build import build
from aelab.training import loop
from aelab.training.checkpoint import Position
from aelab.training.faults import TrainingFault
from aelab.training.steps import GraphStep
from conftest import signal_at_step
from test_steps import Rerun, scheduled

QUIET = ("device=cpu", "eval.probe=false", "eval.projector=0")
STEPS = 10  # digits: 1,257 training samples in batches of 128


def rates(monkeypatch) -> list[float]:
    """The rate each optimizer step of the loop runs with, as the kernel reads it (`lr_device`, or the
    group's float unscheduled), recorded just before the step."""
    seen = []
    real = loop.make_step

    def recording(parts, *args, **kwargs):
        step = real(parts, *args, **kwargs)

        def recorded(clean):
            group = parts.optimizer.param_groups[0]
            seen.append(float(group.get("lr_device", group["lr"])))
            step(clean)
        return recorded
    monkeypatch.setattr(loop, "make_step", recording)
    return seen


def torch_sequence(make, steps: int, lr: float = 1e-3) -> list[float]:
    """torch's scheduler on a bare SGD of one parameter: the rate of each of `steps` steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, out = make(optimizer), []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def train(make_cfg, tmp_path, *overrides, name="run"):
    from aelab.cli import job
    run_dir = tmp_path / name
    run_dir.mkdir()
    return job.run(make_cfg(*QUIET, *overrides), run_dir), run_dir


def test_cosine_with_warmup_is_torchs_sequence_and_its_formula(make_cfg, tmp_path, monkeypatch):
    seen = rates(monkeypatch)
    train(make_cfg, tmp_path, "trainer.epochs=4", "sched=cosine", "sched.warmup_epochs=1")
    total, warmup = 4 * STEPS, STEPS
    expected = torch_sequence(lambda o: lr_scheduler.SequentialLR(o, [
        lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=warmup),
        lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup)], milestones=[warmup]), total)
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-18)
    formula = [1e-3 * (0.01 + 0.99 * k / warmup) if k < warmup else
               1e-3 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2 for k in range(total)]
    assert seen == pytest.approx(formula, rel=1e-9, abs=1e-15)


def test_onecycle_is_torchs_sequence(make_cfg, tmp_path, monkeypatch):
    seen = rates(monkeypatch)
    train(make_cfg, tmp_path, "trainer.epochs=3", "sched=onecycle", "optim.lr=0.01")
    expected = torch_sequence(lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=3 * STEPS + 1,
                                                                cycle_momentum=False), 3 * STEPS, lr=0.01)
    assert seen == pytest.approx(expected, rel=1e-12)
    assert max(seen) == pytest.approx(0.01, rel=0.02) and seen[0] == pytest.approx(0.01 / 25)


def test_plateau_follows_the_validation_objective_as_torchs_does(make_cfg, tmp_path, monkeypatch):
    """A crafted validation curve (the real evaluate's numbers replaced): the rate halves after two
    epochs without a 0.1% improvement, as ReduceLROnPlateau fed the same curve."""
    curve = iter([1.0, 0.9, 0.8999, 0.9, 0.85, 0.86, 0.87, 0.88])
    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda parts, x: {**real_evaluate(parts, x), "total": next(curve)})
    seen = rates(monkeypatch)
    train(make_cfg, tmp_path, "trainer.epochs=8", "sched=plateau", "sched.patience=1")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    plateau = lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1, threshold=1e-3, min_lr=1e-6)
    expected = []
    for value in [1.0, 0.9, 0.8999, 0.9, 0.85, 0.86, 0.87, 0.88]:
        expected += [optimizer.param_groups[0]["lr"]] * STEPS
        plateau.step(value)
    assert seen == pytest.approx(expected, rel=1e-12) and min(seen) < 1e-3


@pytest.mark.parametrize("sched", ["cosine", "plateau"])
def test_a_resumed_run_continues_the_schedule_bit_for_bit(make_cfg, tmp_path, monkeypatch, sched):
    """Stopped by SIGTERM mid-epoch 2, resumed: the same rates, weights and metrics as a run never stopped."""
    from aelab.cli import job
    overrides = (*QUIET, "trainer.epochs=3", f"sched={sched}", "sched.patience=0" if sched == "plateau" else
                 "sched.warmup_epochs=1")
    whole, _ = train(make_cfg, tmp_path, *overrides[3:], name="whole")
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    real = loop.make_step
    signal_at_step(monkeypatch, STEPS + 3, signal.SIGTERM)
    with pytest.raises(TrainingFault):
        job.run(make_cfg(*overrides), run_dir)
    monkeypatch.setattr(loop, "make_step", real)
    resumed = job.run(make_cfg(*overrides), run_dir, resume=True)
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]


def test_the_graph_step_reads_the_scheduled_rate_from_the_device(make_cfg, tmp_path):
    """A stand-in backend that, like a real graph, keeps what it captured: the optimizer's lr_device
    tensor at capture must be the one the schedule writes at every replay (a float would be baked in).
    The graphed run trains exactly as the eager one does."""
    class Keeps(Rerun):
        def capture(self, step, static):
            group = parts.optimizer.param_groups[0]
            captured = group["lr_device"]
            replay = super().capture(step, static)

            def checked():
                assert group["lr_device"] is captured, "the schedule replaced the tensor the graph reads"
                self.rates.append(float(captured))
                replay()
            return checked

    from test_steps import train as run_epochs
    cfg = ("device=cpu", "trainer.batch_size=100", "sched=cosine", "sched.warmup_epochs=1")
    eager = scheduled(make_cfg(*cfg, "trainer.cuda_graph=off"), 3)  # built, then trained: each build seeds torch
    run_epochs(eager, 3, tmp_path / "e")
    parts, backend = scheduled(make_cfg(*cfg), 3), Keeps()
    backend.rates = []
    _, _, step = run_epochs(parts, 3, tmp_path / "g", backend)
    assert isinstance(step, GraphStep) and step.mode == "cuda graph" and len(set(backend.rates)) > 10
    for a, b in zip(eager.model.parameters(), parts.model.parameters()):
        assert torch.equal(a, b)


def test_sgd_with_a_schedule_is_not_captured_and_says_why(make_cfg, tmp_path):
    from aelab.training.faults import FiniteWatch
    from aelab.training.objective import TERMS
    from aelab.training.steps import make_step
    parts, said = build(make_cfg("device=cpu", "optim=sgd", "sched=onecycle")), []
    step = make_step(parts, Position(), FiniteWatch(parts.device, TERMS, tmp_path), said.append, Rerun())
    assert not isinstance(step, GraphStep) and "reads its learning rate on the host" in said[0]


def test_early_stopping_keeps_the_best_epoch_of_a_crafted_curve(make_cfg, tmp_path, monkeypatch):
    """Validation totals 1.0, 0.8, 0.7, 0.6996 (lower, but by less than min_delta=0.1%), then worse:
    with patience 3 the run stops after epoch 6 (3 epochs since epoch 3 improved); the best model is
    epoch 4's, the one measured and the one checkpoint.pt gives aelab eval; the last state resumes."""
    from aelab.training import checkpoint
    curve = iter([1.0, 0.8, 0.7, 0.6996, 0.71, 0.72, 0.73, 0.74])
    real_evaluate, saved = loop.evaluate, {}
    monkeypatch.setattr(loop, "evaluate", lambda parts, x: {**real_evaluate(parts, x), "total": next(curve)})
    real_judge = loop.judge

    def judged(pos, parts, val_total):
        real_judge(pos, parts, val_total)
        saved[pos.epoch] = {k: v.clone() for k, v in parts.model.state_dict().items()}
    monkeypatch.setattr(loop, "judge", judged)
    record, run_dir = train(make_cfg, tmp_path, "trainer.epochs=8", "trainer.patience=3")
    assert (record["best_epoch"], record["stopped_epoch"], record["epochs_trained"], record["converged"]) == (4, 6, 6,
                                                                                                          True)
    assert record["steps"] == 6 * STEPS
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["best_epoch"] == 4 and written["converged"] is True
    parts = build(make_cfg(*QUIET))
    checkpoint.load(parts, run_dir, model_only=True)
    for name, value in parts.model.state_dict().items():
        assert torch.equal(value, saved[4][name])  # eval and sample read the best epoch's weights
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], saved[6][k]) for k in saved[6])  # the last: resumable


def test_a_run_still_improving_has_not_converged(make_cfg, tmp_path, monkeypatch):
    curve = iter([1.0, 0.9, 0.8, 0.7])
    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda parts, x: {**real_evaluate(parts, x), "total": next(curve)})
    record, _ = train(make_cfg, tmp_path, "trainer.epochs=4", "trainer.patience=2")
    assert (record["best_epoch"], record["stopped_epoch"], record["converged"]) == (4, None, False)


def test_min_epochs_holds_off_early_stopping_and_the_plateau_schedule(make_cfg, tmp_path, monkeypatch):
    """A model on its first plateau (a flat validation curve): with trainer.min_epochs=5 neither early
    stopping (patience 2) nor plateau (patience 1) acts before epoch 5; then both do."""
    curve = iter([1.0] * 8)
    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda parts, x: {**real_evaluate(parts, x), "total": next(curve)})
    seen = rates(monkeypatch)
    record, _ = train(make_cfg, tmp_path, "trainer.epochs=8", "trainer.patience=2", "trainer.min_epochs=5",
                      "sched=plateau", "sched.patience=1")
    assert (record["stopped_epoch"], record["epochs_trained"], record["best_epoch"]) == (5, 5, 1)
    assert set(seen) == {1e-3}  # the rate never moved: plateau waits for min_epochs, and the run stopped there
