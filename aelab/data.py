"""Datasets as float tensors in [0, 1], flattened to (N, C*H*W), split train/val/test with a seed."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from .registry import ConfigError, Registry, number

DATASETS = Registry("data")
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "kmnist": (1, 28, 28)}


@dataclass(frozen=True)
class Split:
    x: Tensor       # (N, C*H*W) float32 in [0, 1]
    labels: Tensor  # (N,) int64, for linear probes and plots

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Splits:
    name: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    train: Split
    val: Split
    test: Split

    def to(self, device: torch.device) -> "Splits":
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def _fraction(value, key: str) -> float:
    return number(value, key, low=0, high=1, high_open=True)


def _carve(x: Tensor, labels: Tensor, fractions: dict[str, float], seed: int) -> list[Split]:
    """Shuffle with `seed`, then cut off the fraction under each key in order; the rest is the last split.
    Each cut must hold at least one sample: validation and test metrics are means over them."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, labels = x[order], labels[order]
    splits, start = [], 0
    for key, f in fractions.items():
        n = int(round(f * len(x)))
        if n < 1:
            raise ConfigError(f"{f:g} of the {len(x)} samples leaves no {key.split('_')[0]} samples; "
                              f"use at least {1 / len(x):.2g}", key)
        splits.append(Split(x[start:start + n], labels[start:start + n]))
        start += n
    splits.append(Split(x[start:], labels[start:]))
    return splits


@DATASETS.register
def digits(val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 0..16 scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    val_f, test_f = _fraction(val_fraction, "val_fraction"), _fraction(test_fraction, "test_fraction")
    if val_f + test_f >= 1:
        raise ConfigError(f"val_fraction + test_fraction must be < 1, got {val_f + test_f:g}", "test_fraction")
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    test, val, train = _carve(x, labels, {"test_fraction": test_f, "val_fraction": val_f},
                              number(split_seed, "split_seed", integer=True))
    return Splits("digits", IMAGE_SHAPES["digits"], train, val, test)


class DamagedFile(ConfigError):
    """A data file that is here but cannot be read whole: refused on every machine, unlike a missing one."""


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_count(path: Path, ndim: int) -> int:
    """The number of items an idx file (MNIST's format: 0, 0, 0x08 for uint8, the number of dims, then
    each dim as a big-endian uint32, then the bytes) holds, once its header and size agree; a damaged
    file is a ConfigError naming it and the fix."""
    fix = "delete it and set data.download=true, or put a whole copy there"
    size = path.stat().st_size  # the header and the size tell: torchvision reads the data itself
    with path.open("rb") as f:
        header = f.read(4 + 4 * ndim)
    if not size:
        raise DamagedFile(f"{path} is empty; {fix}", "root")
    if len(header) < 4 or header[:3] != b"\x00\x00\x08" or header[3] != ndim:
        raise DamagedFile(f"{path} is not an idx file of {ndim}-dimensional uint8 data (it starts "
                          f"{header[:4].hex()}, not 000008{ndim:02x}); {fix}", "root")
    dims = [int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        raise DamagedFile(f"{path} is cut short or too long ({size} bytes; its header, "
                          f"{' x '.join(map(str, dims))}, says {expected}); {fix}", "root")
    return dims[0]


def check_idx_files(raw: Path) -> None:
    """Each of a torchvision MNIST-layout set's files that is there, whole, and the images and labels of
    each split as many (torchvision's own reader fails on these with a traceback)."""
    for images, labels in IDX_FILES.values():
        if (raw / images).is_file() and (raw / labels).is_file():
            counts = idx_count(raw / images, 3), idx_count(raw / labels, 1)
            if counts[0] != counts[1]:
                raise DamagedFile(f"{raw / images} holds {counts[0]} images and {raw / labels} {counts[1]} labels; "
                                  f"delete both and set data.download=true, or put whole copies there", "root")


def _torchvision(name: str, cls_name: str, root: str, download: bool, val_fraction: float,
                 split_seed: int) -> Splits:
    """A torchvision image set: its train file split into train/val, its test file as test."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root_path = Path(str(root)).expanduser()  # paths.data=5: the folder named 5
    check_idx_files(root_path / cls_name / "raw")
    try:
        sets = [cls(str(root_path), train=t, download=bool(download)) for t in (True, False)]
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise
        raise ConfigError(
            f"no {cls_name} files under {root_path / cls_name / 'raw'}; put the four idx files "
            f"(train-images-idx3-ubyte, ...) there, or set data.download=true (needs internet)", "root") from None
    except OSError as e:  # download attempted without a network
        raise ConfigError(f"could not download {cls_name} into {root_path}: {e}; "
                          f"place the files under {root_path / cls_name / 'raw'} and set data.download=false",
                          "download") from None
    train_set, test_set = sets
    to_x = lambda images: images.reshape(len(images), -1).to(torch.float32) / 255.0  # noqa: E731
    val, train = _carve(to_x(train_set.data), train_set.targets.long(),
                        {"val_fraction": _fraction(val_fraction, "val_fraction")},
                        number(split_seed, "split_seed", integer=True))
    return Splits(name, (1, *train_set.data.shape[1:]), train, val, Split(to_x(test_set.data), test_set.targets.long()))


@DATASETS.register
def mnist(root: str = "data", download: bool = False, val_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    return _torchvision("mnist", "MNIST", root, download, val_fraction, split_seed)


@DATASETS.register
def fashion_mnist(root: str = "data", download: bool = False, val_fraction: float = 0.1,
                  split_seed: int = 0) -> Splits:
    return _torchvision("fashion_mnist", "FashionMNIST", root, download, val_fraction, split_seed)


@DATASETS.register
def kmnist(root: str = "data", download: bool = False, val_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    return _torchvision("kmnist", "KMNIST", root, download, val_fraction, split_seed)
