"""Corruption statistics: masking fraction, salt/pepper split, gaussian std, block geometry."""
import pytest
import torch

from aelab.corruptions import CORRUPTIONS
from aelab.registry import ConfigError

SHAPE = (1, 28, 28)


def make(name, **kwargs):
    return CORRUPTIONS.get(name)(**kwargs)


def test_masking_zeroes_prob_fraction():
    x = torch.full((200, 784), 0.5)
    out = make("masking", prob=0.3)(x)
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.all((out == 0) | (out == 0.5))


def test_salt_pepper_splits_half_and_half():
    x = torch.full((200, 784), 0.5)
    out = make("salt_pepper", prob=0.2)(x)
    salt, pepper = (out == 1).float().mean().item(), (out == 0).float().mean().item()
    assert salt + pepper == pytest.approx(0.2, abs=0.01)
    assert salt == pytest.approx(0.1, abs=0.005) and pepper == pytest.approx(0.1, abs=0.005)


def test_gaussian_std_and_clamp():
    x = torch.full((200, 784), 0.5)
    out = make("gaussian", noise_factor=0.1)(x)
    assert (out - x).std().item() == pytest.approx(0.1, rel=0.02)
    wide = make("gaussian", noise_factor=2.0)(x)
    assert wide.min().item() == 0.0 and wide.max().item() == 1.0


@pytest.mark.parametrize("size,count", [(3, 1), (5, 2), (28, 1)])
def test_block_geometry(size, count):
    x = torch.ones(500, 784)
    out = make("block", size=size, count=count, image_shape=SHAPE)(x).view(500, 28, 28)
    for img in out[:50]:
        zero_rows, zero_cols = torch.nonzero(img == 0, as_tuple=True)
        if count == 1:  # exactly one size x size square
            assert len(zero_rows) == size * size
            assert zero_rows.max() - zero_rows.min() == size - 1
            assert zero_cols.max() - zero_cols.min() == size - 1
        else:  # union of squares: at least one, at most count of them
            assert size * size <= len(zero_rows) <= count * size * size
    if size < 28:  # every position is reachable: top-left corners cover 0 .. 28 - size
        corners = torch.stack([torch.nonzero(img == 0)[0] for img in out])
        assert corners[:, 0].min() == 0 and corners[:, 0].max() == 28 - size


def test_block_larger_than_image_is_rejected():
    with pytest.raises(ConfigError, match="size"):
        make("block", size=9, count=1, image_shape=(1, 8, 8))


@pytest.mark.parametrize("name,kwargs", [("gaussian", {"noise_factor": 0.3}), ("salt_pepper", {"prob": 0.2}),
                                         ("masking", {"prob": 0.3}),
                                         ("block", {"size": 4, "count": 2, "image_shape": SHAPE})])
def test_clean_input_unchanged_and_generator_reproducible(name, kwargs):
    x = torch.rand(32, 784)
    before = x.clone()
    corrupt = make(name, **kwargs)
    a = corrupt(x, torch.Generator().manual_seed(3))
    b = corrupt(x, torch.Generator().manual_seed(3))
    assert torch.equal(x, before)
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_none_is_identity():
    x = torch.rand(4, 10)
    assert make("none")(x) is x


@pytest.mark.parametrize("name,kwargs,key", [("masking", {"prob": 1.5}, "prob"), ("salt_pepper", {"prob": -0.1}, "prob"),
                                             ("gaussian", {"noise_factor": -1}, "noise_factor")])
def test_bad_values_name_the_key(name, kwargs, key):
    with pytest.raises(ConfigError) as err:
        make(name, **kwargs)
    assert err.value.key == key
