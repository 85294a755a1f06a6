"""Datasets: the bundled digits, torchvision loaders on torchvision-layout roots, offline errors."""
import json

import pytest
import torch

from aelab.data import DATASETS, IMAGE_SHAPES
from aelab.registry import ConfigError
from conftest import SHARED_MNIST, read_idx_gz, run_cli


def test_digits_split_sizes_and_range():
    d = DATASETS.get("digits")(val_fraction=0.2, test_fraction=0.1, split_seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (1258, 359, 180)
    assert d.train.x.shape[1] == 64 and d.image_shape == (1, 8, 8)
    assert d.train.x.min() >= 0 and d.train.x.max() == 1.0


@pytest.mark.parametrize("key", ["val_fraction", "test_fraction"])
def test_a_fraction_that_leaves_a_split_empty_is_refused(key):
    with pytest.raises(ConfigError) as err:  # was a ZeroDivisionError from the empty validation image grid
        DATASETS.get("digits")(**{key: 0.0002})
    assert err.value.key == key and "leaves no" in str(err.value) and "at least 0.00056" in str(err.value)
    one = DATASETS.get("digits")(**{key: 0.00056})
    assert len(one.val if key == "val_fraction" else one.test) == 1


def test_each_data_set_has_the_image_shape_a_sweep_is_checked_with(synthetic_root):
    """A sweep's jobs are checked before any data is loaded, with IMAGE_SHAPES standing in for the data."""
    assert set(IMAGE_SHAPES) == set(DATASETS.names())
    for name in DATASETS.names():
        options = {} if name == "digits" else {"root": str(synthetic_root)}
        assert DATASETS.get(name)(**options).image_shape == IMAGE_SHAPES[name]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_missing_files_offline_say_where_to_put_them(tmp_path, name):
    with pytest.raises(ConfigError) as err:
        DATASETS.get(name)(root=str(tmp_path), download=False)
    assert err.value.key == "root" and "/raw" in str(err.value) and "data.download=true" in str(err.value)


def test_torchvision_mnist_reads_the_real_test_set(real_mnist_root):
    d = DATASETS.get("mnist")(root=str(real_mnist_root), download=False, val_fraction=0.1, split_seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (7200, 800, 2000)
    assert d.image_shape == (1, 28, 28)
    images = read_idx_gz(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    first_test = torch.tensor(images[8000].reshape(-1), dtype=torch.float32) / 255
    assert torch.equal(d.test.x[0], first_test)
    labels = torch.cat([d.train.labels, d.val.labels, d.test.labels])
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
def test_short_real_mnist_run_lowers_validation_loss(real_mnist_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_cli("train", "data=mnist", f"paths.data={real_mnist_root}", "trainer.epochs=3", "trainer.batch_size=64", "device=cpu",
            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    val = [e.value for e in acc.Scalars("val/total")]
    assert len(val) == 3 and val[2] < val[0]
    # beats predicting the mean image (MSE about 0.067 on MNIST)
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["mse"] < 0.05
