"""The paste on accelerators: one pass over memory (each element read once and written once)."""
from __future__ import annotations

from torch import Tensor

from .regions import Box, box_view, write_once


def write_mixed(out: Tensor, x: Tensor, perm: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Write ``x`` with the box from ``x[perm]`` into the uninitialised ``out``: bands, then one gather."""
    write_once(out, x, inv_perm, box, hdim, wdim)


def paste_in_place(x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Overwrite ``x``'s box with the partner's: one gather into a box-sized temporary, one copy back."""
    region = box_view(x, box, hdim, wdim)
    region.copy_(region.index_select(0, perm))
