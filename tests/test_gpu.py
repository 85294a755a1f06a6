"""CUDA checks (skipped without a GPU): the same math on the device, data resident there, and the
training step captured as a real CUDA graph for every part."""
import dataclasses
import json

import pytest
import torch

from aelab.build import build
from aelab.regularizers import encoder_sensitivity
from aelab.training.steps import GraphStep, train_step
from conftest import run_cli
from test_steps import PARTS, scheduled, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("overrides", [[], ["reg=kl"], ["model=contractive", "reg=contractive"],
                                       ["reg=contractive", "reg.method=hutchinson"]])
def test_cuda_step_matches_cpu_step(make_cfg, overrides):
    cpu = build(make_cfg("device=cpu", *overrides))
    gpu = build(make_cfg("device=cuda", "trainer.cuda_graph=off", *overrides))
    gpu.model.load_state_dict(cpu.model.state_dict())
    batch = cpu.data.train.x[:128]
    torch.manual_seed(1)
    a = train_step(cpu, batch)
    b = train_step(gpu, batch.cuda())
    if "reg.method=hutchinson" not in overrides:  # random probes differ between devices
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(b).all()


def test_data_and_noise_live_on_the_device(make_cfg):
    parts = build(make_cfg("device=cuda", "corruption=block"))
    assert parts.data.train.x.device.type == "cuda"
    assert parts.corruption(parts.data.train.x[:8]).device.type == "cuda"


def test_exact_contractive_on_cuda_matches_float64_autograd(make_cfg):
    parts = build(make_cfg("device=cuda", "model=contractive"))
    model = parts.model.double()
    x = parts.data.val.x[:8].double()
    got = encoder_sensitivity(model(x, trace=True), model).mean().item()
    cpu_model = model.cpu()
    encode = lambda xi: cpu_model.encode(xi.unsqueeze(0))[0].squeeze(0)  # noqa: E731
    ref = torch.stack([torch.autograd.functional.jacobian(encode, xi).pow(2).sum() for xi in x.cpu()]).mean().item()
    assert abs(got - ref) / ref < 1e-6


DETERMINISTIC = [[], ["reg=l1"], ["reg=kl"], ["model=contractive", "reg=contractive"], ["model=conv"],
                 ["optim=sgd"], ["optim=adamw"]]


@pytest.mark.parametrize("overrides", DETERMINISTIC, ids=lambda o: "+".join(o) or "plain")
def test_graph_replay_matches_eager_on_cuda(make_cfg, tmp_path, overrides):
    """The issue's check: loss after N steps under the captured graph equals the eager step's."""
    base = ("device=cuda", "trainer.batch_size=100", "sched=none", *overrides)  # sgd: a schedule keeps it eager
    eager = build(make_cfg(*base, "trainer.cuda_graph=off"))
    pos_e, _, _ = train(eager, 2, tmp_path / "e")
    graphed = build(make_cfg(*base, "trainer.cuda_graph=on"))
    pos_g, watch, step = train(graphed, 2, tmp_path / "g")
    assert isinstance(step, GraphStep) and step.mode == "cuda graph"
    assert watch.clean.tolist() == [pos_g.step] * 3 and pos_g.step == 26  # every replay counted
    torch.testing.assert_close(pos_g.epoch_sums, pos_e.epoch_sums, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sched", ["cosine", "onecycle", "plateau"])
def test_a_scheduled_graph_follows_the_rate_as_eager_does(make_cfg, tmp_path, sched):
    """The captured kernel reads the rate from the device tensor the schedule fills (float32 on CUDA):
    the graphed run ends where the eager one does."""
    base = ("device=cuda", "trainer.batch_size=100", f"sched={sched}")
    eager = scheduled(make_cfg(*base, "trainer.cuda_graph=off"), 2)
    train(eager, 2, tmp_path / "e")
    graphed = scheduled(make_cfg(*base, "trainer.cuda_graph=on"), 2)
    _, _, step = train(graphed, 2, tmp_path / "g")
    assert isinstance(step, GraphStep) and step.mode == "cuda graph"
    assert graphed.optimizer.param_groups[0]["lr_device"].dtype == torch.float32
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("overrides", PARTS, ids=lambda o: "+".join(o) or "plain")
def test_every_part_captures_and_trains(make_cfg, tmp_path, overrides):
    parts = build(make_cfg("device=cuda", "trainer.cuda_graph=on", "trainer.batch_size=64", *overrides))
    pos, _, step = train(parts, 1, tmp_path)
    assert step.mode == "cuda graph"
    first = (pos.epoch_sums / pos.seen).tolist()
    pos, _, step = train(parts, 3, tmp_path / "more")  # a second capture of the same parts
    last = (pos.epoch_sums / pos.seen).tolist()
    assert step.mode == "cuda graph" and torch.isfinite(torch.tensor(first + last)).all()
    assert last[1] < first[1]  # reconstruction improved: the replays really train


@pytest.mark.parametrize("name", ["gaussian", "salt_pepper", "masking", "block"])
def test_replayed_noise_is_fresh_each_replay(make_cfg, name):
    """Graph-safe RNG: a replay must not repeat the noise drawn at capture."""
    parts = build(make_cfg("device=cuda", f"corruption={name}"))
    static = parts.data.train.x[:128].clone()
    out = torch.empty_like(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out.copy_(parts.corruption(static))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(parts.corruption(static))
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(out.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert not torch.equal(draws[0], static)


def test_tf32_is_opt_in(make_cfg):
    build(make_cfg("device=cuda"))
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    build(make_cfg("device=cuda", "trainer.tf32=true"))
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    build(make_cfg("device=cuda"))
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_compiled_objective_under_the_graph(make_cfg, tmp_path):
    base = ("device=cuda", "trainer.batch_size=100", "reg=kl")
    eager = build(make_cfg(*base, "trainer.cuda_graph=off"))
    pos_e, _, _ = train(eager, 1, tmp_path / "e")
    both = build(make_cfg(*base, "trainer.cuda_graph=on", "trainer.compile=true"))
    pos_c, _, step = train(both, 1, tmp_path / "c")
    assert step.mode == "cuda graph"
    torch.testing.assert_close(pos_c.epoch_sums, pos_e.epoch_sums, rtol=1e-3, atol=1e-5)


def test_aelab_train_on_cuda_replays_the_graph(tmp_path):
    """The CLI's run on the bundled digits: replayed as a graph, it learns what the eager run learns."""
    records, said = {}, {}
    for mode in ("auto", "off"):
        run_dir = tmp_path / mode
        said[mode] = run_cli("train", "device=cuda", "trainer.epochs=3", f"trainer.cuda_graph={mode}",
                             f"hydra.run.dir={run_dir}", cwd=tmp_path).stdout
        records[mode] = json.loads((run_dir / "metrics.json").read_text())
    assert "cuda graph: whole training step captured for batches of 128" in said["auto"]
    assert "cuda graph" not in said["off"]
    graphed, eager = records["auto"], records["off"]
    assert graphed["step_mode"] == "cuda graph" and graphed["device"].startswith("cuda")
    assert eager["step_mode"] == "eager"
    # 3 epochs measured val recon 0.0755 on CPU, 0.0759 replayed on an H100 (2026-11-27)
    assert graphed["val"]["recon"] < 0.09
    assert graphed["val"]["recon"] == pytest.approx(eager["val"]["recon"], rel=1e-3)


@pytest.mark.parametrize("decoupled", [False, True])
def test_split_adam_is_torch_fused_adam_on_cuda(decoupled):
    from aelab.optim import SplitFusedAdam
    from test_optim import seed_mlp
    ours, theirs = seed_mlp().cuda(), seed_mlp().cuda()
    kw = dict(weight_decay=1e-2, decoupled_weight_decay=decoupled)
    mine, reference = SplitFusedAdam(ours.parameters(), **kw), torch.optim.Adam(theirs.parameters(), fused=True, **kw)
    gen = torch.Generator("cuda").manual_seed(0)
    for _ in range(5):
        x = torch.rand(128, 784, device="cuda", generator=gen)
        for model, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(torch.sigmoid(model(x)), x).backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_sample_chains_on_cuda_match_the_cpu(make_cfg):
    """aelab sample's chain and measures on the device: x <- f(x) from the same start gives the CPU's states."""
    from aelab.corruptions import CORRUPTIONS
    from aelab.analysis.sampling import measure, sample
    from aelab.samplers import SAMPLERS, chain_walk, langevin_walk

    overrides = ["corruption=gaussian", "corruption.noise_factor=0.3"]
    cpu, gpu = build(make_cfg("device=cpu", *overrides)), build(make_cfg("device=cuda", *overrides))
    gpu.model.load_state_dict(cpu.model.state_dict())
    start, none = cpu.data.test.x[:16], CORRUPTIONS.get("none")()
    a, _ = chain_walk(cpu.model, none, start, 5, [5], torch.Generator("cpu").manual_seed(0))
    b, _ = chain_walk(gpu.model, none, start.to(gpu.device), 5, [5], torch.Generator(gpu.device).manual_seed(0))
    torch.testing.assert_close(b[5].cpu(), a[5], rtol=1e-4, atol=1e-5)
    on_gpu, on_cpu = (measure(s[5], p.data.train, p.data.image_shape)["nearest_mse"] for s, p in ((b, gpu), (a, cpu)))
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)
    a, _ = langevin_walk([(cpu.model, 0.0)], 0.5, start, 5, [5], torch.Generator("cpu").manual_seed(0))
    b, _ = langevin_walk([(gpu.model, 0.0)], 0.5, start.to(gpu.device), 5, [5], torch.Generator(gpu.device).manual_seed(0))
    torch.testing.assert_close(b[5].cpu(), a[5], rtol=1e-4, atol=1e-5)
    a, _ = langevin_walk([(cpu.model, 0.0), (cpu.model, 0.0)], 0.5, start, 3, [6], torch.Generator("cpu").manual_seed(0))
    b, _ = langevin_walk([(gpu.model, 0.0), (gpu.model, 0.0)], 0.5, start.to(gpu.device), 3, [6],
                    torch.Generator(gpu.device).manual_seed(0))  # annealed: two levels, three steps each
    torch.testing.assert_close(b[6].cpu(), a[6], rtol=1e-4, atol=1e-5)
    gaussian = CORRUPTIONS.get("gaussian")(noise_factor=0.3)
    rows, yardstick, states = sample(gpu, [(gpu.model, 0.3)], gaussian)  # on the device
    assert states[50].device == gpu.device and [row["step"] for row in rows] == [0, 1, 2, 5, 10, 20, 50]
    assert all(0 <= row["nearest_mse"] < 1 for row in rows) and yardstick["classes"] >= 1
    gpu.sampling = dataclasses.replace(gpu.sampling, method=SAMPLERS.get("langevin")())  # noise on the device too
    rows, _, states = sample(gpu, [(gpu.model, 0.3)], gaussian)
    assert states[50].device == gpu.device and all(0 <= row["nearest_mse"] < 1 for row in rows)
