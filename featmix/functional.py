"""The mixing kernels: pure functions, no randomness, no state (the contract; implementations per
device live in ``featmix.kernels``).

A tensor is mixed on two of its dimensions (``hdim``, ``wdim``); the batch is dimension 0. Images and
CNN feature maps are (B, C, H, W) with the box on dims (2, 3); token maps reshaped to (B, H, W, C)
use dims (1, 2). Every paste computes ``out[i] = x[i]`` outside the box and ``x[perm[i]]`` inside;
the three give bitwise-equal results for the same box and permutation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import kernels
from .kernels import graph, regions
from .validation import check_writable

Box = Tuple[int, int, int, int]


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i``.

    Args:
        perm: an int64 permutation (B,).

    Returns:
        Its inverse (B,).

    Example:
        >>> featmix.functional.inverse_permutation(torch.tensor([2, 0, 1])).tolist()
        [1, 2, 0]
    """
    return perm.argsort()


def paste_box(x: Tensor, perm: Tensor, box: Box, hdim: int = -2, wdim: int = -1,
              inv_perm: Optional[Tensor] = None) -> Tensor:
    """New tensor: ``x`` with the box ``(y1, y2, x1, x2)`` from ``x[perm]``; gradients reach both partners.

    Never modifies ``x`` (safe after an in-place ReLU); an empty box returns ``x`` itself.

    Args:
        x: the batch (batch on dim 0).
        perm: int64 (B,): sample ``i`` takes its box from sample ``perm[i]``.
        box: (y1, y2, x1, x2), half-open, on dims ``hdim`` and ``wdim``.
        hdim: the height dim.
        wdim: the width dim.
        inv_perm: the inverse permutation, when the caller already has it.

    Returns:
        The mixed tensor, in ``x``'s dtype and memory format.

    Example:
        >>> x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
        >>> featmix.functional.paste_box(x, torch.tensor([1, 0]), (0, 1, 0, 2))[0, 0].tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """
    hdim, wdim = hdim % x.dim(), wdim % x.dim()
    if _empty(box):
        return x
    perm = _on(perm, x)
    if inv_perm is not None:
        inv_perm = _on(inv_perm, x)
    elif x.device.type != "cpu":  # the CPU paste gathers by perm; its backward makes the inverse
        inv_perm = inverse_permutation(perm)
    if torch.is_grad_enabled() and x.requires_grad:
        return graph.run(_PasteBox, x, perm, inv_perm, tuple(box), hdim, wdim)
    return _mixed(x, perm, inv_perm, box, hdim, wdim)


def paste_box_(x: Tensor, perm: Tensor, box: Box, hdim: int = -2, wdim: int = -1) -> Tensor:
    """In place: the box of every sample of ``x`` overwritten by its partner's box; returns ``x``.

    Only the box is read and written. A non-leaf that requires grad is recorded by autograd.

    Args:
        x: the batch (batch on dim 0), written in place.
        perm: int64 (B,): sample ``i`` takes its box from sample ``perm[i]``.
        box: (y1, y2, x1, x2), half-open, on dims ``hdim`` and ``wdim``.
        hdim: the height dim.
        wdim: the width dim.

    Returns:
        ``x``.

    Raises:
        ValueError: ``x`` is a leaf that requires grad, or an expanded tensor (whatever the box).

    Example:
        >>> x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
        >>> featmix.functional.paste_box_(x, torch.tensor([1, 0]), (0, 2, 0, 1))[1, 0].tolist()
        [[0.0, 1.0], [0.0, 1.0]]
    """
    check_writable(x, "x")
    return _paste_checked_(x, perm, box, hdim % x.dim(), wdim % x.dim())


def _paste_checked_(x: Tensor, perm: Tensor, box: Box, hdim: int, wdim: int) -> Tensor:
    """``paste_box_`` once ``x`` is known to be writable (``CutMix`` checks before it draws)."""
    if _empty(box):
        return x
    perm, device = _on(perm, x), x.device
    if x.requires_grad and torch.is_grad_enabled():
        inv_perm = None if device.type == "cpu" else inverse_permutation(perm)  # the CPU backward makes it
        return graph.run(_PasteBoxInPlace, x, perm, inv_perm, tuple(box), hdim, wdim)
    kernels.for_device(device).paste_in_place(x, perm, box, hdim, wdim)
    return x


def paste_box_masked(x: Tensor, perm: Tensor, box: Tensor, hdim: int = -2, wdim: int = -1,
                     inv_perm: Optional[Tensor] = None) -> Tensor:
    """``paste_box`` with the box as an int64 tensor: no host values, so one compiled graph serves every
    batch; each element is read once forward and once backward.

    Args:
        x: the batch (batch on dim 0).
        perm: int64 (B,): sample ``i`` takes its box from sample ``perm[i]``.
        box: int64 (4,) = (y1, y2, x1, x2) for the batch, or (4, B), one box per sample.
        hdim: the height dim.
        wdim: the width dim.
        inv_perm: the inverse permutation, when the caller already has it.

    Returns:
        The mixed tensor; its gradient is the exact adjoint (per-sample boxes included).

    Example:
        >>> x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
        >>> box = torch.tensor([[0, 1, 0, 2], [1, 2, 0, 1]]).t()  # one box per sample
        >>> featmix.functional.paste_box_masked(x, torch.tensor([1, 0]), box)[:, 0].tolist()
        [[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]]
    """
    hdim, wdim = hdim % x.dim(), wdim % x.dim()
    device = x.device
    perm = perm if perm.device == device else perm.to(device)
    inv_perm = inv_perm if inv_perm is None or inv_perm.device == device else inv_perm.to(device)
    box = box if box.device == device else box.to(device)
    return graph.paste_masked(x, perm, inv_perm, box, hdim, wdim)  # the inverse is made there if needed


def erase_box(x: Tensor, box: Box, hdim: int = -2, wdim: int = -1) -> Tensor:
    """New tensor: ``x`` with the box zeroed in every sample (Cutout); differentiable.

    Args:
        x: the batch (batch on dim 0).
        box: (y1, y2, x1, x2), half-open, on dims ``hdim`` and ``wdim``.
        hdim: the height dim.
        wdim: the width dim.

    Returns:
        The erased tensor (``x`` itself for an empty box).

    Example:
        >>> int(featmix.functional.erase_box(torch.ones(1, 1, 4, 4), (0, 2, 0, 2)).sum())
        12
    """
    hdim, wdim = hdim % x.dim(), wdim % x.dim()
    if _empty(box):
        return x
    out = x.clone()
    if out.requires_grad:
        out[regions.box_index(x.dim(), hdim, wdim, box)] = 0
    else:
        regions.box_view(out, box, hdim, wdim).zero_()
    return out


def erase_box_(x: Tensor, box: Box, hdim: int = -2, wdim: int = -1) -> Tensor:
    """In place: the box of every sample of ``x`` zeroed; returns ``x``.

    Args:
        x: the batch, written in place.
        box: (y1, y2, x1, x2), half-open, on dims ``hdim`` and ``wdim``.
        hdim: the height dim.
        wdim: the width dim.

    Returns:
        ``x``.

    Raises:
        ValueError: ``x`` is a leaf that requires grad, or an expanded tensor.

    Example:
        >>> int(featmix.functional.erase_box_(torch.ones(1, 1, 4, 4), (0, 4, 0, 1)).sum())
        12
    """
    check_writable(x, "x")
    if _empty(box):
        return x
    hdim, wdim = hdim % x.dim(), wdim % x.dim()
    if x.requires_grad and torch.is_grad_enabled():
        x[regions.box_index(x.dim(), hdim, wdim, box)] = 0
    else:
        regions.box_view(x, box, hdim, wdim).zero_()
    return x


def blend(x: Tensor, perm: Tensor, lam: Union[float, Tensor]) -> Tensor:
    """New tensor: ``lam * x + (1 - lam) * x[perm]`` (Mixup) in ``x``'s memory format.

    Args:
        x: the batch (batch on dim 0).
        perm: int64 (B,): the partner of sample ``i`` is ``perm[i]``.
        lam: a float, or a tensor broadcastable per sample ((B,) is laid along the batch).

    Returns:
        The blended tensor; gradients reach both partners.

    Example:
        >>> x = torch.tensor([[0.0], [4.0]])
        >>> featmix.functional.blend(x, torch.tensor([1, 0]), 0.75).tolist()
        [[1.0], [3.0]]
    """
    return _partner(x, perm).lerp_(x, lam if type(lam) is float else _weight_like(lam, x))


def blend_(x: Tensor, perm: Tensor, lam: Union[float, Tensor]) -> Tensor:
    """In place: ``x = lam * x + (1 - lam) * x[perm]``; returns ``x``.

    Args:
        x: the batch, written in place.
        perm: int64 (B,): the partner of sample ``i`` is ``perm[i]``.
        lam: a float, or a tensor broadcastable per sample.

    Returns:
        ``x``.

    Raises:
        ValueError: ``x`` is a leaf that requires grad, or an expanded tensor.

    Example:
        >>> featmix.functional.blend_(torch.tensor([[0.0], [4.0]]), torch.tensor([1, 0]), 0.5).tolist()
        [[2.0], [2.0]]
    """
    check_writable(x, "x")
    return x.lerp_(_partner(x, perm), 1.0 - _weight_like(lam, x))


def paste_weighted(x: Tensor, perm: Tensor, own: Tensor, zero_partner: bool = False) -> Tensor:
    """New tensor: ``own * x + (1 - own) * x[perm]`` with a weight map ``own`` broadcastable to ``x``
    (per-sample boxes and lams).

    Args:
        x: the batch (batch on dim 0).
        perm: int64 (B,): the partner of sample ``i`` is ``perm[i]``.
        own: the weight of each element's own value, broadcastable to ``x``.
        zero_partner: ``own * x`` instead (Cutout: the partner is zero).

    Returns:
        The weighted tensor in ``x``'s memory format.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
        >>> featmix.functional.paste_weighted(x, torch.tensor([1, 0]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])).tolist()
        [[0.0, 2.0], [2.0, 2.0]]
    """
    own = own.to(x.dtype)
    if zero_partner:
        return x * own
    return _partner(x, perm).lerp_(x, own)


def _partner(x: Tensor, perm: Tensor) -> Tensor:
    """``x[perm]`` as a new tensor in ``x``'s memory format (``index_select`` returns a contiguous one).

    ``index_select`` (the fewest host steps) only for samples below ATen's grain: above it, on CPU, it
    copies sample by sample, one parallel region each, which stall when other processes keep the cores
    busy; advanced indexing is one kernel."""
    perm = _on(perm, x)
    if x.is_contiguous() and x.numel() < _GRAIN * max(x.shape[0], 1):
        return x.index_select(0, perm)
    return x[perm]


_GRAIN = 32768  # at::internal::GRAIN_SIZE


def _on(perm: Tensor, x: Tensor) -> Tensor:
    return perm if perm.device == x.device else perm.to(x.device, non_blocking=True)


def _weight_like(lam: Union[float, Tensor], x: Tensor) -> Union[float, Tensor]:
    if not isinstance(lam, Tensor):
        return float(lam)
    lam = lam.to(device=x.device, dtype=x.dtype)
    return lam.view([-1] + [1] * (x.dim() - 1)) if lam.dim() == 1 else lam


def one_hot_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Class indices (B,) or soft targets (B, K) -> float (B, K), smoothed as timm/torch do:
    ``(1 - eps) * y + eps / K``.

    Args:
        labels: class indices (B,) or soft/multi-hot targets (B, num_classes).
        num_classes: K.
        smoothing: eps.
        dtype: the targets' dtype.

    Returns:
        float (B, K) targets.

    Raises:
        IndexError: a class index outside [0, K) (a device-side assert on a GPU).

    Example:
        >>> featmix.functional.one_hot_targets(torch.tensor([1]), 4, smoothing=0.2).tolist()
        [[0.05000000074505806, 0.8500000238418579, 0.05000000074505806, 0.05000000074505806]]

    Class indices read their rows from a cached table of the smoothed one-hot rows (one op per call;
    the values are bit for bit those of a scatter then the smoothing); an index outside
    ``[0, num_classes)`` raises ``IndexError`` on the host (a device-side assert on a GPU).
    """
    if labels.dim() == 1:
        table = _one_hot_table(num_classes, smoothing, dtype, labels.device)
        if table is not None:
            index = labels if labels.dtype in (torch.int64, torch.int32) else labels.long()
            return table.index_select(0, index)
        y = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
        y.scatter_(1, labels.long().unsqueeze(1), 1.0)
    else:
        y = labels.to(dtype)
    if smoothing > 0:
        y = y * (1.0 - smoothing) + smoothing / num_classes
    return y


# (num_classes, smoothing, dtype, device) -> the K x K table of smoothed one-hot rows; small tables only
_TABLES: "OrderedDict[tuple, Tensor]" = OrderedDict()
_TABLE_MAX_CLASSES = 1024
_TABLES_KEPT = 8


def _one_hot_table(num_classes: int, smoothing: float, dtype: torch.dtype, device: torch.device
                   ) -> Optional[Tensor]:
    """The rows ``one_hot_targets`` returns for each class (built by the scatter path, so equal bit for bit),
    or None where a table would be large, or inside a compiled graph."""
    if num_classes > _TABLE_MAX_CLASSES or torch.compiler.is_compiling():
        return None
    key = (num_classes, smoothing, dtype, device, torch.is_inference_mode_enabled())
    table = _TABLES.get(key)
    if table is None:
        classes = torch.arange(num_classes, device=device)
        y = torch.zeros(num_classes, num_classes, dtype=dtype, device=device)
        y.scatter_(1, classes.unsqueeze(1), 1.0)
        table = _TABLES[key] = y * (1.0 - smoothing) + smoothing / num_classes if smoothing > 0 else y
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    return table


def mix_targets(targets: Tensor, perm: Tensor, weight: Union[float, Tensor]) -> Tensor:
    """``weight * y + (1 - weight) * y[perm]``.

    Args:
        targets: float (B, K) targets.
        perm: int64 (B,): the partner of sample ``i`` is ``perm[i]``.
        weight: the own label's weight: a float, a 0-d tensor or one per sample (B,).

    Returns:
        The mixed (B, K) targets.

    Example:
        >>> y = torch.eye(2)
        >>> featmix.functional.mix_targets(y, torch.tensor([1, 0]), 0.75).tolist()
        [[0.75, 0.25], [0.25, 0.75]]
    """
    return blend(targets, perm, weight)


def _empty(box: Box) -> bool:
    y1, y2, x1, x2 = box
    return y2 <= y1 or x2 <= x1


def _mixed(x: Tensor, perm: Tensor, inv_perm: Optional[Tensor], box: Box, hdim: int, wdim: int) -> Tensor:
    out = torch.empty_like(x)
    kernels.for_device(x.device).write_mixed(out, x, perm, inv_perm, box, hdim, wdim)
    return out


class _PasteBox(torch.autograd.Function):
    """Out-of-place paste whose backward is the same paste of the gradient with the inverse perm
    (``inv_perm`` may be None on CPU, whose paste reads only ``perm``: the backward then makes it)."""

    @staticmethod
    def forward(x: Tensor, perm: Tensor, inv_perm: Optional[Tensor], box: Box, hdim: int, wdim: int) -> Tensor:
        if torch.is_grad_enabled():  # under torch.func transforms: the kernels write into ``out=`` views
            with torch.no_grad():
                return _mixed(x, perm, inv_perm, box, hdim, wdim)
        return _mixed(x, perm, inv_perm, box, hdim, wdim)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, perm, inv_perm, ctx.box, ctx.hdim, ctx.wdim = inputs
        ctx.save_for_backward(perm, inv_perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        perm, inv_perm = ctx.saved_tensors
        if inv_perm is None:
            inv_perm = inverse_permutation(perm)
        # The gradient is mixed with the inverse permutation, whose inverse is perm itself (differentiable
        # again where the gradient requires grad: double backward, torch.func transforms).
        return paste_box(grad, inv_perm, ctx.box, ctx.hdim, ctx.wdim, inv_perm=perm), None, None, None, None, None


class _PasteBoxInPlace(torch.autograd.Function):
    """In-place paste recorded by autograd; its backward is the out-of-place paste with the inverse perm."""

    @staticmethod
    def forward(x: Tensor, perm: Tensor, inv_perm: Optional[Tensor], box: Box, hdim: int, wdim: int) -> Tensor:
        kernels.for_device(x.device).paste_in_place(x, perm, box, hdim, wdim)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, perm, inv_perm, ctx.box, ctx.hdim, ctx.wdim = inputs
        ctx.mark_dirty(x)
        ctx.save_for_backward(perm, inv_perm)

    backward = staticmethod(_PasteBox.backward)



__all__ = ["inverse_permutation", "paste_box", "paste_box_", "paste_box_masked", "erase_box", "erase_box_", "blend",
           "blend_", "paste_weighted", "one_hot_targets", "mix_targets"]
