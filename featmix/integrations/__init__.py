"""Integrations of featmix with training frameworks, one module per framework.

- ``featmix.integrations.timm``: timm's ``train.py`` (a uint8 collate for the prefetcher path,
  ``cutmix_at_from_timm_args`` and a ``ClassificationTask`` that trains a ``CutMixAt``);
- ``featmix.integrations.torchvision``: a picklable collate for torchvision's reference scripts;
- ``featmix.integrations.lightning``: ``CutMixCallback`` for Lightning's ``Trainer``;
- ``featmix.integrations.transformers``: a Hugging Face ``Trainer`` with soft-target cross-entropy.

Each module imports its framework when it is imported, never before: ``import featmix`` and ``import
featmix.integrations`` need torch alone. ``soft_target_cross_entropy`` (here) is the loss they share.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["soft_target_cross_entropy", "SoftTargetCrossEntropy"]


def soft_target_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy against soft targets: ``-(targets * log_softmax(logits)).sum(-1)``, averaged over the batch.

    Args:
        logits: (B, num_classes) scores (any float dtype; the loss is computed in float32 or wider).
        targets: (B, num_classes) float targets (mixed, smoothed or one-hot), each row summing to 1.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one loss per sample).

    Returns:
        The loss: a scalar, or (B,) for ``reduction="none"``.

    Raises:
        TypeError: ``logits`` or ``targets`` is not a tensor, or ``targets`` is not floating point (class indices:
            use ``torch.nn.functional.cross_entropy``).
        ValueError: the shapes differ, are not (B, num_classes), or ``reduction`` is unknown.
    """
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"logits and targets must be tensors, got {type(logits).__name__} and "
                        f"{type(targets).__name__}")
    if not targets.is_floating_point():
        raise TypeError(f"targets must be float (B, num_classes) soft targets, got {targets.dtype} of shape "
                        f"{tuple(targets.shape)}: class indices take torch.nn.functional.cross_entropy")
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (B, num_classes); got logits {tuple(logits.shape)} and "
                         f"targets {tuple(targets.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = -(targets.to(dtype) * torch.log_softmax(logits.to(dtype), dim=-1)).sum(-1)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


class SoftTargetCrossEntropy(nn.Module):
    """``soft_target_cross_entropy`` as a module (a criterion for training loops that want one).

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Raises:
        ValueError: ``reduction`` is unknown.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return soft_target_cross_entropy(logits, targets, self.reduction)
