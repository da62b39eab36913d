"""Pure mixing kernels: no randomness, no state. The classes draw parameters and call these.

Layout: a tensor is mixed on two of its dimensions (``hdim``, ``wdim``); the batch is dimension 0.
Images and CNN feature maps are (B, C, H, W) with the box on dims (2, 3); token maps reshaped to
(B, H, W, C) use dims (1, 2).

Three implementations of the same operation ``out[i] = x[i] outside the box, x[perm[i]] inside``:
- ``paste_box``: out of place with no temporary: on GPUs each output element is written once (outside
  copied from ``x``, inside gathered from the partner); on CPU one contiguous copy then the box
  overwritten, which measured faster than the short side-band copies; differentiable through a custom autograd function whose backward
  is the same kernel with the inverse permutation. The fast eager path.
- ``paste_box_``: in place on the caller's tensor (input-level CutMix): only the box is touched.
- ``paste_box_masked``: the box as tensors and a mask, so ``torch.compile`` sees no Python integers
  that change every batch (no recompiles) and can fuse the gather into one pass.
All three give bitwise-equal results for the same box and permutation.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .validation import check_writable

Box = Tuple[int, int, int, int]


def _index(ndim: int, hdim: int, wdim: int, ys: slice, xs: slice) -> tuple:
    idx = [slice(None)] * ndim
    idx[hdim], idx[wdim] = ys, xs
    return tuple(idx)


def _norm_dims(x: Tensor, hdim: int, wdim: int) -> Tuple[int, int]:
    return hdim % x.dim(), wdim % x.dim()


# at::internal::GRAIN_SIZE. ATen's CPU index_select on a strided view copies slice by slice once a
# slice has this many elements (below it, one parallel gather over the batch); paste_box_ switches
# to its own sample-by-sample cycle walk at the same size (measured: below it the gather is faster).
_CPU_GRAIN = 32768


def _walk_on_cpu(x: Tensor, box: Box, hdim: int, wdim: int) -> bool:
    """Whether the box is permuted by the cycle walk: a CPU tensor whose box holds at least
    ``_CPU_GRAIN`` elements per sample (below that one gather over the batch is faster)."""
    y1, y2, x1, x2 = box
    per_sample_box = x.numel() // max(x.shape[0] * x.shape[hdim] * x.shape[wdim], 1) * (y2 - y1) * (x2 - x1)
    return x.device.type == "cpu" and per_sample_box >= _CPU_GRAIN


def _write_mixed(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int,
                 perm: Optional[Tensor] = None) -> None:
    """Write the mixed ``x`` into the (uninitialised) ``out``, choosing the fastest layout.

    GPU, or a box spanning whole rows (no side bands): ``_write_once``, every element written once in
    long runs (memory traffic is what counts there). CPU otherwise: one contiguous copy, then the box
    rewritten; large per-sample boxes by walking the permutation's cycles inside ``out``
    (``_write_copy_then_walk``), small ones by one gather (``_write_copy_then_box``).
    """
    y1, y2, x1, x2 = box
    if x.device.type == "cpu" and (x1 > 0 or x2 < x.shape[wdim]):
        if _walk_on_cpu(x, box, hdim, wdim):
            _write_copy_then_walk(out, x, inv_perm, box, hdim, wdim, perm)
        else:
            _write_copy_then_box(out, x, inv_perm, box, hdim, wdim)
    else:
        _write_once(out, x, inv_perm, box, hdim, wdim)


def _write_once(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """Every element of ``out`` written exactly once: four bands around the box, then the box."""
    y1, y2, x1, x2 = box
    n = x.dim()
    H, W = x.shape[hdim], x.shape[wdim]
    # Outside the box: two full-width bands, then the two sides of the box rows.
    for (ya, yb), (xa, xb) in (((0, y1), (0, W)), ((y2, H), (0, W)), ((y1, y2), (0, x1)), ((y1, y2), (x2, W))):
        if yb > ya and xb > xa:
            idx = _index(n, hdim, wdim, slice(ya, yb), slice(xa, xb))
            out[idx].copy_(x[idx])
    _write_box(out, x, inv_perm, box, hdim, wdim)


def _write_copy_then_box(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    """One full ``copy_`` of ``x`` (long contiguous runs), then the box overwritten.

    Writes the box twice, yet on CPU it beats ``_write_once``, whose side bands are rows of only
    ``x1`` and ``W - x2`` elements: per element they cost more than the second write of the box
    (``python -m experiments.bench_mixing``, (128,64,56,56) fp32 on 2 shared cores: ~1.7x a clone
    for the once-only version, ~1.3x for this one).
    """
    out.copy_(x)
    _write_box(out, x, inv_perm, box, hdim, wdim)


def _write_copy_then_walk(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int,
                          perm: Optional[Tensor] = None) -> None:
    """One full ``copy_`` of ``x``, then the box permuted in place inside ``out`` (cycle walk).

    The box is short strided rows; ATen's gather over them costs more than the full contiguous copy
    on CPU, while the cycle walk reads each box row once and writes it while still in cache
    (``bench_mixing``, (128,64,56,56) fp32 on 2 idle cores: 1.24-1.25x a clone, against 1.30-1.38x with
    the gather).
    """
    if perm is None:
        perm = inverse_permutation(inv_perm)
    out.copy_(x)
    y1, y2, x1, x2 = box
    _permute_cycles_(out[_index(x.dim(), hdim, wdim, slice(y1, y2), slice(x1, x2))], perm.tolist())


def _write_box(out: Tensor, x: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    # Inside the box: the partner's pixels. out[i] = x[perm[i]]  <=>  out[inv[j]] = x[j], which
    # index_copy_ does in one kernel between two strided views, with no temporary.
    y1, y2, x1, x2 = box
    inside = _index(x.dim(), hdim, wdim, slice(y1, y2), slice(x1, x2))
    out[inside].index_copy_(0, inv_perm, x[inside])


def _permute_cycles_(region: Tensor, perm: Sequence[int]) -> None:
    """In place ``region[i] = region[perm[i]]`` by walking the permutation's cycles, one sample at a time.

    Each sample's box is read once from memory and written once, and the write lands on lines the
    previous step just read (still in cache); only one sample's box is buffered per cycle. A
    gather-then-copy instead reads and writes the box twice through a batch-sized temporary, and
    timm's Mixup copies the whole batch. Each per-sample copy is one ATen copy (parallel above the
    grain size). Measured on 2 idle cores, (64,3,224,224) fp32 box of half the image: 2.8 ms, against
    3.2 ms for a plain strided copy of the box and 5.6 ms for gather-then-copy.
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


def _empty_box(box: Box) -> bool:
    y1, y2, x1, x2 = box
    return y2 <= y1 or x2 <= x1


def _mix(x: Tensor, perm: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> Tensor:
    out = torch.empty_like(x)
    _write_mixed(out, x, inv_perm, box, hdim, wdim, perm)
    return out


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


class _PasteBox(torch.autograd.Function):
    """Out-of-place paste whose backward is the same paste of the gradient with the inverse perm."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> Tensor:
        ctx.save_for_backward(perm, inv_perm)
        ctx.box, ctx.hdim, ctx.wdim = box, hdim, wdim
        return _mix(x, perm, inv_perm, box, hdim, wdim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        perm, inv_perm = ctx.saved_tensors
        # The gradient is mixed with the inverse permutation, whose inverse is perm itself.
        return _mix(grad, inv_perm, perm, ctx.box, ctx.hdim, ctx.wdim), None, None, None, None, None


def paste_box(x: Tensor, perm: Tensor, box: Box, hdim: int = -2, wdim: int = -1,
              inv_perm: Optional[Tensor] = None) -> Tensor:
    """Return a new tensor: ``x`` with the box ``(y1, y2, x1, x2)`` taken from ``x[perm]``.

    Differentiable with respect to ``x`` (the gradient reaches both partners); never modifies ``x``,
    so it is safe after an in-place ReLU. An empty box returns ``x`` itself. ``inv_perm`` (the
    inverse permutation) may be passed when the caller already has it.
    """
    hdim, wdim = _norm_dims(x, hdim, wdim)
    if _empty_box(box):
        return x
    if inv_perm is None:
        inv_perm = inverse_permutation(perm)
    perm = perm.to(x.device, non_blocking=True)
    inv_perm = inv_perm.to(x.device, non_blocking=True)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PasteBox.apply(x, perm, inv_perm, tuple(box), hdim, wdim)
    return _mix(x, perm, inv_perm, box, hdim, wdim)


def paste_box_(x: Tensor, perm: Tensor, box: Box, hdim: int = -2, wdim: int = -1) -> Tensor:
    """In place: overwrite the box of every sample of ``x`` with its partner's box. Returns ``x``.

    Only the box region is read and written. On a tensor that requires grad (not a leaf) the paste is
    recorded by autograd (the gradient reaches both partners); a leaf that requires grad, or an
    expanded tensor (several elements share memory), is a ``ValueError`` whatever the box.
    """
    hdim, wdim = _norm_dims(x, hdim, wdim)
    check_writable(x, "x")
    if _empty_box(box):
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _PasteBoxInPlace.apply(x, perm, inverse_permutation(perm), tuple(box), hdim, wdim)
    _paste_inplace(x, perm, box, hdim, wdim)
    return x


def _paste_inplace(x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> None:
    y1, y2, x1, x2 = box
    region = x[_index(x.dim(), hdim, wdim, slice(y1, y2), slice(x1, x2))]
    if _walk_on_cpu(x, box, hdim, wdim):
        # Large boxes: cycle walk (ATen's index_select on a strided view would also copy sample by
        # sample, into a temporary, and then everything is copied back).
        _permute_cycles_(region, perm.tolist())
    else:
        # Small boxes (one parallel gather over the batch) and GPUs (one kernel): gather, copy back.
        region.copy_(region.index_select(0, perm.to(x.device, non_blocking=True)))


class _PasteBoxInPlace(torch.autograd.Function):
    """In-place paste recorded by autograd; its backward is the out-of-place paste with the inverse perm."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv_perm: Tensor, box: Box, hdim: int, wdim: int) -> Tensor:
        _paste_inplace(x, perm, box, hdim, wdim)
        ctx.mark_dirty(x)
        ctx.save_for_backward(perm, inv_perm)
        ctx.box, ctx.hdim, ctx.wdim = box, hdim, wdim
        return x

    backward = staticmethod(_PasteBox.backward)


def paste_box_masked(x: Tensor, perm: Tensor, box: Tensor, hdim: int = -2, wdim: int = -1) -> Tensor:
    """Out-of-place paste with the box as a tensor: ``where(mask, x[perm], x)``.

    Shapes are static and values live in tensors, so ``torch.compile`` builds one graph for every
    batch; the compiler fuses the gather and the select into one pass over memory. The gather is
    ``x[perm]`` rather than ``index_select``: where nothing fuses it (eager, ``aot_eager``) ATen's CPU
    index_select copies sample by sample, one parallel region each, which on an oversubscribed CPU
    took 8-25x longer than the one-pass indexing kernel (on a quiet one it is ~25% faster).
    """
    hdim, wdim = _norm_dims(x, hdim, wdim)
    H, W = x.shape[hdim], x.shape[wdim]
    ys = torch.arange(H, device=x.device)
    xs = torch.arange(W, device=x.device)
    box = box.to(x.device)
    my = (ys >= box[0]) & (ys < box[1])
    mx = (xs >= box[2]) & (xs < box[3])
    shape_y = [1] * x.dim()
    shape_y[hdim] = H
    shape_x = [1] * x.dim()
    shape_x[wdim] = W
    mask = my.view(shape_y) & mx.view(shape_x)
    return torch.where(mask, x[perm.to(x.device)], x)


def one_hot_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Class indices (B,) or soft targets (B, K) -> float (B, K) with label smoothing applied.

    Smoothing follows timm/torch: ``(1 - eps) * y + eps / K``.
    """
    if labels.dim() == 1:
        y = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
        y.scatter_(1, labels.long().unsqueeze(1), 1.0)
    else:
        y = labels.to(dtype)
    if smoothing > 0:
        y = y * (1.0 - smoothing) + smoothing / num_classes
    return y


def mix_targets(targets: Tensor, perm: Tensor, weight) -> Tensor:
    """``weight * y + (1 - weight) * y[perm]``; ``weight`` a float or a 0-d tensor (no host sync)."""
    partner = targets.index_select(0, perm.to(targets.device, non_blocking=True))
    if isinstance(weight, Tensor):
        weight = weight.to(device=targets.device, dtype=targets.dtype)
    return partner.lerp(targets, weight) if isinstance(weight, Tensor) else partner.lerp(targets, float(weight))


__all__ = ["inverse_permutation", "paste_box", "paste_box_", "paste_box_masked", "one_hot_targets", "mix_targets"]

