"""FGSM robustness: top-1 accuracy on one-step FGSM images (Goodfellow et al. 2015), eps in pixel units."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Measurement, Normalize, TestBatch, pct


def fgsm(model: nn.Module, x_pix: torch.Tensor, y: torch.Tensor, eps: float, normalize: Normalize) -> torch.Tensor:
    """One FGSM step in pixel space: clip(x + eps * sign(d CE / d x), 0, 1), the gradient taken through `normalize`."""
    x = x_pix.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(normalize(x)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return (x_pix + eps * grad.sign()).clamp_(0.0, 1.0).detach()


class FGSM(Measurement):
    """Accuracy on FGSM images with eps = --epsilon / 255 (the model in eval mode)."""

    name = "fgsm"
    columns = {"fgsm_acc": ("FGSM acc", ("acc",))}
    line = "FGSM: eps = {epsilon_255:g}/255 in pixel space, one step, clipped to [0, 1]."

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.correct = 0

    def accumulate(self, batch: TestBatch) -> None:
        """Attack the batch (in chunks of `forward_batch` images), score the attacked images."""
        eps, step = self.ctx.opts.epsilon / 255.0, self.ctx.opts.forward_batch
        x_adv = torch.cat([fgsm(self.ctx.model, batch.x[s:s + step], batch.y[s:s + step], eps, self.ctx.normalize)
                           for s in range(0, batch.x.shape[0], step)])
        self.correct += int((self.ctx.predict(x_adv) == batch.y).sum())

    def report(self) -> dict[str, Any]:
        """{'epsilon_255', 'acc' (%)}."""
        return {"epsilon_255": self.ctx.opts.epsilon, "acc": pct(self.correct / self.ctx.num_test)}
