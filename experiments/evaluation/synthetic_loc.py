"""`synthetic-loc`: a small weakly-supervised localisation set the project generates itself.

The paper's localisation claim (CUB / ImageNet, CAM boxes, IoU >= 0.5) needs images with boxes; those
sets are not on this machine and cannot be downloaded here. This module draws a stand-in that
exercises the same metric end to end offline: each image is a textured background with one object
pasted at a known box, and the *class is the object's texture* (horizontal stripes, vertical stripes,
checkerboard, diagonal stripes, dots, ...), so a classifier has to look at the object to be right and
its CAM has something to find. Everything is drawn from a `torch.Generator` seeded by `seed`, so a
seed gives the same images and boxes on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data import TensorData, channel_stats

NAME = "synthetic-loc"
TEXTURES = ("hstripes", "vstripes", "checker", "diagonal", "dots", "antidiagonal")
MAX_CLASSES = len(TEXTURES)


def texture(kind: str, h: int, w: int, period: int, phase: int) -> torch.Tensor:
    """A binary (h, w) pattern of the class `kind` with the given period (pixels) and phase."""
    yy = torch.arange(h).view(h, 1) + phase
    xx = torch.arange(w).view(1, w) + phase
    half = max(period // 2, 1)
    if kind == "hstripes":
        t = (yy // half) % 2 == 0
        return t.expand(h, w)
    if kind == "vstripes":
        t = (xx // half) % 2 == 0
        return t.expand(h, w)
    if kind == "checker":
        return ((yy // half) + (xx // half)) % 2 == 0
    if kind == "diagonal":
        return ((yy + xx) // half) % 2 == 0
    if kind == "antidiagonal":
        return ((yy - xx) // half) % 2 == 0
    if kind == "dots":
        return ((yy % period) < half) & ((xx % period) < half)
    raise ValueError(f"unknown texture {kind!r}; choose one of {TEXTURES}")


def _background(n: int, in_chans: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Smooth, low-contrast clutter: coarse noise upsampled bilinearly plus fine noise, in [40, 170]."""
    coarse = torch.rand(n, in_chans, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    fine = torch.rand(n, in_chans, size, size, generator=g)
    return 40 + 90 * smooth + 40 * fine


def make_localization_set(n: int, size: int = 32, num_classes: int = 4, in_chans: int = 3,
                          seed: int = 0, min_frac: float = 0.35, max_frac: float = 0.6,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` images (uint8 (n, C, size, size)), labels (n,) and boxes (n, 4) as (x1, y1, x2, y2), x2/y2
    exclusive. Object sides are uniform in [min_frac, max_frac] x size; classes cycle 0..num_classes-1.

    The object is its class texture in two shades of a random colour (dark and bright), with contrast
    well above the background's, pasted over a box anywhere inside the image.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    x = _background(n, in_chans, size, g)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    boxes = torch.zeros(n, 4, dtype=torch.long)
    lo, hi = max(2, int(round(min_frac * size))), max(3, int(round(max_frac * size)))
    for i in range(n):
        bh, bw = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=g))
        y1 = int(torch.randint(0, size - bh + 1, (1,), generator=g))
        x1 = int(torch.randint(0, size - bw + 1, (1,), generator=g))
        period = int(torch.randint(4, 7, (1,), generator=g))
        phase = int(torch.randint(0, period, (1,), generator=g))
        pattern = texture(TEXTURES[int(y[i])], bh, bw, period, phase).float()
        colour = 0.5 + 0.5 * torch.rand(in_chans, 1, 1, generator=g)  # bright, per channel
        bright, dark = 255 * colour, 20 * torch.rand(in_chans, 1, 1, generator=g)
        x[i, :, y1:y1 + bh, x1:x1 + bw] = dark + (bright - dark) * pattern
        boxes[i] = torch.tensor([x1, y1, x1 + bw, y1 + bh])
    return x.round().clamp(0, 255).to(torch.uint8), y, boxes


@dataclass
class LocData(TensorData):
    """A `TensorData` whose images come with one ground-truth box each (kept on the CPU); subsets keep
    images, labels and boxes aligned."""

    train_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.long))
    test_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.long))

    def _keep_train(self, idx: torch.Tensor) -> None:
        self.train_boxes = self.train_boxes[idx]
        super()._keep_train(idx)

    def _keep_test(self, idx: torch.Tensor) -> None:
        self.test_boxes = self.test_boxes[idx]
        super()._keep_test(idx)


def load_synthetic_loc(n_train: int = 2000, n_test: int = 500, size: int = 32, num_classes: int = 4,
                       in_chans: int = 3, seed: int = 0) -> LocData:
    """The `synthetic-loc` dataset: train and test drawn from independent streams of one seed.

    Normalisation statistics come from the training images (from the test images when n_train is 0,
    as for evaluation only). Boxes are only used for evaluation, so training may flip freely; pad is 0
    (no random crop) so that a trained model sees objects where the test set puts them.
    """
    tx, ty, tb = make_localization_set(n_train, size, num_classes, in_chans, seed=2 * seed)
    vx, vy, vb = make_localization_set(n_test, size, num_classes, in_chans, seed=2 * seed + 1)
    mean, std = channel_stats(tx if n_train else vx)
    return LocData(NAME, tx, ty, vx, vy, num_classes, mean, std, pad=0, flip=True,
                   train_boxes=tb, test_boxes=vb)


__all__: Sequence[str] = ("NAME", "TEXTURES", "make_localization_set", "LocData", "load_synthetic_loc", "texture")
