"""One class per kind of mix: where its draw lands on a grid, how it is pasted, what the labels become.

A kind is read, tested and added here alone. Each has two placements side by side (``place`` on Python
numbers for a whole-batch draw, box known on the host; ``place_tensor`` on tensors for compiled graphs
and per-sample draws), one ``paste`` (the kernels of ``featmix.functional``, whose autograd Functions
carry the gradient to both partners), and its label rule (``mix_targets``).

- ``CutMix``: the partner's box; label weight = the area kept (or the drawn lam with ``correct_lam=False``),
  then the variant's rule (Table 8);
- ``Mixup``: the whole map blended with weight lam, no box;
- ``Cutout``: a box of a fixed fraction of each side zeroed around a uniform centre, clipped at the
  border (DeVries & Taylor); labels unchanged, and no partner needed (a batch of one is cut);
- ``CutMixOrMixup``: per sample, CutMix or Mixup (the per-batch switch is resolved in the draw, to
  ``CutMix`` or ``Mixup``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import functional as F
from .kernels.graph import inside_mask
from .placement import (
    IS_CUT,
    LAM,
    Placement,
    Rule,
    box_on_grid,
    box_tensor,
    centred_box,
    centred_box_tensor,
    inside_box,
    label_weight,
    minmax_fraction,
)


class Kind:
    """The contract of a kind (see the module docstring)."""

    name = ""
    needs_partner = True     # a batch of one trains unmixed
    keeps_labels = False     # the targets are the (smoothed) labels
    blends_pixels = False    # mixes values, so images must be floating point

    def place(self, lam: float, center: Tuple[float, float], h: int, w: int, variant: str, rule: Rule,
              cut: Tuple[float, float]) -> Placement:
        """A whole-batch draw on an h x w grid (box as Python ints)."""
        raise NotImplementedError

    def place_tensor(self, params: Tensor, h: int, w: int, variant: str, rule: Rule) -> Placement:
        """The same on tensors: ``params`` (6,) for a batch or (6, B), one column per sample."""
        raise NotImplementedError

    def paste(self, x: Tensor, where: Placement, perm: Tensor, inv_perm: Optional[Tensor], hdim: int, wdim: int,
              inplace: bool = False) -> Tensor:
        """``x`` mixed as ``where`` says (a new tensor, or ``x`` itself with ``inplace``)."""
        raise NotImplementedError

    def mix_targets(self, targets: Tensor, perm: Tensor, where: Placement) -> Tensor:
        """The targets of what the network saw."""
        return targets if self.keeps_labels else F.blend(targets, perm, where.weight)  # = F.mix_targets


def _kept(box: Tensor, h: int, w: int) -> Tensor:
    return 1.0 - ((box[1] - box[0]) * (box[3] - box[2])).to(torch.float64) / float(h * w)


def _on_host(where: Placement) -> bool:
    return isinstance(where.box, tuple) or (where.box is None and not isinstance(where.lam, Tensor))


class CutMix(Kind):
    name = "cutmix"

    def place(self, lam, center, h, w, variant, rule, cut):
        if rule.minmax is not None:
            box = inside_box((minmax_fraction(cut[0], h, rule.minmax), minmax_fraction(cut[1], w, rule.minmax)),
                             center, h, w)
        else:
            box = box_on_grid(lam, center, h, w, variant)
        y1, y2, x1, x2 = box
        kept = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
        return Placement((h, w), self.name, box, kept, label_weight(kept if rule.correct_lam else lam, variant))

    def place_tensor(self, params, h, w, variant, rule):
        if rule.minmax is None and variant != "fixed_size" and not torch.compiler.is_compiling():
            # the paper's rule, both sides at once (fewer ops: the eager host's cost; a graph fuses either)
            box, kept = centred_box_tensor(params, h, w)
        else:
            box = box_tensor(params, h, w, variant, rule)
            kept = _kept(box, h, w)
        return Placement((h, w), self.name, box, kept,
                         label_weight(kept if rule.correct_lam else params[LAM], variant))

    def paste(self, x, where, perm, inv_perm, hdim, wdim, inplace=False):
        box = where.box
        if isinstance(box, tuple):  # placed on the host
            if inplace:
                return F._paste_checked_(x, perm, box, hdim, wdim)
            return F.paste_box(x, perm, box, hdim, wdim, inv_perm=inv_perm)
        out = F.paste_box_masked(x, perm, where.box, hdim, wdim, inv_perm=inv_perm)  # one gather each way
        return x.copy_(out) if inplace else out


class Mixup(Kind):
    name = "mixup"
    blends_pixels = True

    def place(self, lam, center, h, w, variant, rule, cut):
        return Placement((h, w), self.name, None, lam, label_weight(lam, variant))

    def place_tensor(self, params, h, w, variant, rule):
        lam = params[LAM]
        return Placement((h, w), self.name, None, lam, label_weight(lam, variant))

    def paste(self, x, where, perm, inv_perm, hdim, wdim, inplace=False):
        if inplace:
            return F.blend_(x, perm, where.lam)
        return F.blend(x, perm, where.lam)


class Cutout(Kind):
    name = "cutout"
    needs_partner = False
    keeps_labels = True

    def place(self, lam, center, h, w, variant, rule, cut):
        box = centred_box(int(h * cut[0]), int(w * cut[1]), center, h, w)
        y1, y2, x1, x2 = box
        return Placement((h, w), self.name, box, 1.0 - (y2 - y1) * (x2 - x1) / float(h * w), 1.0)

    def place_tensor(self, params, h, w, variant, rule):
        box = box_tensor(params, h, w, variant, rule)  # rows CUT_H/CUT_W: the side as a fraction (0: no box)
        kept = _kept(box, h, w)
        return Placement((h, w), self.name, box, kept, torch.ones_like(kept))

    def paste(self, x, where, perm, inv_perm, hdim, wdim, inplace=False):
        if _on_host(where):
            return F.erase_box_(x, where.box, hdim, wdim) if inplace else F.erase_box(x, where.box, hdim, wdim)
        out = F.paste_weighted(x, perm, ~inside_mask(x, where.box, hdim, wdim), zero_partner=True)
        return x.copy_(out) if inplace else out


class CutMixOrMixup(Kind):
    """Per sample (``mode="elem"``/``"pair"``): row ``IS_CUT`` of the draw chooses a box or a blend."""

    name = "cutmix_or_mixup"
    blends_pixels = True

    def place_tensor(self, params, h, w, variant, rule):
        box = box_tensor(params, h, w, variant, rule)
        lam, kept = params[LAM], _kept(box, h, w)
        weight = label_weight(kept if rule.correct_lam else lam, variant)
        is_cut = params[IS_CUT] > 0.5  # Mixup samples keep their drawn lam and weight
        return Placement((h, w), self.name, box, torch.where(is_cut, kept, lam),
                         torch.where(is_cut, weight, label_weight(lam, variant)), is_cut)

    def paste(self, x, where, perm, inv_perm, hdim, wdim, inplace=False):
        outside = ~inside_mask(x, where.box, hdim, wdim)
        shape = [-1] + [1] * (x.dim() - 1)
        lam = where.lam.to(x.device).view(shape)
        is_cut = where.is_cut.to(x.device).view(shape)
        out = F.paste_weighted(x, perm, torch.where(is_cut, outside.to(lam.dtype), lam))
        return x.copy_(out) if inplace else out


KINDS_BY_NAME: Dict[str, Kind] = {k.name: k for k in (CutMix(), Mixup(), Cutout(), CutMixOrMixup())}
KINDS = tuple(KINDS_BY_NAME)


def kind_of(name: str) -> Kind:
    """The kind named ``name`` (one of ``KINDS``)."""
    return KINDS_BY_NAME[name]


def place(lam: float, center: Tuple[float, float], h: int, w: int, variant: str = "cutmix", rule: Rule = Rule(),
          cut: Tuple[float, float] = (0.0, 0.0)) -> Placement:
    """The region, corrected lam and label weight of a whole-batch draw on an h x w grid.

    Args:
        lam: the drawn lam (Beta(alpha, alpha)), before the box correction.
        center: the box centre as fractions in [0, 1) of (height, width).
        h: the height of the grid the box is drawn on.
        w: its width.
        variant: the paper's Table 8 variant (box size and label rule).
        rule: the kind and its fixed settings (``correct_lam``, ``cutmix_minmax``).
        cut: Cutout's side fractions, or the two uniforms of ``rule.minmax``.

    Returns:
        A ``Placement``: the box (y1, y2, x1, x2) half-open on the grid (None for Mixup), ``lam`` = 1 - the
        pasted fraction, and the label weight.

    Example:
        >>> featmix.place(0.75, (0.5, 0.5), 8, 8).box  # a 4 x 4 box around the centre cell (4, 4)
        (2, 6, 2, 6)
    """
    return kind_of(rule.kind).place(lam, center, h, w, variant, rule, cut)


def place_tensor(params: Tensor, h: int, w: int, variant: str = "cutmix", rule: Rule = Rule(),
                 per_sample_kind: bool = False) -> Placement:
    """``place`` on tensors (no host sync); ``params`` (6,) for a batch or (6, B), one column per sample.

    ``per_sample_kind``: the CutMix-or-Mixup switch was drawn per sample (row ``IS_CUT``).
    """
    kind = kind_of("cutmix_or_mixup" if per_sample_kind else rule.kind)
    return kind.place_tensor(params, h, w, variant, rule)


def paste(x: Tensor, where: Placement, perm: Tensor, inv_perm: Optional[Tensor], hdim: int, wdim: int,
          inplace: bool = False) -> Tensor:
    """``x`` mixed as ``where`` says, by its kind (a new tensor, or ``x`` itself with ``inplace``)."""
    return kind_of(where.kind).paste(x, where, perm, inv_perm, hdim, wdim, inplace)


__all__ = ["Kind", "CutMix", "Mixup", "Cutout", "CutMixOrMixup", "KINDS", "kind_of", "place", "place_tensor",
           "paste"]
