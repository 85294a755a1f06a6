"""Test-split metrics against hand-built cases and closed forms."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from aelab.build import build
from aelab.regularizers import encoder_sensitivity
from aelab.analysis.metrics import (feature_grid, feature_spread, gradient_energy, jacobian_rank, jacobian_spectrum,
                                    linear_probe, principal_components, reconstruction, sensitivity,
                                    typical_activation)
from aelab.training.monitor import grid, sparsity


def test_sparsity_of_a_known_code():
    # 4 samples x 5 units; unit 4 never active; threshold 0.1 (the seed's)
    latent = torch.tensor([[0.5, 0.0, 0.2, 0.05, 0.0],
                           [0.0, 0.9, 0.0, 0.00, 0.0],
                           [0.3, 0.3, 0.3, 0.00, 0.0],
                           [0.0, 0.0, 0.0, 0.50, 0.1]])
    found, lifetime = sparsity(latent, threshold=0.1)
    active = [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert found["population_sparsity"] == pytest.approx(np.mean([sum(r) / 5 for r in active]))
    assert lifetime.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.25, 0.0])
    assert found["dead_fraction"] == pytest.approx(1 / 5)
    assert found["mean_activation"] == pytest.approx(latent.mean().item())
    assert "lifetime_sparsity" not in found  # it was the mean of `lifetime`: population_sparsity again


def test_lifetime_sparseness_is_vinje_and_gallants_per_unit_measure_over_live_units():
    """S = (1 - (sum r / n)^2 / (sum r^2 / n)) / (1 - 1/n) per unit (Vinje & Gallant 2000, the
    Treves-Rolls measure rescaled to [0, 1]), averaged over the units that respond at all: a unit that
    responds to one sample of n is 1, one that responds alike to all is 0. Two codes with the same
    population sparsity, one of selective units and one of units that are always on, differ by it."""
    n = 4
    latent = torch.tensor([[0.7, 0.3, 0.0],
                           [0.0, 0.3, 0.0],
                           [0.0, 0.3, 0.0],
                           [0.0, 0.3, 0.0]])
    found, _ = sparsity(latent, threshold=0.1)
    assert found["lifetime_sparseness"] == pytest.approx((1.0 + 0.0) / 2)  # the dead unit is left out
    r = torch.tensor([0.9, 0.1, 0.4, 0.0])
    expected = (1 - (r.sum() / n) ** 2 / (r.pow(2).sum() / n)) / (1 - 1 / n)
    assert sparsity(r[:, None], 0.1)[0]["lifetime_sparseness"] == pytest.approx(expected.item())
    selective = torch.eye(4)  # each unit fires for one sample
    always_on = torch.tensor([[1.0, 0, 0, 0]] * 4)  # one unit fires for all, three never
    a, b = sparsity(selective, 0.1)[0], sparsity(always_on, 0.1)[0]
    assert a["population_sparsity"] == b["population_sparsity"] == 0.25
    assert (a["lifetime_sparseness"], b["lifetime_sparseness"]) == (pytest.approx(1.0), pytest.approx(0.0))


def test_sensitivity_of_a_linear_encoder_is_its_frobenius_norm(make_cfg):
    parts = build(make_cfg("device=cpu", "model.hidden=[]", "model.latent_activation=identity"))
    w = parts.model.enc_layers[0].weight
    spectrum = jacobian_spectrum(parts.model, parts.data.test.x, parts.trainer.batch_size)
    assert sensitivity(spectrum) == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("model", ["model=mlp", "model=contractive", "model=conv"])
def test_jacobian_spectrum_is_the_svd_of_the_encoder_jacobian(make_cfg, model):
    """Each test image's singular values equal those of torch's own Jacobian of the encoder there, and
    their squares add up, image by image, to the exact ||J||_F^2 the contractive penalty computes (the
    closed form for MLPs, batched autograd otherwise)."""
    parts = build(make_cfg("device=cpu", model))
    x = parts.data.test.x[:20]
    spectrum = jacobian_spectrum(parts.model, x, parts.trainer.batch_size)
    assert spectrum.shape == (20, min(parts.model.latent_dim, x.shape[1]))
    for i in (0, 7, 19):
        jac = torch.autograd.functional.jacobian(lambda v: parts.model.encode(v[None])[0][0], x[i])
        torch.testing.assert_close(spectrum[i], torch.linalg.svdvals(jac), rtol=1e-4, atol=1e-6)
    inputs = x.clone().requires_grad_(not hasattr(parts.model, "jacobian_sq_norm"))
    exact = encoder_sensitivity(parts.model(inputs, trace=True), parts.model).detach()
    torch.testing.assert_close(spectrum.pow(2).sum(1), exact, rtol=1e-4, atol=1e-6)
    assert sensitivity(spectrum) == pytest.approx(exact.mean().item(), rel=1e-4)


def test_jacobian_rank_counts_the_directions_that_carry_the_jacobian():
    spectra = torch.tensor([[3.0, 0, 0, 0], [1.0, 1, 1, 1], [2.0, 1, 0, 0], [0.0, 0, 0, 0]])
    assert jacobian_rank(spectra[:1]) == pytest.approx(1.0)  # one direction
    assert jacobian_rank(spectra[1:2]) == pytest.approx(4.0)  # every direction alike
    assert jacobian_rank(spectra[2:3]) == pytest.approx(25 / 17)  # (4 + 1)^2 / (16 + 1)
    assert jacobian_rank(spectra[3:]) == 0.0  # a flat encoder responds to nothing
    assert jacobian_rank(spectra) == pytest.approx((1 + 4 + 25 / 17 + 0) / 4)  # the mean over images


def trained_metrics(make_cfg, epochs: int, *overrides: str) -> dict:
    """The test metrics of a model trained `epochs` epochs on the digits (no early stopping)."""
    from aelab.analysis.metrics import analyse
    from aelab.training.objective import batches
    from aelab.training.steps import train_step

    parts = build(make_cfg("device=cpu", "eval.probe=false", *overrides))
    for epoch in range(epochs):
        order = torch.randperm(len(parts.data.train.x))
        for clean in batches(parts.data.train.x[order], parts.trainer.batch_size, parts.device):
            train_step(parts, clean)
    return analyse(parts, parts.evaluation)[0]


def test_contractive_penalty_leaves_the_encoder_fewer_directions(make_cfg):
    """Part 3's geometric reading, measured: trained with the penalty, the encoder stays sensitive to a
    few directions (the data's) and contracts the rest: ||J||_F^2 falls tenfold, the rank by more than
    the margin here (15 epochs: 3.6 directions without the penalty, 2.7 at 1e-3), while the encoder still
    tells inputs apart (test MSE 0.050; a flat one gives the mean image's 0.074)."""
    found = {weight: trained_metrics(make_cfg, 15, "reg=contractive", f"reg.weight={weight}")
             for weight in ("0.0", "1e-3")}
    assert found["1e-3"]["sensitivity"] < 0.1 * found["0.0"]["sensitivity"]
    assert found["1e-3"]["jacobian_rank"] < 0.85 * found["0.0"]["jacobian_rank"]
    assert found["1e-3"]["mse"] < 0.06


def test_feature_spread_is_the_share_of_pixels_a_unit_draws_on(make_cfg):
    """A linear decoder (one layer, identity output) whose columns are the units' drawings: on one pixel,
    on all 64 alike, on four alike with one larger; a unit no input uses and one that draws nothing are
    left out of the mean. (Linear: the share does not depend on the value a unit is drawn at.)"""
    parts = build(make_cfg("device=cpu", "model.hidden=[]", "model.latent_dim=5", "model.output_activation=identity",
                           "loss=mse"))
    (layer,) = parts.model.decoder
    columns = torch.zeros(64, 5)
    columns[10, 0] = 0.7  # one pixel: 1/64
    columns[:, 1] = -0.2  # every pixel alike: 1
    columns[[0, 1, 8, 9], 2] = torch.tensor([2.0, 1.0, 1.0, 1.0])  # (4 + 3)^2 / (16 + 3) of 64
    columns[:, 3] = 1.0  # unused below
    with torch.no_grad():
        layer.weight.copy_(columns)
        layer.bias.uniform_()  # the zero code's picture, which every unit's drawing is measured from
    latent = torch.tensor([[0.5, 0.0, 3.0, 0.1, 0.2], [0.0, 2.0, 0.0, -1.0, 0.0]])  # unit 3 never above 0.1
    assert feature_spread(parts.model, latent, threshold=0.1) == pytest.approx((1 / 64 + 1 + 49 / 19 / 64) / 3)
    assert feature_spread(parts.model, latent * torch.tensor([0, 0, 0, 1, 1]), threshold=0.1) is None  # unit 4 draws nothing
    assert feature_spread(parts.model, torch.zeros(2, 5), threshold=0.1) is None


def test_feature_spread_draws_each_unit_at_its_typical_value(make_cfg):
    """Each unit in use is drawn at the 90th percentile of its activations above the threshold (1.7 of
    0.3, 0.5, 1, 2), not at 1: through a sigmoid output the share of the image a unit changes depends on it."""
    latent = torch.tensor([0.0, 0.05, 0.3, 0.5, 1.0, 2.0])[:, None].expand(-1, 2).clone()
    latent[:, 1] = 0.0
    typical = typical_activation(latent, 0.1)
    assert typical[0].item() == pytest.approx(1.7) and typical[1].isnan()
    parts = build(make_cfg("device=cpu", "model.hidden=[]", "model.latent_dim=2", "loss=mse"))  # sigmoid output
    (layer,) = parts.model.decoder
    with torch.no_grad():
        layer.weight.normal_(0, 2)

    def share(value: float) -> float:
        d = (torch.sigmoid(layer.bias + value * layer.weight[:, 0]) - torch.sigmoid(layer.bias)).double().pow(2)
        return (d.sum().pow(2) / d.pow(2).sum() / 64).item()
    assert feature_spread(parts.model, latent, 0.1) == pytest.approx(share(1.7)) and share(1.7) != pytest.approx(share(1.0))


def test_analyse_reports_the_feature_spread_of_the_units_in_use(make_cfg):
    """analyse() measures the decoder as built (untrained here): between one pixel's share and the whole
    image, the same as feature_spread from the test codes it reports."""
    from aelab.analysis.metrics import analyse

    parts = build(make_cfg("device=cpu", "model=sparse_l1", "reg=l1", "eval.probe=false"))
    found, arrays = analyse(parts, parts.evaluation)
    assert 1 / 64 < found["feature_spread"] < 1
    assert found["feature_spread"] == feature_spread(parts.model, arrays["latent_activations"], parts.evaluation.threshold)


@pytest.mark.slow
def test_a_stronger_l1_penalty_narrows_each_units_drawing_once_converged(make_cfg, tmp_path):
    """docs/exercises.md's answer to Exercise 2's "more interpretable features?" on the digits, from
    converged models (the l1_sweep preset's): the units an L1 penalty leaves in use each draw less of
    the image as lambda grows (0.45, 0.42, 0.24 at 1e-4, 1e-2, 0.1), while most units die at 0.1. (At
    30 epochs, before the models converged, it went the other way.)"""
    from aelab.cli import job

    found = {}
    for weight in ("1e-4", "1e-2", "1e-1"):
        run_dir = tmp_path / weight
        run_dir.mkdir()
        record = job.run(make_cfg("device=cpu", "eval.probe=false", "eval.projector=0", "model=sparse_l1", "reg=l1",
                                  f"reg.weight={weight}"), run_dir)
        assert record["converged"]
        found[weight] = record["test"]
    spread = [found[w]["feature_spread"] for w in ("1e-4", "1e-2", "1e-1")]
    assert spread[0] > spread[1] > spread[2] and spread[2] < 0.75 * spread[0]
    assert found["1e-1"]["dead_fraction"] > 0.8 > found["1e-2"]["dead_fraction"]


def test_reconstruction_metrics_and_psnr(make_cfg):
    parts = build(make_cfg("device=cpu"))
    x = parts.data.test.x
    with torch.no_grad():
        recon = parts.model(x).recon
    found = reconstruction(parts.model, x, parts.data.image_shape, parts.trainer.batch_size)
    per_image = (recon - x).pow(2).mean(1)
    assert found["mse"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert found["mae"] == pytest.approx((recon - x).abs().mean().item(), rel=1e-5)
    assert found["psnr"] == pytest.approx((10 * torch.log10(1 / per_image)).mean().item(), rel=1e-5)
    images = lambda t: t.view(-1, *parts.data.image_shape)  # noqa: E731
    assert found["sharpness"] == pytest.approx((gradient_energy(images(recon)) / gradient_energy(images(x))).item(),
                                               rel=1e-5)
    identity = reconstruction(parts.model, x, parts.data.image_shape, parts.trainer.batch_size, corrupt=lambda c, g=None: c)
    assert identity["mse"] == pytest.approx(found["mse"], rel=1e-6)


def test_sharpness_is_the_gradient_energy_that_blur_lowers(make_cfg):
    dot = torch.zeros(1, 1, 3, 3)
    dot[0, 0, 1, 1] = 1.0  # four neighbours differ by 1: two down the rows, two across the columns
    assert gradient_energy(dot).item() == 4.0
    assert gradient_energy(torch.full((2, 1, 4, 4), 0.7)).item() == 0.0
    digits = build(make_cfg("device=cpu")).data.test.x.view(-1, 1, 8, 8)
    blurred = torch.nn.functional.avg_pool2d(digits, 3, stride=1, padding=1, count_include_pad=False)
    assert 0 < gradient_energy(blurred) / gradient_energy(digits) < 0.5
    assert gradient_energy(digits * 0.5) / gradient_energy(digits) == pytest.approx(0.25)


def test_linear_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    x = np.eye(3)[y] * 5 + rng.normal(0, 0.3, (400, 3))
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], max_samples=200, seed=0) == 1.0
    noise = rng.normal(size=(400, 3))
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:], max_samples=300, seed=0) < 0.6


def test_feature_grid_decodes_one_hot_codes(make_cfg):
    parts = build(make_cfg("device=cpu"))
    grid = feature_grid(parts.model, 16, parts.data.image_shape)
    assert grid.shape[0] == 3 and grid.shape[1] == 4 * 8 + 5 * 2  # 4x4 tiles of 8x8 with 2-px padding
    with torch.no_grad():
        first = parts.model.decode(torch.eye(1, 32))[0].view(8, 8)
    tile = grid[0, 2:10, 2:10]
    expected = (first - first.min()) / (first.max() - first.min())  # normalize=True, scale_each=True
    torch.testing.assert_close(tile, expected, atol=1e-5, rtol=0)


def test_feature_grid_draws_each_unit_at_the_value_given(make_cfg):
    """eval.feature_value: one value for every unit, or each unit's own (typical), a unit never active
    (NaN) drawn black."""
    from aelab.analysis.pictures import features_picture

    parts = build(make_cfg("device=cpu"))

    def tile(grid, index):  # the index-th 8x8 tile of a 4-across grid with 2-px padding
        row, column = divmod(index, 4)
        return grid[0, 2 + 10 * row:10 + 10 * row, 2 + 10 * column:10 + 10 * column]

    def drawn(code):
        with torch.no_grad():
            image = parts.model.decode(code[None])[0].view(8, 8).clamp(0, 1)
        return (image - image.min()) / (image.max() - image.min())

    assert torch.equal(feature_grid(parts.model, 16, parts.data.image_shape, 1.0), feature_grid(parts.model, 16, parts.data.image_shape))
    values = torch.full((32,), 3.0)
    values[1] = torch.nan
    values[2] = 0.25
    grid = feature_grid(parts.model, 16, parts.data.image_shape, values)
    torch.testing.assert_close(tile(grid, 0), drawn(3.0 * torch.eye(32)[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(tile(grid, 2), drawn(0.25 * torch.eye(32)[2]), atol=1e-5, rtol=0)
    assert torch.equal(tile(grid, 1), torch.zeros(8, 8))  # never active: black
    assert not torch.allclose(tile(grid, 0), tile(feature_grid(parts.model, 16, parts.data.image_shape), 0), atol=1e-3)  # 3 draws another picture
    latent = torch.rand(50, 32) * 2  # typical: each unit's 90th percentile above eval.threshold
    latent[:, 5] = 0.0
    typical = dataclasses.replace(parts.evaluation, feature_value="typical", features=16)
    picture = features_picture(parts, typical, {"latent_activations": latent})
    assert torch.equal(picture, feature_grid(parts.model, 16, parts.data.image_shape, typical_activation(latent, 0.1).float()))
    assert torch.equal(tile(picture, 5), torch.zeros(8, 8))


@pytest.mark.parametrize("count, shape, columns", [(16, (1, 8, 8), None), (7, (1, 8, 8), 3), (64, (1, 28, 28), 8),
                                                   (5, (3, 4, 6), None), (3, (1, 8, 8), 10), (1, (1, 8, 8), None)])
def test_grid_lays_images_out_as_torchvision_does(count, shape, columns, tmp_path):
    """aelab draws its picture grids itself (torchvision's import alone costs seconds per command): the
    same layout and pixels as make_grid with white padding, and the PNG save_image would write."""
    from PIL import Image
    from torchvision.utils import make_grid, save_image

    from aelab.analysis.pictures import save_png
    images = torch.rand(count, *shape) * 1.4 - 0.2
    for stretch in (False, True):
        ours = grid(images.flatten(1), shape, columns, stretch=stretch)
        theirs = make_grid(images, nrow=columns or math.ceil(math.sqrt(count)), pad_value=1.0, normalize=stretch,
                           scale_each=stretch)
        if count == 1:  # make_grid returns a lone image without its frame
            theirs = torch.nn.functional.pad(theirs.expand(3, -1, -1), (2, 2, 2, 2), value=1.0)
        torch.testing.assert_close(ours, theirs.expand(3, -1, -1), atol=1e-6, rtol=0)
    clipped = grid(images.clamp(0, 1), shape, columns)
    save_png(clipped, tmp_path / "ours.png")
    save_image(clipped, tmp_path / "theirs.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), np.asarray(Image.open(tmp_path / "theirs.png")))


def test_row_labels_sit_at_the_middle_of_each_row_of_a_grid():
    """Three rows of 8x8 images: pixel rows 2-9, 12-19, 22-29 (2 px of padding), so the middles 5.5, 15.5,
    25.5; the one rule behind the row names of denoising.png, compare_reconstructions.png and sample.png."""
    from aelab.analysis.figures import label_rows, pyplot
    picture = grid(torch.rand(6, 64), (1, 8, 8), columns=2)
    fig, ax = pyplot().subplots()
    label_rows(ax, picture.shape[1], ["a", "b", "c"], fontsize=7)
    assert picture.shape[1] == 32 and list(ax.get_yticks()) == [5.5, 15.5, 25.5]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"] and not len(ax.get_xticks())
    pyplot().close(fig)


def test_robustness_is_the_same_noise_for_every_model(make_cfg):
    from aelab.analysis.metrics import analyse
    a = build(make_cfg("device=cpu", "eval.probe=false"))
    b = build(make_cfg("device=cpu", "eval.probe=false", "trainer.seed=1"))
    b.model.load_state_dict(a.model.state_dict())
    b = type(b)(**{**b.__dict__, "trainer": a.trainer})  # same seed → same noisy test set
    assert analyse(a, a.evaluation)[0] == analyse(b, b.evaluation)[0]
    assert math.isfinite(analyse(a, a.evaluation)[0]["mse_block"])


def test_a_list_of_test_noise_levels_measures_each(make_cfg):
    """eval.noise.gaussian.noise_factor=[0.1,0.5] measures mse_gaussian_0.1 and mse_gaussian_0.5, each the
    number a run tested at that one level gives (Exercise 5: a model tested at every noise level)."""
    from aelab.analysis.metrics import analyse
    levels = build(make_cfg("device=cpu", "eval.probe=false", "eval.noise.gaussian.noise_factor=[0.1,0.5]"))
    found = analyse(levels, levels.evaluation)[0]
    assert [m for m in found if m.startswith("mse_")] == ["mse_gaussian_0.1", "mse_gaussian_0.5", "mse_salt_pepper",
                                                          "mse_masking", "mse_block"]
    for level in ("0.1", "0.5"):
        one = build(make_cfg("device=cpu", "eval.probe=false", f"eval.noise.gaussian.noise_factor={level}"))
        one.model.load_state_dict(levels.model.state_dict())
        assert found[f"mse_gaussian_{level}"] == analyse(one, one.evaluation)[0]["mse_gaussian"]
    assert found["mse_gaussian_0.5"] > found["mse_gaussian_0.1"] > found["mse"]


def test_denoising_picture_shows_the_inputs_each_test_noise_was_measured_on(make_cfg):
    """denoising.png's rows are the first test images as each eval.noise entry's mse_<label> corrupted them
    (the first batch, the same seed), above what the model made of them; labelled with the settings."""
    from aelab.analysis.pictures import denoising_picture
    from aelab.training.monitor import GRID_IMAGES
    from aelab.analysis.metrics import analyse, denoised
    parts = build(make_cfg("device=cpu", "eval.probe=false", "trainer.batch_size=32",
                           "eval.noise.gaussian.noise_factor=[0.1,0.5]"))
    settings = parts.evaluation
    assert settings.noise_settings == {"gaussian_0.1": "gaussian noise_factor=0.1",
                                       "gaussian_0.5": "gaussian noise_factor=0.5",
                                       "salt_pepper": "salt_pepper prob=0.2", "masking": "masking prob=0.3",
                                       "block": "block size=3 count=1"}
    clean, shown = denoised(parts.model, parts.data.test.x, settings.noise, 32, parts.trainer.seed)
    assert list(shown) == list(settings.noise) and torch.equal(clean, parts.data.test.x[:GRID_IMAGES])
    seen = []
    hook = parts.model.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    for label, corrupt in settings.noise.items():
        seen.clear()
        reconstruction(parts.model, parts.data.test.x, parts.data.image_shape, 32, corrupt, parts.trainer.seed)
        noisy, recon = shown[label]
        assert len(seen[0]) == 32 and torch.equal(noisy, seen[0][:GRID_IMAGES]) and not torch.equal(noisy, clean)
        with torch.no_grad():
            assert torch.equal(recon, parts.model(noisy).recon)
    hook.remove()
    test = {"mse": 0.02, **{f"mse_{label}": 0.03 for label in settings.noise}}
    picture = denoising_picture(parts, settings, test)
    assert picture.shape[0] == 3 and picture.shape[1] > 11 * 8 and 0 <= picture.min() and picture.max() <= 1
    quiet = build(make_cfg("device=cpu", "eval.probe=false", "eval.noise=null"))  # no test noise
    assert quiet.evaluation.noise == {} and denoising_picture(quiet, quiet.evaluation, {"mse": 0.02}) is None
    assert not [name for name in analyse(quiet, quiet.evaluation)[0] if name.startswith(("mse_", "score_cos"))]


def test_step_alignment_of_hand_made_steps():
    """The cosine between f(x̃) - x̃ and x - x̃, image by image (rows)."""
    from aelab.analysis.metrics import step_alignment
    clean = torch.tensor([[0.0, 1.0, 0.5, 0.5]]).repeat(5, 1)
    noisy = torch.tensor([[0.2, 0.7, 0.5, 0.9]]).repeat(5, 1)
    noisy[4] = clean[4]  # the corruption changed no pixel of the last image
    recon = torch.stack([clean[0],                             # straight back to the clean input
                         noisy[1] + 0.3 * (clean[1] - noisy[1]),  # part of the way: the direction counts
                         noisy[2] - (clean[2] - noisy[2]),       # away from it
                         noisy[3] + torch.tensor([0.0, 0.0, 1.0, 0.0]),  # across it: the noise left alone
                         clean[4]])
    found = step_alignment(recon, noisy, clean)
    assert found[:4].tolist() == pytest.approx([1.0, 1.0, -1.0, 0.0], abs=1e-6)
    assert found[4].isnan()


def test_score_alignment_is_measured_for_gaussian_test_noise(make_cfg):
    """score_cos_gaussian_<level>: the mean step_alignment of the model's reconstructions of the same
    fixed-seed noisy test set that mse_gaussian_<level> scores; gaussian noise only (the score estimate)."""
    from aelab.corruptions import CORRUPTIONS
    from aelab.analysis.metrics import analyse, step_alignment
    parts = build(make_cfg("device=cpu", "eval.probe=false", "eval.noise.gaussian.noise_factor=[0.1,0.5]"))
    found = analyse(parts, parts.evaluation)[0]
    assert [m for m in found if m.startswith("score_cos")] == ["score_cos_gaussian_0.1", "score_cos_gaussian_0.5"]
    x = parts.data.test.x
    noisy = CORRUPTIONS.get("gaussian")(noise_factor=0.5)(x, torch.Generator().manual_seed(parts.trainer.seed))
    with torch.no_grad():
        recon = parts.model(noisy).recon
    assert found["score_cos_gaussian_0.5"] == pytest.approx(step_alignment(recon, noisy, x).nanmean().item(), rel=1e-5)
    assert "score_cos" not in reconstruction(parts.model, x, parts.data.image_shape, parts.trainer.batch_size, corrupt=lambda c, g=None: c)  # nothing to point back to


def test_a_denoising_model_points_back_to_the_data_more_the_noisier_its_input(tmp_path, make_cfg):
    """The tutorial's score matching connection, measured: f(x̃) - x̃ of a model trained on gaussian
    noise 0.3 points back to the clean input the better, the larger the test noise (at small noise the
    model's own reconstruction error outweighs the noise it removes)."""
    from aelab.cli.job import run
    cfg = make_cfg("device=cpu", "trainer.epochs=15", "corruption=gaussian", "corruption.noise_factor=0.3",
                   "eval.probe=false", "eval.noise.gaussian.noise_factor=[0.1,0.3,0.5]")
    (tmp_path / "run").mkdir()
    test = run(cfg, tmp_path / "run")["test"]
    cosines = [test[f"score_cos_gaussian_{level}"] for level in ("0.1", "0.3", "0.5")]
    assert 0 < cosines[0] < cosines[1] < cosines[2] and cosines[2] > 0.6, cosines


def test_principal_components_of_codes_match_the_covariance_eigenvectors():
    """latents.png's axes: the codes' projections on the two leading eigenvectors of their covariance
    (numpy's eigh, in float64), signed so that each component's largest loading is positive, and each
    one's share of the total variance."""
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(500, 6, generator=generator) * torch.tensor([0.5, 3.0, 0.2, 1.0, 0.1, 2.0]) + 4.0
    latent = latent @ torch.linalg.qr(torch.randn(6, 6, generator=generator))[0]  # no axis-aligned answer
    points, share = principal_components(latent)
    data = latent.double().numpy()
    values, vectors = np.linalg.eigh(np.cov(data, rowvar=False))
    order = np.argsort(values)[::-1][:2]
    vectors = vectors[:, order] * np.sign(vectors[np.abs(vectors[:, order]).argmax(0), order])
    assert points.numpy() == pytest.approx((data - data.mean(0)) @ vectors, abs=1e-9)
    assert share.numpy() == pytest.approx(values[order] / values.sum(), rel=1e-9)
    assert share.tolist() == pytest.approx([9 / 15.3, 4 / 15.3], rel=0.15)  # variances 9, 4 of 15.3 in all
    one, whole = principal_components(latent[:, :1])  # a code of one unit: one component, all its variance
    assert one.shape == (500, 1) and whole.tolist() == pytest.approx([1.0])
    flat, none = principal_components(torch.zeros(10, 4))  # every unit dead: nothing to divide by zero
    assert flat.abs().sum() == 0 and none.abs().sum() == 0


def test_latent_picture_puts_each_class_where_its_codes_lie():
    """Two classes of codes far apart along one unit: class 0's dots (the first colour) on the left of
    the picture, class 1's (the second) on the right, where principal component 1 puts them."""
    from matplotlib.colors import to_rgb
    from aelab.analysis.pictures import latent_picture

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    latent = torch.randn(200, 5, generator=generator) * 0.3
    latent[:, 2] += torch.where(labels == 1, 4.0, -4.0)  # class 1 at +4 on unit 2: its loading is the largest
    picture = latent_picture(latent, labels)
    assert picture.shape[0] == 3 and 0 <= picture.min() and picture.max() <= 1
    pixels = picture.permute(1, 2, 0)[:, : picture.shape[2] * 3 // 4]  # the axes, not the legend on the right
    columns = []
    for colour in ("C0", "C1"):
        dot = 0.7 * torch.tensor(to_rgb(colour)) + 0.3  # at alpha 0.7 on white
        near = (pixels - dot).abs().amax(-1) < 0.12
        columns.append(near.nonzero()[:, 1].float().mean().item())
        assert near.sum() > 100
    assert columns[0] < 0.45 * pixels.shape[1] < 0.55 * pixels.shape[1] < columns[1]
    for flat in (torch.zeros(20, 4), torch.rand(20, 1)):  # every unit dead (l1 at weight 1); a code of one unit
        assert latent_picture(flat, labels[:20]).shape[0] == 3


def test_kept_figures_draw_what_fresh_ones_draw(tmp_path, monkeypatch):
    """A run's end draws histograms.png, the latents picture and the labelled grids into the figures the
    last run's end drew (a sweep's next job, in the same process): the pixels are those of fresh
    figures, whatever the last one showed (other units, classes, ranges, a spectrum decades away, other
    images and labels)."""
    from PIL import Image
    from aelab.analysis import figures
    from aelab.analysis.pictures import histogram_png, labelled, latent_picture

    def drawn(units: int, classes: int, scale: float, seed: int, path):
        generator = torch.Generator().manual_seed(seed)
        latent = torch.rand(300, units, generator=generator) * scale
        spectrum = torch.rand(300, units, generator=generator).sort(dim=1, descending=True).values * scale ** 3
        arrays = {"latent_activations": latent, "lifetime_sparsity": torch.rand(units, generator=generator),
                  "jacobian_spectrum": spectrum + 1e-3}
        histogram_png(arrays, path, threshold=0.1 * scale)
        rows = grid(torch.rand(24, 1, 8, 8, generator=generator), (1, 8, 8), columns=8)
        return (np.asarray(Image.open(path)), latent_picture(latent, torch.arange(300) % classes),
                labelled(rows, [f"row {seed}", "input", f"MSE {scale:05.2f}"]))

    def artists():  # what each kept figure's axes hold: the last use's drawing, no earlier one's under it
        return {name: [len([*ax.lines, *ax.patches, *ax.collections, *ax.images]) for ax in fig.axes]
                for name, fig in figures.KEPT.items()}

    figures.KEPT.clear()
    fresh, held = drawn(32, 10, 1.0, 0, tmp_path / "fresh.png"), artists()
    figures.KEPT.clear()
    drawn(8, 3, 40.0, 1, tmp_path / "before.png")
    assert len(figures.KEPT) == 3  # the same names: each is drawn again below
    kept = drawn(32, 10, 1.0, 0, tmp_path / "kept.png")
    assert np.array_equal(kept[0], fresh[0]) and torch.equal(kept[1], fresh[1]) and torch.equal(kept[2], fresh[2])
    assert artists() == held
    monkeypatch.setattr(figures, "MAX_KEPT", 4)
    for size in range(2):  # more sizes than it keeps: the latest kept, the first made gone
        labelled(torch.rand(3, 12, 12 + size), ["a"])
    assert len(figures.KEPT) == 4 and "histograms" not in figures.KEPT and "latents" in figures.KEPT


def test_the_projector_holds_the_test_codes_once(tmp_path):
    """TensorBoard's Projector files: the codes (tensors.tsv), their classes (metadata.tsv) and images
    (sprite.png); written again at the same step, the earlier ones are replaced, not kept beside."""
    from torch.utils.tensorboard import SummaryWriter
    from aelab.data import Split
    from aelab.analysis.tensorboard import log_embedding

    latent, test = torch.rand(5, 3), Split(torch.rand(5, 64), torch.tensor([3, 1, 4, 1, 5]))
    for codes in (latent + 1, latent):
        writer = SummaryWriter(str(tmp_path))
        log_embedding(writer, codes, test, (1, 8, 8), step=40)
        writer.close()
    (folder,) = (tmp_path / "00040").iterdir()
    written = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    assert written == pytest.approx(latent.numpy(), abs=1e-6)
    assert (folder / "metadata.tsv").read_text().split() == ["3", "1", "4", "1", "5"]
    assert (folder / "sprite.png").is_file()
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 1 and f'tensor_path: "00040/{folder.name}/tensors.tsv"' in config


@pytest.mark.parametrize("shown", [7, 0])
def test_eval_projector_sets_how_many_test_codes_the_projector_shows(make_cfg, tmp_path, shown):
    """eval.projector=N: the first N test codes (of the digits' 270), with their classes; 0: no Projector files."""
    from torch.utils.tensorboard import SummaryWriter
    from aelab.analysis.tensorboard import log_final
    from aelab.training.monitor import codes

    cfg = make_cfg("device=cpu", f"eval.projector={shown}")
    parts = build(cfg)
    latent = codes(parts.model, parts.data.test.x, parts.trainer.batch_size)
    arrays = {"latent_activations": latent, "lifetime_sparsity": torch.zeros(latent.shape[1])}
    writer = SummaryWriter(str(tmp_path))
    log_final(writer, cfg, parts, {"val": {"total": 0.1}, "test": {"mse": 0.1}}, {}, arrays, 12)
    if not shown:
        assert not (tmp_path / "00012").exists() and not (tmp_path / "projector_config.pbtxt").exists()
        return
    (folder,) = (tmp_path / "00012").iterdir()
    assert np.loadtxt(folder / "tensors.tsv", delimiter="\t") == pytest.approx(latent[:shown].numpy(), abs=1e-6)
    assert (folder / "metadata.tsv").read_text().split() == [str(c) for c in parts.data.test.labels[:shown].tolist()]


def test_the_pixel_probe_is_fit_once_per_data_set(make_cfg, monkeypatch):
    """probe_pixels is the data's number: the ends of a stack's jobs (which share their data) fit it once;
    other data, or other probe settings, fit their own."""
    from aelab.analysis import metrics

    calls = []
    monkeypatch.setattr(metrics, "linear_probe", lambda *args: calls.append(args[-2:]) or 0.5)
    data = build(make_cfg("device=cpu")).data
    other = build(make_cfg("device=cpu")).data  # the same images, read again: other tensors
    assert [metrics.pixel_probe(d, n, 0) for d, n in ((data, 300), (data, 300), (other, 300), (data, 200))] == [0.5] * 4
    assert calls == [(300, 0), (300, 0), (200, 0)]
