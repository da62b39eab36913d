"""The box region of a tensor: views of it, and the copies into it that both devices use."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

Box = Tuple[int, int, int, int]


def index(ndim: int, hdim: int, wdim: int, ys: slice, xs: slice) -> tuple:
    """An indexing tuple that slices ``ys`` on ``hdim`` and ``xs`` on ``wdim`` (everything else whole)."""
    idx = [slice(None)] * ndim
    idx[hdim], idx[wdim] = ys, xs
    return tuple(idx)


def box_index(ndim: int, hdim: int, wdim: int, box: Box) -> tuple:
    """The indexing tuple of the box (y1, y2, x1, x2)."""
    y1, y2, x1, x2 = box
    return index(ndim, hdim, wdim, slice(y1, y2), slice(x1, x2))


def box_view(x: Tensor, box: Box, hdim: int, wdim: int) -> Tensor:
    """The box of every sample of ``x`` as one view (a single ``as_strided``: one op, not a slice per dim).

    Meant for tensors autograd does not track (it would record a generic ``as_strided`` view).
    """
    size, stride, offset = box_geometry(x, box, hdim, wdim)
    return x.as_strided(size, stride, x.storage_offset() + offset)


def box_geometry(x: Tensor, box: Box, hdim: int, wdim: int) -> Tuple[List[int], Tuple[int, ...], int]:
    """(size, stride, offset from ``x``'s first element) of ``box_view(x, ...)``: the same view of any
    tensor with ``x``'s shape and strides."""
    y1, y2, x1, x2 = box
    size, stride = list(x.shape), x.stride()
    size[hdim], size[wdim] = y2 - y1, x2 - x1
    return size, stride, y1 * stride[hdim] + x1 * stride[wdim]


def write_box(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """``out``'s box = the partner's box: ``out[inv[j]] = x[j]`` in one kernel, with no temporary."""
    box_view(out, box, hdim, wdim).index_copy_(0, inv_perm, box_view(x, box, hdim, wdim))


def gather_box(out: Tensor, x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """``out``'s box = the partner's box: ``out[i] = x[perm[i]]`` by one ``index_select`` straight into ``out``."""
    torch.index_select(box_view(x, box, hdim, wdim), 0, perm, out=box_view(out, box, hdim, wdim))


def write_once(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Every element of ``out`` written exactly once: the bands around the box from ``x``, then the box."""
    copy_bands(out, x, box, hdim, wdim)
    write_box(out, x, inv_perm, box, hdim, wdim)


def copy_bands(out: Tensor, x: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """``out`` = ``x`` around the box (up to four bands; the box itself is not written)."""
    y1, y2, x1, x2 = box
    n = x.dim()
    H, W = x.shape[hdim], x.shape[wdim]
    for (ya, yb), (xa, xb) in (((0, y1), (0, W)), ((y2, H), (0, W)), ((y1, y2), (0, x1)), ((y1, y2), (x2, W))):
        if yb > ya and xb > xa:
            idx = index(n, hdim, wdim, slice(ya, yb), slice(xa, xb))
            out[idx].copy_(x[idx])
