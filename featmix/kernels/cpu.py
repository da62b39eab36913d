"""The paste on CPU: long contiguous copies, and a fixed, small number of ops whatever the batch.

On CPU a full contiguous copy costs less per element than short strided rows, so the out-of-place
paste copies ``x`` whole and then rewrites the box by one ``index_copy_``; the in-place paste gathers
the box into a box-sized temporary and copies it back. Each paste is a few ATen ops, each one kernel
over all its elements, whatever the batch size: a walk of the permutation's cycles (one copy per
sample), or ``index_select`` on a view whose samples are large (it copies sample by sample), opens one
parallel region per sample, and when other processes keep the cores busy every region waits for a
descheduled worker thread.
"""
from __future__ import annotations

from torch import Tensor

from .regions import Box, box_view, write_box, write_once


def write_mixed(out: Tensor, x: Tensor, perm: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Write ``x`` with the box from ``x[perm]`` into the uninitialised ``out``, by the fastest strategy."""
    if box[2] == 0 and box[3] == x.shape[wdim]:  # whole rows: no side bands, each element once
        write_once(out, x, inv_perm, box, hdim, wdim)
    else:
        write_copy_then_box(out, x, inv_perm, box, hdim, wdim)


def write_copy_then_box(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """One full copy of ``x`` (long contiguous runs), then the box overwritten by one gather."""
    out.copy_(x)
    write_box(out, x, inv_perm, box, hdim, wdim)


def paste_in_place(x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Overwrite ``x``'s box with the partner's: one gather into a box-sized temporary, one copy back.

    Boxes of at least ``GRAIN`` elements per sample are gathered by advanced indexing (one kernel over
    all elements): ``index_select`` on a strided view copies such samples one by one, a parallel region
    each. Smaller ones by ``index_select`` (one parallel gather over the batch, faster there)."""
    region = box_view(x, box, hdim, wdim)
    region.copy_(region[perm] if region.numel() >= GRAIN * max(region.shape[0], 1) else region.index_select(0, perm))


# at::internal::GRAIN_SIZE: from this many elements per sample ATen's CPU index_select on a strided view
# copies sample by sample
GRAIN = 32768
