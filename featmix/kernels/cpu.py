"""The paste on CPU: long contiguous copies, and a fixed, small number of ops whatever the batch.

On CPU a full contiguous copy costs less per element than short strided rows, so the out-of-place
paste copies ``x`` whole and then rewrites the box by one gather; the in-place paste gathers the box
into a box-sized temporary and copies it back. Each paste is a few ATen ops, each one kernel over all
its elements, whatever the batch size: a walk of the permutation's cycles (one copy per sample), or
``index_select`` on a view whose samples are large (it copies sample by sample), opens one parallel
region per sample, and when other processes keep the cores busy every region waits for a descheduled
worker thread.

Where a sample's box is large, the gather runs on a view whose first dim folds the batch into its
outermost other dim (the channels of a contiguous NCHW batch): ``index_select`` then copies rows of
the box in one parallel loop over (sample, channel) slices, faster than advanced indexing's
element-by-element kernel. Where no such fold exists (channels_last, tokens), advanced indexing.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .regions import Box, box_geometry, box_view, copy_bands, gather_box, write_box

# at::internal::GRAIN_SIZE: from this many elements per slice ATen's CPU index_select copies slice by
# slice, each copy a parallel region of its own; below it, one parallel loop over the slices
GRAIN = 32768
# up to this many elements an in-place paste gathers the whole batch, then copies the box out of it
# (the crossover measured in docs/benchmarks.md)
SMALL = 1 << 17


def write_mixed(out: Tensor, x: Tensor, perm: Tensor, inv_perm: Optional[Tensor], box: Box, hdim: int,
                wdim: int) -> None:
    """Write ``x`` with the box from ``x[perm]`` into the uninitialised ``out``, by the fastest strategy.

    The box is gathered by ``perm`` straight into ``out`` (on CPU faster than a scatter by the inverse
    into a strided box), except for large boxes that do not fold (``_folds``): there ``index_select``
    would copy sample by sample, and one scatter by the inverse (``inv_perm``, made here when None) is
    one kernel."""
    if box[2] == 0 and box[3] == x.shape[wdim]:  # whole rows: no side bands, each element once
        copy_bands(out, x, box, hdim, wdim)
    else:
        out.copy_(x)  # one full copy (long contiguous runs), then the box
    folds = _folds(x, box, hdim, wdim, out)
    if folds is not None:
        out_fold, x_fold, k = folds
        torch.index_select(x_fold, 0, fold_index(perm, k), out=out_fold)
    elif _box_numel(x, box, hdim, wdim) < GRAIN:
        gather_box(out, x, perm, box, hdim, wdim)
    else:
        write_box(out, x, perm.argsort() if inv_perm is None else inv_perm, box, hdim, wdim)


def _box_numel(x: Tensor, box: Box, hdim: int, wdim: int) -> int:
    """Elements of one sample's box."""
    cells = max(x.shape[0], 1) * x.shape[hdim] * x.shape[wdim]
    return x.numel() // cells * (box[1] - box[0]) * (box[3] - box[2])


def paste_in_place(x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Overwrite ``x``'s box with the partner's: one gather into a box-sized temporary, one copy back.

    Batches of at most ``SMALL`` elements gather the whole batch (contiguous rows: fewer, longer copies)
    and copy its box; boxes of fewer than ``GRAIN`` elements per sample are gathered by ``index_select``
    (one parallel gather over the batch); larger ones by ``index_select`` over the folded view where the batch folds
    (one parallel loop over its slices), else by advanced indexing (one kernel over all elements)."""
    if x.numel() <= SMALL:  # host-bound: a gather of the whole batch runs faster than one of the box's short rows
        gathered = x.index_select(0, perm)  # contiguous
        if x.is_contiguous():  # the same box view of both
            size, stride, offset = box_geometry(x, box, hdim, wdim)
            x.as_strided(size, stride, x.storage_offset() + offset).copy_(gathered.as_strided(size, stride, offset))
        else:
            box_view(x, box, hdim, wdim).copy_(box_view(gathered, box, hdim, wdim))
        return
    folds = _folds(x, box, hdim, wdim)
    if folds is not None:
        region, _, k = folds
        region.copy_(region.index_select(0, fold_index(perm, k)))
        return
    region = box_view(x, box, hdim, wdim)
    region.copy_(region[perm] if region.numel() >= GRAIN * max(region.shape[0], 1) else region.index_select(0, perm))


def fold_index(perm: Tensor, k: int) -> Tensor:
    """The rows of a folded view that ``perm`` selects: ``perm[i] * k + j`` for ``j < k``, sample-major."""
    return torch.arange(k, device=perm.device).add(perm.unsqueeze(1), alpha=k).view(-1)


def _folds(x: Tensor, box: Box, hdim: int, wdim: int, out: Optional[Tensor] = None
           ) -> Optional[Tuple[Tensor, Tensor, int]]:
    """The box of ``out`` (else ``x``) and of ``x`` as views of shape (B * k, ...): dim 0 folded with the
    outermost other dim of size k, for boxes of at least ``GRAIN`` elements per sample whose folded
    slices are under ``GRAIN``; None where that fold is not a view of both, or is not needed."""
    B = x.shape[0]
    per_sample = _box_numel(x, box, hdim, wdim)
    if B < 2 or per_sample < GRAIN:
        return None
    y1, y2, x1, x2 = box
    sizes = list(x.shape)
    sizes[hdim], sizes[wdim] = y2 - y1, x2 - x1
    xs = x.stride()
    d = max((i for i in range(1, x.dim()) if sizes[i] > 1), key=lambda i: xs[i], default=None)
    if d is None or per_sample // sizes[d] >= GRAIN:
        return None
    views = []
    for t in ((x,) if out is None else (out, x)):
        st = t.stride()
        if st[0] != sizes[d] * st[d]:
            return None
        rest = [i for i in range(1, t.dim()) if i != d]
        fold_sizes: List[int] = [B * sizes[d]] + [sizes[i] for i in rest]
        fold_strides: List[int] = [st[d]] + [st[i] for i in rest]
        views.append(t.as_strided(fold_sizes, fold_strides, t.storage_offset() + y1 * st[hdim] + x1 * st[wdim]))
    return views[0], views[-1], sizes[d]
