"""Datasets for the studies.

Small datasets (Fashion-MNIST, CIFAR-10/100, a synthetic one for tests) are held whole as one uint8
tensor on the training device and augmented there in batches: on a CPU this removes the DataLoader
from the picture, and on a GPU it removes the host-to-device copy per batch. Every random choice
(order, crop offsets, flips) comes from a `torch.Generator` the caller seeds, so seed k of two settings
sees exactly the same images in the same order. ImageFolder data goes through a DataLoader.
"""
from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "synthetic")

# idx type code -> big-endian numpy dtype (the format of LeCun's MNIST files)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an idx file (gzip-compressed or not, detected from its magic bytes) into a tensor."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad header {raw[:4]!r})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but {len(raw) - offset} bytes follow")
    arr = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


class PixelNormalizer:
    """Pixels in [0, 1] -> the model's input: (x - mean) / std per channel, on x's device (tensors cached)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float pixels -> normalised (B, C, H, W)."""
        if x.device not in self._on_device:
            self._on_device[x.device] = (torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1),
                                         torch.tensor(self.std, device=x.device).view(1, -1, 1, 1))
        mean, std = self._on_device[x.device]
        return (x - mean) / std


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, Path] | None:
    """Locate the four Fashion-MNIST idx files: `data_dir` (flat, or torchvision's layout), then Debian's."""
    candidates: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir)
        candidates += [d, d / "FashionMNIST" / "raw", d / "fashion-mnist"]
    candidates.append(DEBIAN_FASHION_MNIST)
    for d in candidates:
        found = {k: _find_file(d, stem) for k, stem in FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _missing_dataset_error(name: str, data_dir: str | None) -> FileNotFoundError:
    """Two lines: where the data was looked for, and the ways to provide it."""
    fashion = name == "fashion-mnist"
    if data_dir:
        where = f"in --data-dir {data_dir}" + (f" nor in {DEBIAN_FASHION_MNIST}" if fashion else "")
    else:
        where = f"in {DEBIAN_FASHION_MNIST if fashion else './data'} (no --data-dir)"
    apt = "apt-get install -y dataset-fashion-mnist, " if fashion else ""
    return FileNotFoundError(f"--dataset {name}: not found {where}\n"
                             f"  provide it: {apt}--data-dir DIR holding the files, or --download (needs internet)")


@dataclass
class TensorData:
    """A whole dataset as uint8 tensors (N, C, H, W) plus what the model and evaluation need to know."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool = True
    normalizer: PixelNormalizer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.normalizer = PixelNormalizer(self.mean, self.std)

    @property
    def in_chans(self) -> int:
        """Image channels."""
        return self.train_x.shape[1]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        """Training images."""
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        """Test images."""
        return self.test_x.shape[0]

    def to(self, device: torch.device | str) -> "TensorData":
        """Move the whole dataset to `device` once (a few tens of MB for these sets)."""
        for k in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def subset(self, n: int | None, generator: torch.Generator) -> "TensorData":
        """Keep a class-balanced subset of `n` training images (all of them if `n` is None)."""
        if n is not None and n < self.num_train:
            self._keep_train(balanced_subset(self.train_y, n, generator))
        return self

    def test_subset(self, n: int | None, generator: torch.Generator) -> "TensorData":
        """Keep a fixed class-balanced subset of `n` test images (all of them if `n` is None)."""
        if n is not None and n < self.num_test:
            self._keep_test(balanced_subset(self.test_y, n, generator))
        return self

    def _keep_train(self, idx: torch.Tensor) -> None:
        """Keep the training samples at `idx` (CPU indices); subclasses keep their own per-sample data."""
        idx = idx.to(self.train_x.device)
        self.train_x, self.train_y = self.train_x[idx], self.train_y[idx]

    def _keep_test(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.test_x.device)
        self.test_x, self.test_y = self.test_x[idx], self.test_y[idx]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] -> float normalised with the dataset's mean/std."""
        return self.normalizer(x.float().div_(255))

    def train_batches(self, batch_size: int, order_gen: torch.Generator, aug_gen: torch.Generator,
                      rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of augmented, normalised training batches (this rank's shard, `batch_size` per rank).

        All ranks draw the same permutation from `order_gen` (seeded alike) and take every
        world_size-th element, cut to a common length so every rank runs the same number of steps.
        """
        perm = torch.randperm(self.num_train, generator=order_gen)
        per_rank = self.num_train // world_size
        perm = perm[rank::world_size][:per_rank].to(self.train_x.device)
        for start in range(0, per_rank, batch_size):
            idx = perm[start:start + batch_size]
            x = random_crop_flip(self.train_x[idx], self.pad, aug_gen, flip=self.flip)
            yield self.normalize(x), self.train_y[idx]

    def test_batches(self, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of the test set, in order, normalised (no augmentation)."""
        idx = torch.arange(rank, self.num_test, world_size, device=self.test_x.device)
        for start in range(0, idx.numel(), batch_size):
            i = idx[start:start + batch_size]
            yield self.normalize(self.test_x[i]), self.test_y[i]


def balanced_subset(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `n` samples with (as nearly as possible) equal counts per class, in a random order."""
    labels = labels.cpu()
    classes = labels.unique()
    per_class = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for c, k in zip(classes.tolist(), per_class):
        pool = (labels == c).nonzero().flatten()
        if k > pool.numel():
            raise ValueError(f"subset of {n}: class {c} has only {pool.numel()} samples, {k} needed")
        chosen.append(pool[torch.randperm(pool.numel(), generator=generator)[:k]])
    idx = torch.cat(chosen)
    return idx[torch.randperm(idx.numel(), generator=generator)]


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad) + RandomHorizontalFlip on `x` (B, C, H, W), on x's device.

    Crop and flip are one gather: row index oy + i, column index ox + j (or ox + W-1-j when flipped)
    into the zero-padded batch. Offsets and flips are drawn on the CPU `generator` (a few hundred
    bytes per batch), so a seed gives the same augmentation on any device.
    """
    B, C, H, W = x.shape
    oy = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator)
    ar_h, ar_w = torch.arange(H), torch.arange(W)
    cols = ar_w.expand(B, W)
    if flip:
        flipped = torch.rand(B, 1, generator=generator) < 0.5
        cols = torch.where(flipped, W - 1 - ar_w, ar_w)
    rows, cols = (oy + ar_h).to(x.device), (ox + cols).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return xp[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) tensor, in [0, 1] units (float64, exact enough)."""
    xs = x.double().div(255).transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(xs.mean(1).tolist()), tuple(xs.std(1).tolist())


def load_fashion_mnist(data_dir: str | None = None, download: bool = False) -> TensorData:
    """Fashion-MNIST from Debian's package / `data_dir`, else torchvision's download when allowed."""
    files = find_fashion_mnist(data_dir)
    if files is None and download:
        from torchvision.datasets import FashionMNIST
        root = data_dir or "data"
        FashionMNIST(root, train=True, download=True)
        FashionMNIST(root, train=False, download=True)
        files = find_fashion_mnist(root)
    if files is None:
        raise _missing_dataset_error("fashion-mnist", data_dir)
    tx, ty = read_idx(files["train_images"]), read_idx(files["train_labels"])
    vx, vy = read_idx(files["test_images"]), read_idx(files["test_labels"])
    mean, std = channel_stats(tx.unsqueeze(1))
    return TensorData("fashion-mnist", tx.unsqueeze(1).contiguous(), ty.long(), vx.unsqueeze(1).contiguous(),
                      vy.long(), 10, mean, std, pad=2)


def load_cifar(name: str, data_dir: str | None = None, download: bool = False) -> TensorData:
    """CIFAR-10/100 through torchvision (its python-pickle format), as uint8 NCHW tensors."""
    from torchvision.datasets import CIFAR10, CIFAR100
    cls, k = (CIFAR10, 10) if name == "cifar10" else (CIFAR100, 100)
    root = data_dir or "data"
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise _missing_dataset_error(name, data_dir) from e

    def nchw(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    (tx, ty), (vx, vy) = nchw(train), nchw(test)
    mean, std = channel_stats(tx)
    return TensorData(name, tx, ty, vx, vy, k, mean, std, pad=4)


def make_synthetic(n_train: int = 64, n_test: int = 64, size: int = 16, num_classes: int = 4,
                   in_chans: int = 1, seed: int = 0) -> TensorData:
    """A tiny learnable dataset for tests: class c brightens one of `num_classes` horizontal bands."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        x = torch.randint(0, 100, (n, in_chans, size, size), generator=g)
        band = size // num_classes
        for c in range(num_classes):
            x[y == c, :, c * band:(c + 1) * band] += 120
        return x.clamp(0, 255).to(torch.uint8), y
    (tx, ty), (vx, vy) = make(n_train), make(n_test)
    mean, std = channel_stats(tx)
    return TensorData("synthetic", tx, ty, vx, vy, num_classes, mean, std, pad=2)


class FolderData:
    """An ImageFolder dataset (PATH/train and PATH/val or PATH/test) read through DataLoaders.

    Same batch interface as `TensorData`; images travel as uint8 and are normalised on the device.
    """

    def __init__(self, root: str, image_size: int = 224, workers: int = 4) -> None:
        from torchvision import datasets
        from torchvision import transforms as T
        root_p = Path(root)
        test_dir = next((root_p / d for d in ("val", "test") if (root_p / d).is_dir()), None)
        if not (root_p / "train").is_dir() or test_dir is None:
            raise FileNotFoundError(f"imagefolder:{root}: expected {root}/train and {root}/val (or /test), "
                                    "each with one sub-directory per class")
        self.name = f"imagefolder:{root}"
        self.train_set = datasets.ImageFolder(str(root_p / "train"), T.Compose([
            T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()]))
        self.test_set = datasets.ImageFolder(str(test_dir), T.Compose([
            T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), T.PILToTensor()]))
        self.num_classes = len(self.train_set.classes)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.normalizer = PixelNormalizer(self.mean, self.std)
        self.in_chans, self.input_size = 3, (3, image_size, image_size)
        self.workers = workers
        self.device = torch.device("cpu")

    @property
    def num_train(self) -> int:
        """Training images."""
        return len(self.train_set)

    @property
    def num_test(self) -> int:
        """Test images."""
        return len(self.test_set)

    def to(self, device: torch.device | str) -> "FolderData":
        """Batches will be moved to `device` (the images stay on disk)."""
        self.device = torch.device(device)
        return self

    def subset(self, n: int | None, generator: torch.Generator) -> "FolderData":
        """Keep a class-balanced subset of `n` training images (all of them if `n` is None)."""
        if n is not None and n < self.num_train:
            from torch.utils.data import Subset
            idx = balanced_subset(torch.tensor(self.train_set.targets), n, generator)
            self.train_set = Subset(self.train_set, idx.tolist())
        return self

    def test_subset(self, n: int | None, generator: torch.Generator) -> "FolderData":
        """Keep a fixed class-balanced subset of `n` test images, in folder order (all if `n` is None)."""
        if n is not None and n < self.num_test:
            from torch.utils.data import Subset
            idx = balanced_subset(torch.tensor(self.test_set.targets), n, generator)
            self.test_set = Subset(self.test_set, sorted(idx.tolist()))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] -> float normalised with ImageNet's mean/std."""
        return self.normalizer(x.float().div_(255))

    def _loader(self, ds, batch_size: int, sampler, generator=None):
        from torch.utils.data import DataLoader
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", drop_last=False, generator=generator,
                          persistent_workers=False)

    def train_batches(self, batch_size: int, order_gen: torch.Generator, aug_gen: torch.Generator,
                      rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch; order from `order_gen` (shared by ranks), worker augmentation seeds from `aug_gen`."""
        from torch.utils.data import DistributedSampler
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=order_gen))
        sampler = DistributedSampler(self.train_set, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        aug_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=aug_gen))
        worker_gen = torch.Generator().manual_seed(aug_seed)
        if self.workers == 0:  # transforms then run here, on the global RNG
            torch.manual_seed(aug_seed)
        for x, y in self._loader(self.train_set, batch_size, sampler, worker_gen):
            x = x.to(self.device, non_blocking=True)
            yield self.normalize(x), y.to(self.device, non_blocking=True)

    def test_batches(self, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of the test set, in order, normalised on the device."""
        from torch.utils.data import Subset
        shard = Subset(self.test_set, list(range(rank, self.num_test, world_size)))
        for x, y in self._loader(shard, batch_size, None):
            yield self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False,
                 image_size: int = 224, workers: int = 4) -> TensorData | FolderData:
    """Dispatch on the `--dataset` value; see `DATASETS`."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, download)
    if name == "synthetic":
        return make_synthetic()
    if name.startswith("imagefolder:"):
        return FolderData(name.split(":", 1)[1], image_size, workers)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
