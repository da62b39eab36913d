"""Where one batch's draw lands on one grid: the box, the corrected lam and the label weight.

The rule is written once, in two forms side by side: ``place`` on Python numbers (the eager path:
the box is known on the host, so pasting needs no device round trip) and ``place_tensor`` on
tensors (the compiled path: values live in tensors, so no batch triggers a recompile). Both do the
same float64 arithmetic with the reference code's truncation and clipping, so they give the same box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple, Union

import torch
from torch import Tensor

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open, on one grid
Number = Union[float, Tensor]


@dataclass(frozen=True)
class Placement:
    """A draw placed on an h x w grid.

    ``lam`` is the weight of each sample's own image (``1 - pasted area / grid area``); ``weight``
    is the weight its own label gets in the targets (``lam``, or the variant's rule). On the tensor
    path ``box`` is an int64 (4,) tensor and ``lam``/``weight`` are float64 0-d tensors.
    """

    grid: Tuple[int, int]
    box: Union[Box, Tensor]
    lam: Number
    weight: Number


def label_weight(lam: Number, variant: str) -> Number:
    """The label weight of the sample's own image for a variant (Table 8), on floats or tensors."""
    if variant == "one_hot":  # the image covering the larger area takes the whole label
        return (lam >= 0.5).to(torch.float64) if isinstance(lam, Tensor) else float(lam >= 0.5)
    if variant == "complete_label":
        return torch.full_like(lam, 0.5) if isinstance(lam, Tensor) else 0.5
    return lam


def box_on_grid(lam: float, center: Tuple[float, float], h: int, w: int, variant: str = "cutmix") -> Box:
    """Reference rule: cut = int(side * sqrt(1 - lam)), integer centre, half-sides cut // 2, clipped.

    ``center`` holds fractions in [0, 1) of each side. ``fixed_size`` keeps the half-side box wholly
    inside the grid (the paper's 16 x 16 on 32 x 32), its centre fraction placing the top-left corner.
    """
    uy, ux = center
    if variant == "fixed_size":
        cut_h, cut_w = h // 2, w // 2
        y1 = min(int(uy * (h - cut_h + 1)), h - cut_h)
        x1 = min(int(ux * (w - cut_w + 1)), w - cut_w)
        return y1, y1 + cut_h, x1, x1 + cut_w
    rat = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * rat), int(w * rat)
    cy, cx = min(int(uy * h), h - 1), min(int(ux * w), w - 1)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return y1, y2, x1, x2


def place(lam: float, center: Tuple[float, float], h: int, w: int, variant: str = "cutmix") -> Placement:
    """The box on an h x w grid, the lam corrected to its area, and the variant's label weight."""
    box = box_on_grid(lam, center, h, w, variant)
    y1, y2, x1, x2 = box
    corrected = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    return Placement((h, w), box, corrected, label_weight(corrected, variant))


def box_tensor(params: Tensor, h: int, w: int, variant: str = "cutmix") -> Tensor:
    """``box_on_grid`` on tensors: ``params`` = float64 [lam, centre_y, centre_x] -> int64 (4,)."""
    lam, uy, ux = params[0], params[1], params[2]
    if variant == "fixed_size":
        ch, cw = h // 2, w // 2
        y1 = torch.clamp(torch.floor(uy * (h - ch + 1)), max=h - ch)
        x1 = torch.clamp(torch.floor(ux * (w - cw + 1)), max=w - cw)
        return torch.stack([y1, y1 + ch, x1, x1 + cw]).long()
    rat = torch.sqrt(1.0 - lam)
    cut_h, cut_w = torch.floor(h * rat), torch.floor(w * rat)
    cy = torch.clamp(torch.floor(uy * h), max=h - 1)
    cx = torch.clamp(torch.floor(ux * w), max=w - 1)
    hh, hw = torch.floor(cut_h / 2), torch.floor(cut_w / 2)
    y1, y2 = torch.clamp(cy - hh, min=0), torch.clamp(cy + hh, max=h)
    x1, x2 = torch.clamp(cx - hw, min=0), torch.clamp(cx + hw, max=w)
    return torch.stack([y1, y2, x1, x2]).long()


def place_tensor(params: Tensor, h: int, w: int, variant: str = "cutmix") -> Placement:
    """``place`` on tensors (no host sync): the same box, corrected lam and label weight."""
    box = box_tensor(params, h, w, variant)
    corrected = 1.0 - ((box[1] - box[0]) * (box[3] - box[2])).to(torch.float64) / float(h * w)
    return Placement((h, w), box, corrected, label_weight(corrected, variant))
