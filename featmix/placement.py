"""The geometry of a draw on a grid: the reference code's box rules and the label-weight variants.

Each rule is written twice, side by side: on Python numbers (the eager path of a whole-batch draw:
the box is known on the host, so pasting needs no device round trip) and on tensors (compiled graphs,
where values live in tensors so no batch recompiles, and per-sample draws, one column per sample).
Both do the same float64 arithmetic with the reference code's truncation and clipping, so they give
the same box. Which rule a kind uses, and what it does with the box, is in ``featmix.kinds``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

Box = Tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open, on one grid
Number = Union[float, Tensor]

# rows of the float64 parameter vector (one column per sample for per-sample draws)
LAM, CY, CX, CUT_H, CUT_W, IS_CUT = range(6)
NUM_PARAMS = 6


@dataclass(frozen=True)
class Rule:
    """The fixed part of a draw's placement (the sampler's settings)."""

    kind: str = "cutmix"              # cutmix, mixup or cutout (the CutMix-or-Mixup switch already resolved)
    correct_lam: bool = True          # CutMix label weight = area kept (True) or the drawn lam
    minmax: Optional[Tuple[float, float]] = None  # CutMix box side uniform in this range of each side


class Placement(NamedTuple):
    """A draw placed on an h x w grid (immutable; a named tuple: it is made once per mixed batch).

    ``box``: (y1, y2, x1, x2) ints, an int64 tensor (4,) or (4, B), or None (Mixup). ``lam`` is the
    weight of each sample's own image (``1 - pasted area / grid area``, Mixup's lam); ``weight`` is
    the weight its own label gets in the targets. ``is_cut`` (per-sample CutMix-or-Mixup only) says
    which samples got a box. On the tensor path ``lam``/``weight`` are float64 tensors.

    Example:
        >>> where = featmix.place(0.5, (0.5, 0.5), 4, 4)
        >>> where.grid, where.box, where.lam, where.weight
        ((4, 4), (1, 3, 1, 3), 0.75, 0.75)
    """

    grid: Tuple[int, int]
    kind: str
    box: Union[Box, Tensor, None]
    lam: Number
    weight: Number
    is_cut: Optional[Tensor] = None


def record_box(box: Union[Box, Tensor, None]) -> Union[Box, Tensor, None]:
    """The box as records show it: per-sample boxes as (B, 4) rows of (y1, y2, x1, x2)."""
    return box.t() if isinstance(box, Tensor) and box.dim() == 2 else box


def label_weight(lam: Number, variant: str) -> Number:
    """The label weight of the sample's own image for a variant (Table 8), on floats or tensors."""
    if variant == "one_hot":  # the image covering the larger area takes the whole label
        return (lam >= 0.5).to(torch.float64) if isinstance(lam, Tensor) else float(lam >= 0.5)
    if variant == "complete_label":
        return torch.full_like(lam, 0.5) if isinstance(lam, Tensor) else 0.5
    return lam


def box_on_grid(lam: float, center: Tuple[float, float], h: int, w: int, variant: str = "cutmix") -> Box:
    """Reference rule: cut = int(side * sqrt(1 - lam)), integer centre, half-sides cut // 2, clipped.

    ``fixed_size`` keeps the half-side box wholly inside the grid (the paper's 16 x 16 on 32 x 32), its
    centre fraction placing the top-left corner.

    Args:
        lam: the drawn lam.
        center: fractions in [0, 1) of each side.
        h: the grid's height.
        w: the grid's width.
        variant: ``"fixed_size"`` or any other variant (the reference rule).

    Returns:
        (y1, y2, x1, x2), half-open on the grid; possibly empty (lam near 1, or a side of 1 or 2).

    Example:
        >>> featmix.box_on_grid(0.75, (0.5, 0.5), 32, 32)
        (8, 24, 8, 24)
    """
    if variant == "fixed_size":
        return inside_box((0.5, 0.5), center, h, w)
    rat = math.sqrt(1.0 - lam)
    return centred_box(int(h * rat), int(w * rat), center, h, w)


def centred_box(cut_h: int, cut_w: int, center: Tuple[float, float], h: int, w: int) -> Box:
    """A cut_h x cut_w box around an integer centre uniform on the grid, clipped at the border."""
    cy, cx = min(int(center[0] * h), h - 1), min(int(center[1] * w), w - 1)
    return max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)


def inside_box(size: Tuple[float, float], corner: Tuple[float, float], h: int, w: int) -> Box:
    """A box of ``int(side * size)`` placed wholly inside the grid; ``corner`` fractions pick the top-left."""
    cut_h, cut_w = int(h * size[0]), int(w * size[1])
    y1 = min(int(corner[0] * (h - cut_h + 1)), h - cut_h)
    x1 = min(int(corner[1] * (w - cut_w + 1)), w - cut_w)
    return y1, y1 + cut_h, x1, x1 + cut_w


def minmax_fraction(u: float, side: int, minmax: Tuple[float, float]) -> float:
    """timm's ``cutmix_minmax``: a side uniform over the integers [int(side * lo), int(side * hi))."""
    lo, hi = int(side * minmax[0]), int(side * minmax[1])
    return (lo + min(int(u * (hi - lo)), hi - lo - 1)) / side if hi > lo else lo / side


# -- the tensor twin ------------------------------------------------------------------------------

def _centred_box_t(cut_h: Tensor, cut_w: Tensor, cy_f: Tensor, cx_f: Tensor, h: int, w: int) -> Tensor:
    cy = torch.clamp(torch.floor(cy_f * h), max=h - 1)
    cx = torch.clamp(torch.floor(cx_f * w), max=w - 1)
    hh, hw = torch.floor(cut_h / 2), torch.floor(cut_w / 2)
    return torch.stack([torch.clamp(cy - hh, min=0), torch.clamp(cy + hh, max=h),
                        torch.clamp(cx - hw, min=0), torch.clamp(cx + hw, max=w)]).long()


def _inside_box_t(cut_h: Tensor, cut_w: Tensor, uy: Tensor, ux: Tensor, h: int, w: int) -> Tensor:
    y1 = torch.minimum(torch.floor(uy * (h - cut_h + 1)), h - cut_h)
    x1 = torch.minimum(torch.floor(ux * (w - cut_w + 1)), w - cut_w)
    return torch.stack([y1, y1 + cut_h, x1, x1 + cut_w]).long()


def _minmax_t(u: Tensor, side: int, minmax: Tuple[float, float]) -> Tensor:
    lo, hi = int(side * minmax[0]), int(side * minmax[1])
    if hi <= lo:
        return torch.full_like(u, float(lo))
    return lo + torch.clamp(torch.floor(u * (hi - lo)), max=hi - lo - 1)


_SIDES: dict = {}  # (h, w, device, inference mode) -> the float64 constants of centred_box_tensor


def centred_box_tensor(params: Tensor, h: int, w: int) -> Tuple[Tensor, Tensor]:
    """``box_tensor``'s reference rule (cut = floor(side * sqrt(1 - lam)), integer centre, clipped) with
    all four edges in one (2, 2, B) op each, and the kept fraction ``1 - area / (h * w)`` (float64).

    The half-sides are ``trunc(sqrt(1 - lam) * (-side / 2, side / 2))``: halving is exact in floating
    point, so ``floor(side * r / 2) == floor(floor(side * r) / 2)`` and the values are those of
    ``_centred_box_t`` and ``_kept`` bit for bit. Eager only (the constants are cached per grid and device).

    Args:
        params: float64 (6,) for a batch or (6, B), one column per sample (rows as ``LAM``, ``CY``, ``CX``).
        h: the grid's height.
        w: the grid's width.

    Returns:
        ``(box, kept)``: int64 (4,) or (4, B) rows (y1, y2, x1, x2), and float64 () or (B,).
    """
    key = (h, w, params.device, torch.is_inference_mode_enabled())
    consts = _SIDES.get(key)
    if consts is None:
        if len(_SIDES) > 64:
            _SIDES.clear()
        f64 = dict(dtype=torch.float64, device=params.device)
        side = torch.tensor([float(h), float(w)], **f64).view(2, 1, 1)
        half = torch.tensor([[-h / 2, h / 2], [-w / 2, w / 2]], **f64).view(2, 2, 1)
        consts = _SIDES[key] = (side, side - 1, half, torch.zeros((), **f64))
    side, last, half, zero = consts
    cols = params if params.dim() == 2 else params.view(-1, 1)
    edges = torch.rsub(cols[LAM], 1.0).sqrt_().mul(half).trunc_()          # (2, 2, B): -half, +half per side
    centre = cols[CY:CX + 1].unsqueeze(1).mul(side).floor_().clamp_(max=last)  # (2, 1, B): cy, cx
    edges = edges.add_(centre).clamp_(zero, side)                             # (2, 2, B): lo, hi per side
    lo, hi = edges.unbind(1)
    height, width = hi.sub(lo).unbind(0)
    kept = torch.rsub(height.mul_(width).div_(float(h * w)), 1.0)
    box = edges.view(4, -1).long()
    return (box, kept) if params.dim() == 2 else (box.view(4), kept.view(()))


def box_tensor(params: Tensor, h: int, w: int, variant: str = "cutmix", rule: Rule = Rule()) -> Tensor:
    """The box of ``place`` on tensors: ``params`` (6,) or (6, B) float64 -> int64 (4,) or (4, B)."""
    lam, cy, cx = params[LAM], params[CY], params[CX]
    if rule.kind == "cutout":  # rows CUT_H/CUT_W hold the box side as a fraction (0: no box)
        return _centred_box_t(torch.floor(h * params[CUT_H]), torch.floor(w * params[CUT_W]), cy, cx, h, w)
    if rule.minmax is not None:
        return _inside_box_t(_minmax_t(params[CUT_H], h, rule.minmax), _minmax_t(params[CUT_W], w, rule.minmax),
                             cy, cx, h, w)
    if variant == "fixed_size":
        return _inside_box_t(torch.full_like(lam, float(h // 2)), torch.full_like(lam, float(w // 2)), cy, cx, h, w)
    rat = torch.sqrt(1.0 - lam)
    return _centred_box_t(torch.floor(h * rat), torch.floor(w * rat), cy, cx, h, w)
