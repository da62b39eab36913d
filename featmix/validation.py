"""Argument checks with errors that name the argument, what was expected and what came.

Numbers may be Python or NumPy scalars (anything registered as ``numbers.Real``/``numbers.Integral``),
never bools. Checks that would need the device to answer (label range on a GPU tensor) are done
only where the tensor lives on the host, so a CUDA training step never waits on a sync; on a GPU an
out-of-range label still fails loudly, through the device-side bounds check of the one-hot scatter.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor


class InputTypeError(TypeError, ValueError):
    """A batch input of the wrong type: a ``TypeError``, and a ``ValueError`` as torchvision raises for it."""


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(value: object, name: str, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False, meaning: str = "") -> float:
    """``value`` as a float in the interval between ``low`` and ``high`` (open ends as flagged)."""
    ok = _is_real(value) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        if math.isinf(high):
            span = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be a number {span}{what}, got {value!r}")
    return float(value)


def check_int(value: object, name: str, minimum: int, meaning: str = "") -> int:
    """``value`` as an int >= ``minimum`` (Python or NumPy integers; not bools, not floats)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be an int >= {minimum}{what}, got {value!r}")
    return int(value)


def check_num_classes(num_classes: object) -> int:
    return check_int(num_classes, "num_classes", 1)


def check_label_smoothing(value: object) -> float:
    return check_real(value, "label_smoothing", 0.0, 1.0, high_open=True,
                      meaning="mass spread uniformly over the classes before mixing")


def check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_images(images: object, name: str = "images", floating: bool = True, dims: Tuple[int, ...] = (4,),
                 why: str = "") -> Tensor:
    """A batch of images: a tensor with one of ``dims`` dimensions, floating point when ``floating``."""
    if not isinstance(images, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if floating and not images.is_floating_point():
        raise InputTypeError(f"{name} must be a floating-point tensor{why} (float32/float16/bfloat16/float64); got "
                             f"{images.dtype}: convert uint8 images with e.g. "
                             f"torchvision.transforms.v2.ToDtype(torch.float32, scale=True) first")
    if images.dim() not in dims:
        video = " (5 for video: B, T, C, H, W)" if 5 in dims else ""
        raise ValueError(f"{name} must have 4 dimensions (B, C, H, W){video}; got shape {tuple(images.shape)}")
    return images


def check_labels(labels: object, num_classes: int, batch_size: Optional[int], name: str = "labels",
                 check_range: bool = True) -> Tensor:
    """Class indices (B,) of an integer dtype in [0, num_classes), or soft targets (B, num_classes).

    ``check_range=False`` leaves the index range to the caller (``CutMix`` lets its one-hot scatter
    find a bad index and then calls ``check_label_range`` for the message: one op fewer per batch).
    """
    if not isinstance(labels, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor: class indices (B,) or targets (B, num_classes); "
                             f"got {type(labels).__name__}")
    if labels.dim() == 1:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputTypeError(f"{name} of shape (B,) must hold integer class indices (int64); got "
                                 f"{labels.dtype}")
        if check_range:
            check_label_range(labels, num_classes, name)
    elif labels.dim() == 2:
        if not labels.is_floating_point():
            if labels.shape[1] == 1 and num_classes != 1:
                raise ValueError(f"{name} of shape {tuple(labels.shape)} holds one class index per row: squeeze it "
                                 f"to shape (B,) with {name}.squeeze(1) (or pass float (B, {num_classes}) targets)")
            raise InputTypeError(f"{name} of shape (B, num_classes) must be a floating-point tensor of soft or "
                                 f"multi-hot targets; got {labels.dtype}")
        if labels.shape[1] != num_classes:
            raise ValueError(f"{name} of shape (B, K) must have K = num_classes = {num_classes}; got shape "
                             f"{tuple(labels.shape)}")
    else:
        raise ValueError(f"{name} must have shape (B,) (class indices) or (B, {num_classes}) (targets); got "
                         f"shape {tuple(labels.shape)}")
    if batch_size is not None and labels.shape[0] != batch_size:
        raise ValueError(f"{name} must have one entry per image: batch size {batch_size}, got "
                         f"{labels.shape[0]} labels")
    return labels


def check_label_range(labels: Tensor, num_classes: int, name: str = "labels") -> None:
    """Class indices in [0, num_classes): checked on host tensors only (no device sync)."""
    if labels.device.type == "cpu" and labels.dim() == 1 and labels.numel() > 0:
        lo_t, hi_t = labels.aminmax()
        lo, hi = int(lo_t), int(hi_t)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must be class indices in [0, {num_classes}) (num_classes="
                             f"{num_classes}); got values in [{lo}, {hi}]")


def check_writable(x: Tensor, name: str = "images") -> None:
    """``x`` can be mixed in place: no two elements share memory, and autograd allows the write."""
    # a contiguous tensor has no stride-0 dim of size > 1: the per-dim scan only for other layouts
    expanded = () if x.is_contiguous() else [d for d, (st, n) in enumerate(zip(x.stride(), x.shape))
                                             if st == 0 and n > 1]
    if expanded:
        raise ValueError(f"{name} is an expanded tensor (stride 0 on dim {expanded[0]}): several of its elements share "
                         f"one memory cell, so it cannot be mixed in place; pass {name}.contiguous(), or use "
                         f"inplace=False")
    if x.requires_grad and x.is_leaf and torch.is_grad_enabled():
        raise ValueError(f"{name} is a leaf tensor that requires grad: autograd forbids changing it in place; use "
                         f"inplace=False (the gradient then reaches both partners), or pass {name}.detach()")
