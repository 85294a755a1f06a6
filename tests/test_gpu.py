"""CUDA checks (skipped without a GPU): the same math on the device, data resident there."""
import pytest
import torch

from aelab.build import build
from aelab.regularizers import encoder_sensitivity
from aelab.train import train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("overrides", [[], ["reg=kl"], ["model=contractive", "reg=contractive"],
                                       ["reg=contractive", "reg.method=hutchinson"]])
def test_cuda_step_matches_cpu_step(make_cfg, overrides):
    cpu = build(make_cfg("device=cpu", *overrides))
    gpu = build(make_cfg("device=cuda", *overrides))
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
