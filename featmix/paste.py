"""Apply a placement to a map: where a kind (CutMix, Mixup, Cutout; one box or one per sample)
becomes calls of the ``featmix.functional`` kernels. Used by the sites and by the input transforms."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as F
from .kernels.graph import inside_mask
from .placement import Placement


def paste(x: Tensor, where: Placement, perm: Tensor, inv_perm: Optional[Tensor], hdim: int, wdim: int,
          inplace: bool = False) -> Tensor:
    """``x`` mixed as ``where`` says (a new tensor, or ``x`` itself with ``inplace``)."""
    if isinstance(where.box, tuple) or (where.box is None and not isinstance(where.lam, Tensor)):
        return _paste_host(x, where, perm, inv_perm, hdim, wdim, inplace)
    out = _paste_tensor(x, where, perm, inv_perm, hdim, wdim)
    return x.copy_(out) if inplace else out


def _paste_host(x: Tensor, where: Placement, perm: Tensor, inv_perm: Optional[Tensor], hdim: int, wdim: int,
                inplace: bool) -> Tensor:
    """A whole-batch placement known on the host: the fast kernels, box as Python ints."""
    if where.kind == "mixup":
        return F.blend_(x, perm, where.lam) if inplace else F.blend(x, perm, where.lam)
    if where.kind == "cutout":
        return F.erase_box_(x, where.box, hdim, wdim) if inplace else F.erase_box(x, where.box, hdim, wdim)
    if inplace:
        return F._paste_checked_(x, perm, where.box, hdim, wdim)
    return F.paste_box(x, perm, where.box, hdim, wdim, inv_perm=inv_perm)


def _paste_tensor(x: Tensor, where: Placement, perm: Tensor, inv_perm: Optional[Tensor], hdim: int,
                  wdim: int) -> Tensor:
    """A placement in tensors (compiled graphs, per-sample draws): gathers and weight maps, no host values."""
    if where.kind == "cutmix":  # boxes only: one gather, each element read once
        return F.paste_box_masked(x, perm, where.box, hdim, wdim, inv_perm=inv_perm)
    if where.kind == "mixup":
        return F.blend(x, perm, where.lam)
    outside = ~inside_mask(x, where.box, hdim, wdim)
    if where.kind == "cutout":
        return F.paste_weighted(x, perm, outside, zero_partner=True)
    lam = where.lam.to(x.device).view([-1] + [1] * (x.dim() - 1))
    is_cut = where.is_cut.to(x.device).view([-1] + [1] * (x.dim() - 1))
    return F.paste_weighted(x, perm, torch.where(is_cut, outside.to(lam.dtype), lam))
