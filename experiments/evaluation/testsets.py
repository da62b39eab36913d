"""The data an evaluation reads: the test set as pixels, and the natural OOD partner of a dataset."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator

import torch

from ..data import DEBIAN_FASHION_MNIST, FolderData, TensorData, load_dataset, read_idx
from .synthetic_loc import MAX_CLASSES as LOC_MAX_CLASSES
from .synthetic_loc import NAME as LOC_NAME
from .synthetic_loc import load_synthetic_loc

SUBSET_SEED = 1234 + 1   # as the studies pick their --test-subset, so the same N picks the same images
OTHER_DATASET = {"fashion-mnist": "mnist", "cifar10": "cifar100", "cifar100": "cifar10"}


def load_eval_data(name: str, data_dir: str | None, test_subset: int | None, size: int = 32, in_chans: int = 3,
                   num_classes: int = LOC_MAX_CLASSES, workers: int = 4) -> TensorData | FolderData:
    """The test set `name` (synthetic-loc drawn at the model's size, channels and classes), subset if asked."""
    if name == LOC_NAME:
        k = min(LOC_MAX_CLASSES, num_classes)
        if k < 2:
            raise ValueError(f"{LOC_NAME} needs a model with >= 2 classes, got num_classes={num_classes}")
        data: Any = load_synthetic_loc(n_train=0, size=size, num_classes=k, in_chans=in_chans)
    else:
        data = load_dataset(name, data_dir, download=False, image_size=size, workers=workers)
    if test_subset:
        data.test_subset(test_subset, torch.Generator().manual_seed(SUBSET_SEED))
    return data


def pixel_batches(x_u8: torch.Tensor, y: torch.Tensor | None, batch_size: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, slice]]:
    """(pixels in [0, 1] on `device`, labels or None, slice of the set) per batch of a uint8 tensor."""
    for s in range(0, x_u8.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        yield x_u8[sl].to(device).float().div_(255), (None if y is None else y[sl].to(device)), sl


def pixel_test_batches(data: TensorData | FolderData, batch_size: int, device: torch.device,
                       index: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The test set (or its images at `index`, in that order) as (pixels in [0, 1], labels, test-set indices)."""
    index = torch.arange(data.num_test) if index is None else index.cpu()
    if isinstance(data, TensorData):
        for s in range(0, index.numel(), batch_size):
            i = index[s:s + batch_size]
            j = i.to(data.test_x.device)
            yield data.test_x[j].to(device).float().div_(255), data.test_y[j].to(device), i
        return
    from torch.utils.data import DataLoader, Subset
    start = 0
    for x, y in DataLoader(Subset(data.test_set, index.tolist()), batch_size=batch_size, shuffle=False,
                           num_workers=data.workers):
        yield x.to(device).float().div_(255), y.to(device), index[start:start + x.shape[0]]
        start += x.shape[0]


def _find_mnist_test(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MNIST's test idx files under data_dir (flat, torchvision's MNIST/raw, or mnist/), if present."""
    roots = [Path(data_dir)] if data_dir else []
    roots += [Path("data"), DEBIAN_FASHION_MNIST.parent / "mnist"]
    for r in roots:
        for d in (r, r / "MNIST" / "raw", r / "mnist"):
            for suffix in ("", ".gz"):
                xi, yi = d / f"t10k-images-idx3-ubyte{suffix}", d / f"t10k-labels-idx1-ubyte{suffix}"
                if xi.is_file() and yi.is_file():
                    return read_idx(xi).unsqueeze(1).contiguous(), read_idx(yi).long()
    return None


@functools.lru_cache(maxsize=4)
def load_other_dataset(in_dist: str, data_dir: str | None,
                       shape: tuple[int, ...]) -> tuple[str, torch.Tensor | None, str]:
    """(name, uint8 test images or None, why not) of the natural OOD partner of `in_dist`, if on disk."""
    other = OTHER_DATASET.get(in_dist)
    if other is None:
        return "", None, f"no natural OOD dataset paired with {in_dist!r} (noise sets only)"
    try:
        if other == "mnist":
            found = _find_mnist_test(data_dir)
            if found is None:
                return other, None, ("MNIST not found locally (looked for t10k-images-idx3-ubyte[.gz] in --data-dir, "
                                     "--data-dir/MNIST/raw, ./data, /usr/share/datasets/mnist); skipped")
            x = found[0]
        else:
            x = load_dataset(other, data_dir, download=False).test_x
    except (FileNotFoundError, RuntimeError, OSError) as e:
        return other, None, f"{other} not available locally ({str(e).splitlines()[0]}); skipped"
    if tuple(x.shape[1:]) != tuple(shape):
        return other, None, f"{other} images are {tuple(x.shape[1:])}, the model's are {tuple(shape)}; skipped"
    return other, x, ""
