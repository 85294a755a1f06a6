"""Stacked sweeps (issue 32): N jobs trained as one stacked model end where each job trained alone ends
(within float tolerance; stacked products need not be bitwise equal to unstacked ones), a diverging job
stops alone, the order of the jobs changes nothing, and `launcher=stacked` groups a sweep by structure
and leaves each job a run dir like any other. In process: the models are compared weight by weight
after training, which needs no end-of-run evaluation."""
import json
import math
import signal

import pytest
import torch

from aelab.cli import job, stacking
from aelab.training import stacked
from aelab.training.loop import fit
from aelab.training.stacked import Member, fit_stack, unstackable
from aelab.training.steps import GraphStep
from conftest import events
from test_steps import Rerun

QUIET = ("device=cpu", "eval.probe=false", "eval.projector=0", "trainer.epochs=2")
SLOW = pytest.mark.slow  # in the slow tier: more of what the fast tier's cases already show


def started(make_cfg, tmp_path, name, *overrides):
    run_dir = tmp_path / name
    run_dir.mkdir()
    cfg = make_cfg(*QUIET, *overrides)
    return cfg, run_dir, job.start(cfg, run_dir)


def alone(make_cfg, tmp_path, name, *overrides) -> dict:
    """The job trained by itself, as `aelab train` trains it: its final weights."""
    cfg, run_dir, s = started(make_cfg, tmp_path, name, *overrides)
    fit(s.parts, cfg, s.pos, run_dir, s.writer)
    s.writer.flush()
    return {k: v.clone() for k, v in s.parts.model.state_dict().items()}


def members(make_cfg, tmp_path, prefix, jobs) -> list[Member]:
    """Each job built as the stacked launcher builds it, its random stream taken where its build left it."""
    out = []
    for index, overrides in enumerate(jobs):
        cfg, run_dir, s = started(make_cfg, tmp_path, f"{prefix}{index}", *overrides)
        out.append(Member(s.parts, cfg, s.pos, run_dir, s.writer, f"job {index}"))
    return out


def weights(member: Member) -> dict:
    return {k: v.clone() for k, v in member.parts.model.state_dict().items()}


def assert_close(got: dict, want: dict, rtol=1e-5, atol=1e-6):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=key)


L1_JOBS = [("reg=l1", "reg.weight=0.001"),
           ("reg=l1", "reg.weight=0.05", "trainer.seed=1", "optim.lr=3e-3"),
           ("reg=l1", "reg.weight=0.01", "corruption=gaussian", "corruption.noise_factor=0.3")]


def test_each_stacked_job_ends_as_it_would_alone(make_cfg, tmp_path):
    """Different weights, seeds (so init, shuffles and noise), learning rates and corruption levels: the
    final weights, and each epoch's validation numbers in TensorBoard (measured for the stack at once:
    a stack whose jobs corrupt no input takes its codes from the objective's forward, the others measure
    them in a pass of their own; both are checked)."""
    stack = members(make_cfg, tmp_path, "s", L1_JOBS)
    clean = members(make_cfg, tmp_path, "c", L1_JOBS[:2])  # no corruption: the one-pass validation
    fit_stack(stack, "")
    fit_stack(clean, "")
    for index, overrides in enumerate(L1_JOBS):
        assert stack[index].pos.epoch == 2 and stack[index].pos.step == 2 * 10
        assert_close(weights(stack[index]), alone(make_cfg, tmp_path, f"a{index}", *overrides))
        want = events(tmp_path / f"a{index}")
        tags = [tag for tag in want.Tags()["scalars"] if tag.startswith("val/")]
        assert len(tags) == 6
        for member in stack[index:index + 1] + clean[index:index + 1]:
            member.writer.flush()
            got = events(member.run_dir)
            assert sorted(got.Tags()["scalars"]) == sorted(want.Tags()["scalars"])
            for tag in tags:
                assert [e.value for e in got.Scalars(tag)] == pytest.approx(
                    [e.value for e in want.Scalars(tag)], rel=1e-5, abs=1e-7), (member.run_dir.name, tag)


@SLOW
def test_a_replayed_stack_trains_as_an_eager_one(make_cfg, tmp_path):
    """The stack's whole step captured once and replayed (a CPU stand-in for CUDA graphs: test_steps.Rerun)
    trains bit for bit as the eager stack: a cosine schedule's rate reaches it per job (lr_device)."""
    jobs = [("sched=cosine", "trainer.batch_size=100", *overrides) for overrides in L1_JOBS[:2]]
    eager = members(make_cfg, tmp_path, "e", jobs)
    replayed = members(make_cfg, tmp_path, "r", jobs)
    backend = Rerun()
    _, eager_mode = fit_stack(eager, "")
    _, mode = fit_stack(replayed, "", backend)
    assert (eager_mode, mode) == ("eager", "cuda graph")
    assert (backend.captures, backend.replays) == (1, 2 * 12 - GraphStep.WARMUP)
    for one, other in zip(eager, replayed):
        assert_close(weights(one), weights(other), rtol=0, atol=0)
        assert torch.equal(one.pos.epoch_sums, other.pos.epoch_sums)


@SLOW
def test_permuting_the_jobs_changes_no_job(make_cfg, tmp_path):
    forward = members(make_cfg, tmp_path, "f", L1_JOBS)
    backward = members(make_cfg, tmp_path, "b", L1_JOBS[::-1])
    fit_stack(forward, "")
    fit_stack(backward, "")
    for one, other in zip(forward, backward[::-1]):
        assert_close(weights(one), weights(other), rtol=0, atol=0)


@pytest.mark.parametrize("jobs", [
    pytest.param([("model=contractive", "model.hidden=[32]", "reg=contractive", f"reg.weight={w}", "corruption=masking",
                   f"corruption.prob={p}") for w, p in ((0.0, 0.1), (1e-3, 0.3))], id="contractive-exact"),
    pytest.param([("model=sparse_kl", "reg=kl", f"reg.rho={rho}", f"reg.weight={w}", "loss=bce", "sched=cosine")
                  for rho, w in ((0.05, 0.1), (0.2, 1.0))], id="kl-rho-cosine", marks=SLOW),
    pytest.param([("model=conv", "reg=l1", f"reg.weight={w}", "corruption=block", "optim=adamw",
                   "trainer.batch_size=256") for w in (1e-3, 1e-1)], id="conv-vmap", marks=SLOW),
    pytest.param([("loss=mae", "loss.reduction=sum", "optim=sgd", f"optim.lr={lr}", "corruption=salt_pepper")
                  for lr in (1e-3, 1e-2)], id="mae-sum-sgd", marks=SLOW),
    pytest.param([("model=contractive", "model.hidden=[32]", "reg=contractive", "reg.method=hutchinson",
                   "reg.samples=2", f"reg.weight={w}", "corruption=gaussian", "trainer.epochs=2") for w in (1e-3, 1e-2)],
                 id="hutchinson"),
    pytest.param([("model=conv", "model.channels=[4,8]", "model.latent_dim=8", "reg=contractive", f"reg.weight={w}",
                   "trainer.batch_size=256") for w in (1e-3, 1e-2)], id="conv-contractive-autograd", marks=SLOW),
])
def test_every_part_stacks_exactly(make_cfg, tmp_path, jobs):
    """The exact contractive penalty (stacked closed-form Jacobian), KL with a rho per job, a conv model
    (vmapped: grouped convolutions), every corruption, each loss and reduction, SGD and AdamW, a schedule;
    the penalties that differentiate the code by the input (Hutchinson's probes from each job's stream,
    a conv encoder's exact Jacobian through autograd)."""
    jobs = [("trainer.epochs=1", *overrides) for overrides in jobs]  # (a job's own trainer.epochs comes later)
    stack = members(make_cfg, tmp_path, "s", jobs)
    fit_stack(stack, "")
    for index, overrides in enumerate(jobs):
        assert_close(weights(stack[index]), alone(make_cfg, tmp_path, f"a{index}", *overrides), rtol=1e-4, atol=1e-5)


def test_the_stacked_linear_layer_differentiates_as_torch_does():
    """Its own backward (the weight's gradient in the weight's layout), once and twice (Hutchinson's
    estimate differentiates through it), against autograd's numerical check in float64."""
    h, weight, bias = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in
                       ((3, 5, 4), (3, 2, 4), (3, 2)))
    assert torch.autograd.gradcheck(stacked._StackedLinear.apply, (h, weight, bias))
    assert torch.autograd.gradgradcheck(stacked._StackedLinear.apply, (h, weight, bias))
    out, torchs = stacked._StackedLinear.apply(h, weight, bias), torch.baddbmm(bias.unsqueeze(1), h, weight.mT)
    assert torch.equal(out, torchs)
    grad = torch.randn_like(out)
    (own,), (autograds,) = (torch.autograd.grad(y, weight, grad) for y in (out, torchs))
    assert own.is_contiguous() and not autograds.is_contiguous()  # autograd's: a transpose, for .grad to copy
    torch.testing.assert_close(own, autograds)


def test_a_diverging_job_stops_alone(make_cfg, tmp_path):
    """optim.lr=1e12 sends job 1 to NaN; it leaves the stack with the single run's message, and the
    others end bitwise as a stack without it ends."""
    jobs = [("optim=sgd", *L1_JOBS[0]), ("optim=sgd", "optim.lr=1e12", *L1_JOBS[0]), ("optim=sgd", *L1_JOBS[2])]
    with_it = members(make_cfg, tmp_path, "w", jobs)
    without = members(make_cfg, tmp_path, "o", [jobs[0], jobs[2]])
    fit_stack(with_it, "")
    fit_stack(without, "")
    failure = with_it[1].failure
    assert failure is not None and failure.exit_code == 3 and "became NaN or inf at step" in str(failure)
    assert with_it[0].failure is None and with_it[2].failure is None
    assert with_it[0].pos.epoch == 2 and with_it[2].pos.epoch == 2
    assert_close(weights(with_it[0]), weights(without[0]), rtol=0, atol=0)
    assert_close(weights(with_it[2]), weights(without[1]), rtol=0, atol=0)


def test_early_stopping_is_per_job(make_cfg, tmp_path):
    """Job 0 stops after its patience (one epoch without a 50% improvement); job 1 trains on, alone as it
    would; each keeps its own best epoch."""
    jobs = [("trainer.epochs=3", "trainer.patience=1", "trainer.min_delta=0.5"), ("trainer.epochs=3",)]
    stack = members(make_cfg, tmp_path, "s", jobs)
    fit_stack(stack, "")
    assert stack[0].pos.stopped_epoch == 2 and stack[0].pos.epoch == 2 and stack[0].pos.best_epoch == 2
    assert stack[1].pos.stopped_epoch is None and stack[1].pos.epoch == 3
    assert_close(weights(stack[1]), alone(make_cfg, tmp_path, "a1", *jobs[1]))


def test_sigterm_saves_every_job_which_resumes_alone_or_stacked(make_cfg, tmp_path, monkeypatch):
    """A SIGTERM mid-epoch saves each job's checkpoint (its own random stream as the global one): job 0
    resumes as a single run (`aelab train resume=JOB_DIR`), jobs 1 and 2 as a stack again (`resume=SWEEP_DIR`
    with launcher=stacked), each to the weights of the job trained alone and never stopped."""
    real, taken = stacked.Stack.step, []

    def step(self, batch):
        out = real(self, batch)
        taken.append(1)
        if len(taken) == 13:
            signal.raise_signal(signal.SIGTERM)
        return out
    monkeypatch.setattr(stacked.Stack, "step", step)
    stack = members(make_cfg, tmp_path, "s", L1_JOBS)
    with pytest.raises(stacked.TrainingFault) as stop:
        fit_stack(stack, "continue with: aelab train resume=SWEEP")
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert "after step 13; every job's checkpoint is saved in its dir; continue with" in str(stop.value)
    monkeypatch.setattr(stacked.Stack, "step", real)
    resumed = [job.start(m.cfg, m.run_dir, resume=True) for m in stack[:1]]
    assert resumed[0].pos.step == 13
    fit(resumed[0].parts, stack[0].cfg, resumed[0].pos, stack[0].run_dir, resumed[0].writer)
    again = []
    for m in stack[1:]:
        s = job.start(m.cfg, m.run_dir, resume=True)
        again.append(Member(s.parts, m.cfg, s.pos, m.run_dir, s.writer, m.name))
    fit_stack(again, "")
    finals = [{k: v.clone() for k, v in resumed[0].parts.model.state_dict().items()}, *map(weights, again)]
    for index, final in enumerate(finals):
        assert_close(final, alone(make_cfg, tmp_path, f"a{index}", *L1_JOBS[index]))


def test_what_cannot_stack_says_why(make_cfg):
    from aelab.build import build
    compiled = build(make_cfg("device=cpu", "trainer.compile=true"))
    assert "trainer.compile=true compiles one model's objective" in unstackable(compiled)
    assert unstackable(build(make_cfg("device=cpu", "model=contractive", "reg=contractive",
                                      "reg.method=hutchinson"))) is None


def test_groups_by_structure(make_cfg):
    """Numbers (weights, seeds, rates, levels) stack; a model, a batch size or an optimizer apart do not;
    stack_size caps a group."""
    configs = [make_cfg(*o) for o in (
        ("reg=l1", "reg.weight=0.1"), ("reg=l1", "reg.weight=0.2", "trainer.seed=3", "optim.lr=0.01"),
        ("reg=l1", "trainer.batch_size=64"), ("reg=kl",), ("reg=l1", "optim=sgd"), ("reg=l1", "reg.weight=0.3"),
        ("reg=l1", "corruption=gaussian"), ("reg=l1", "corruption=gaussian", "corruption.noise_factor=0.5"))]
    assert stacking.groups(configs, 32) == [[0, 1, 5], [2], [3], [4], [6, 7]]
    assert stacking.groups(configs, 2) == [[0, 1], [2], [3], [4], [5], [6, 7]]


def test_a_stacked_sweep_leaves_runs_like_any_other(l1_seed_sweep):
    """`aelab train -m launcher=stacked` (the shared l1_seed_sweep: 2 weights x 2 seeds, which the report,
    eval and sample tests read as any sweep): each job its own dir with the records of a run, trained
    in one stack; their results are those of the same jobs trained one by one (test_stacked above)."""
    jobs = sorted(p for p in l1_seed_sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    for job_dir in jobs:
        held = {p.name for p in job_dir.iterdir()}
        assert {".hydra", "checkpoint.pt", "metrics.json", "environment.json", "train.log"} <= held
        assert any(name.startswith("events.out.tfevents") for name in held)
        record = json.loads((job_dir / "metrics.json").read_text())
        assert record["step_mode"] == "stacked (4 jobs): eager" and math.isfinite(record["test"]["mse"])
        assert record["epochs_trained"] == 2 and record["steps"] == 20
        state = torch.load(job_dir / "checkpoint.pt", weights_only=True)
        assert state["model"]["enc_layers.0.weight"].untyped_storage().nbytes() == 256 * 64 * 4  # its own weights only
        counts = [s["step"] for s in state["optimizer"]["state"].values()]  # and its own step counts
        assert all(c.item() == 20 and c.untyped_storage().nbytes() == 4 for c in counts) and len(counts) == 12


@pytest.mark.parametrize("size", ["0", pytest.param("-3", marks=SLOW), pytest.param("two", marks=SLOW)])
def test_a_bad_stack_size_is_one_line_before_the_sweep_writes(tmp_path, capfd, size):
    from conftest import cli
    sweep = tmp_path / "sweep"
    code, out, err = cli(capfd, "train", "-m", "launcher=stacked", f"hydra.launcher.stack_size={size}", "reg=l1",
                         "reg.weight=1e-3,1e-1", f"hydra.sweep.dir={sweep}")
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # a number below 1: aelab's words; not a number: Hydra's type check
    assert line.startswith("error: ") and "hydra.launcher.stack_size" in line and ("whole number >= 1" in line) != (size == "two")
    assert not (sweep / "multirun.yaml").exists()
