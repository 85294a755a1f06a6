"""Config → parts: composition, presets, and one-line errors that name the key."""
import pytest
import torch

from aelab.build import build, check
from aelab.registry import ConfigError
from aelab.training.objective import evaluate, loss_terms
from aelab.training.steps import train_step


def test_default_config_builds_the_seed_shape(make_cfg):
    parts = build(make_cfg("device=cpu"))
    sizes = [(l.in_features, l.out_features) for l in parts.model.enc_layers]
    assert sizes == [(64, 256), (256, 128), (128, 32)]  # 784-256-128-32 with digits' 64 inputs
    assert parts.data.image_shape == (1, 8, 8)
    assert len(parts.data.train) + len(parts.data.val) + len(parts.data.test) == 1797
    assert 0.0 <= parts.data.train.x.min() and parts.data.train.x.max() <= 1.0


@pytest.mark.parametrize("preset,latent,act", [("sparse_l1", 128, "relu"), ("sparse_kl", 128, "sigmoid"),
                                               ("contractive", 64, "sigmoid")])
def test_presets(make_cfg, preset, latent, act, ):
    cfg = make_cfg(f"model={preset}", "device=cpu")
    parts = build(cfg)
    assert parts.model.latent_dim == latent and cfg.model.latent_activation == act


def test_splits_are_seeded_and_disjoint(make_cfg):
    a, b = build(make_cfg("device=cpu")).data, build(make_cfg("device=cpu", "trainer.seed=5")).data
    assert torch.equal(a.test.x, b.test.x)  # the split follows data.split_seed, not trainer.seed
    c = build(make_cfg("device=cpu", "data.split_seed=1")).data
    assert not torch.equal(a.test.x, c.test.x)
    rows = lambda s: {tuple(r.tolist()) for r in s.x}  # noqa: E731
    assert len(rows(a.train) & rows(a.test)) < 5  # digits holds a few duplicate images


@pytest.mark.parametrize("overrides,key,text", [
    (["reg=kl", "model.latent_activation=relu"], "model.latent_activation", "needs latent activations in (0, 1)"),
    (["loss=bce", "model.output_activation=identity"], "model.output_activation", "sigmoid output"),
    (["reg=l1", "reg.weight=-1"], "reg.weight", "must be >= 0"),
    (["reg=l1", "reg.weight=abc"], "reg.weight", "must be a number"),
    (["reg=kl", "model=sparse_kl", "reg.rho=1.5"], "reg.rho", "in (0, 1)"),
    (["corruption=masking", "corruption.prob=2"], "corruption.prob", "in [0, 1]"),
    (["corruption=block", "corruption.size=9"], "corruption.size", "image side 8"),
    (["model.latent_dim=0"], "model.latent_dim", ">= 1"),
    (["model.hidden=[64,-3]"], "model.hidden", ">= 1"),
    (["model.encoder_activation=swish"], "model.encoder_activation", "choose from"),
    (["trainer.batch_size=5000"], "trainer.batch_size", "training samples"),
    (["trainer.epochs=0"], "trainer.epochs", ">= 1"),
    (["+reg.foo=1"], "reg.foo", "unknown key"),
    (["loss.reduction=median"], "loss.reduction", "choose from: mean, sum"),
    (["optim.betas=[0.9]"], "optim.betas", "two numbers [beta1, beta2]"),
    (["optim=adamw", "optim.betas=0.9"], "optim.betas", "two numbers [beta1, beta2]"),
    (["optim.betas=[0.9,1.0]"], "optim.betas", "in [0, 1)"),
    (["eval.noise.block.size=[2,3]", "eval.noise.block.count=[1,2]"], "eval.noise.block", "one key at most"),
    (["eval.noise.gaussian.noise_factor=[]"], "eval.noise.gaussian.noise_factor", "one or more distinct values"),
    (["eval.noise.gaussian.noise_factor=[0.1,0.1]"], "eval.noise.gaussian.noise_factor", "distinct"),
    (["eval.noise.gaussian.noise_factor=[0.1,-1]"], "eval.noise.gaussian.noise_factor", "must be >= 0, got -1"),
])
def test_bad_config_names_key(make_cfg, overrides, key, text):
    with pytest.raises(ConfigError) as err:
        build(make_cfg("device=cpu", *overrides))
    assert err.value.key == key and text in str(err.value)


def test_bad_parts_are_refused_before_the_data_is_read(make_cfg, tmp_path):
    """A typo in the model, loss or reg costs no data read: with MNIST's files absent, the reg's error comes
    first; fixed, the files' absence is what build() reports."""
    no_files = ("data=mnist", f"data.root={tmp_path}")
    with pytest.raises(ConfigError) as err:
        build(make_cfg("device=cpu", *no_files, "reg=l1", "reg.weight=-1"))
    assert err.value.key == "reg.weight"
    with pytest.raises(ConfigError) as err:
        build(make_cfg("device=cpu", *no_files, "reg=l1", "reg.weight=1e-3"))
    assert err.value.key == "data.root"


def test_the_sweep_check_refuses_bad_parts_before_the_data_is_read(make_cfg):
    """check(), every sweep job's pre-check, in build()'s order: a bad reg is named before a bad split,
    and no data set is read for it."""
    loaded = {}
    with pytest.raises(ConfigError) as err:
        check(make_cfg("reg=l1", "reg.weight=-1", "data.val_fraction=1.5"), loaded)
    assert err.value.key == "reg.weight" and loaded == {}
    with pytest.raises(ConfigError) as err:
        check(make_cfg("reg=l1", "reg.weight=1e-3", "data.val_fraction=1.5"), loaded)
    assert err.value.key == "data.val_fraction"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_an_error(make_cfg):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        build(make_cfg("device=cuda"))


def test_kl_brings_a_bounded_latent(make_cfg):
    assert build(make_cfg("device=cpu", "reg=kl")).model.latent_unit_interval


def test_auto_device_follows_availability(make_cfg):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert build(make_cfg("device=auto")).device.type == expected


def test_denoising_loss_is_against_the_clean_input(make_cfg):
    parts = build(make_cfg("device=cpu", "corruption=masking", "corruption.prob=0.5"))
    clean = parts.data.val.x[:32]
    g = torch.Generator().manual_seed(0)
    terms = loss_terms(parts, clean, g)
    noisy = parts.corruption(clean, torch.Generator().manual_seed(0))
    expected = torch.nn.functional.mse_loss(parts.model(noisy).recon, clean)
    assert terms["recon"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("overrides", [[], ["reg=l1"], ["reg=kl", "model=sparse_kl"],
                                       ["reg=contractive", "model=contractive"], ["corruption=gaussian"]])
def test_total_is_recon_plus_weighted_reg_and_steps_lower_it(make_cfg, overrides):
    parts = build(make_cfg("device=cpu", "trainer.batch_size=256", *overrides))
    before = evaluate(parts, parts.data.val.x)
    assert before["total"] == pytest.approx(before["recon"] + parts.penalty.weight * before["reg"], rel=1e-5)
    for _ in range(30):
        train_step(parts, parts.data.train.x[:256])
    assert evaluate(parts, parts.data.val.x)["total"] < before["total"]
