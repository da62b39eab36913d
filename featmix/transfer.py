"""A batch's draw on the device: one small transfer into storage that is kept from step to step."""
from __future__ import annotations

import struct
from typing import Optional, Tuple

import torch
from torch import Tensor

from .sampling import MixDraw

Parts = Tuple[Tensor, Optional[Tensor], Optional[Tensor]]


def load_draw(buf: Optional[Tensor], draw: MixDraw, device: torch.device, inverse: bool = True,
              params: bool = True) -> Tensor:
    """``draw.packed(...)`` on ``device`` in one transfer, into ``buf`` when its size and device fit.

    Reusing ``buf`` keeps its storage (``data_ptr``) from step to step, as CUDA-graph replay needs; on
    CUDA the host side is pinned, so the copy is asynchronous. Read it back with ``unpack_draw``.
    """
    return stage_draw(buf, draw, device, inverse, params)[0]


def stage_draw(buf: Optional[Tensor], draw: MixDraw, device: torch.device, inverse: bool = True,
               params: bool = True) -> Tuple[Tensor, Parts]:
    """``load_draw``, and the host tensors it packed (``MixDraw.parts``): new per draw and never refilled,
    so on CPU they serve as the forward's own copy of the draw, with no second copy and no views."""
    parts = draw.parts(inverse, params)
    host = draw.pack(parts)
    # An inference tensor (made by a first call inside torch.inference_mode) cannot be written outside it.
    if (buf is None or buf.shape != host.shape or buf.device != device
            or (buf.is_inference() and not torch.is_inference_mode_enabled())):
        buf = torch.empty_like(host, device=device)
    if device.type == "cuda":
        host = host.pin_memory()
    return buf.copy_(host, non_blocking=True), parts


def write_params(slot: Optional[Tuple[Tensor, bytearray]], draw: MixDraw) -> Tuple[Tensor, bytearray]:
    """A whole-batch draw's params (``draw.params()``'s values) written into ``slot``, made when None: a
    float64 (6,) CPU tensor over a bytearray that each draw rewrites in Python (``struct.pack_into``), so no
    tensor is made per draw (between a model's ops, making one costs several microseconds). The tensor is
    refilled by the next draw: a reader that outlives the forward copies it."""
    if slot is None:
        data = bytearray(48)
        with torch.inference_mode(False):  # a plain tensor even when first made in inference mode
            slot = (torch.frombuffer(data, dtype=torch.float64), data)
    struct.pack_into("<6d", slot[1], 0, *draw.param_values())
    return slot


def unpack_draw(buf: Tensor, batch: int, inverse: bool = True, params: bool = True
                ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(perm, inverse perm, float64 params) views of a ``load_draw`` buffer (None for parts left out).

    Params come back as (6,) for a whole-batch draw and (6, B) for a per-sample one.
    """
    if not (inverse or params):
        return (buf if buf.shape[0] == batch else buf[:batch]), None, None
    inv = buf[batch:2 * batch] if inverse else None
    if not params:
        return buf[:batch], inv, None
    rest = buf[(2 if inverse else 1) * batch:].view(torch.float64)
    return buf[:batch], inv, rest if rest.numel() == 6 else rest.view(6, batch)
