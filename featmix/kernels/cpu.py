"""The paste on CPU: long contiguous copies and cache-friendly cycle walks.

On CPU a full contiguous copy costs less per element than short strided rows, so the out-of-place
paste copies ``x`` whole and then rewrites the box (by one gather for small boxes, by walking the
permutation's cycles inside the output for large ones), and the in-place paste walks the cycles.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .regions import Box, box_index, box_view, write_box, write_once

# at::internal::GRAIN_SIZE. ATen's CPU index_select on a strided view copies slice by slice once a
# slice has this many elements (below it, one parallel gather over the batch); the cycle walk takes
# over at the same size.
GRAIN = 32768


def walks(x: Tensor, box: Box, hdim: int, wdim: int) -> bool:
    """Whether the box is permuted by the cycle walk: at least ``GRAIN`` box elements per sample."""
    y1, y2, x1, x2 = box
    per_sample_box = x.numel() // max(x.shape[0] * x.shape[hdim] * x.shape[wdim], 1) * (y2 - y1) * (x2 - x1)
    return per_sample_box >= GRAIN


def write_mixed(out: Tensor, x: Tensor, perm: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Write ``x`` with the box from ``x[perm]`` into the uninitialised ``out``, by the fastest strategy."""
    if box[2] == 0 and box[3] == x.shape[wdim]:  # whole rows: no side bands, each element once
        write_once(out, x, inv_perm, box, hdim, wdim)
    elif walks(x, box, hdim, wdim):
        write_copy_then_walk(out, x, perm, box, hdim, wdim)
    else:
        write_copy_then_box(out, x, inv_perm, box, hdim, wdim)


def write_copy_then_box(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """One full copy of ``x`` (long contiguous runs), then the box overwritten by one gather."""
    out.copy_(x)
    write_box(out, x, inv_perm, box, hdim, wdim)


def write_copy_then_walk(out: Tensor, x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """One full copy of ``x``, then the box permuted in place inside ``out`` (cycle walk)."""
    out.copy_(x)
    permute_cycles_(out[box_index(x.dim(), hdim, wdim, box)], perm.tolist())


def paste_in_place(x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Overwrite ``x``'s box with the partner's: cycle walk for large boxes, one gather for small ones."""
    region = box_view(x, box, hdim, wdim)
    if walks(x, box, hdim, wdim):
        permute_cycles_(region, perm.tolist())
    else:
        region.copy_(region.index_select(0, perm))


def permute_cycles_(region: Tensor, perm: Sequence[int]) -> None:
    """In place ``region[i] = region[perm[i]]``, walking the permutation's cycles one sample at a time.

    Each sample's box is read once and written once, the write landing on lines the previous step
    just read; only one sample's box is buffered per cycle.
    """
    views = region.unbind(0)
    done = bytearray(len(perm))
    tmp: Optional[Tensor] = None
    for start in range(len(perm)):
        if done[start] or perm[start] == start:
            continue
        if tmp is None:
            tmp = torch.empty_like(views[0])
        tmp.copy_(views[start])
        i = start
        while True:
            done[i] = 1
            j = perm[i]
            if j == start:
                views[i].copy_(tmp)
                break
            views[i].copy_(views[j])
            i = j
