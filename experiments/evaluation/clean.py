"""The clean pass: every test image's prediction, confidence and loss, kept for the other measurements."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Measurement, TestBatch, pct


class Clean(Measurement):
    """Top-1 accuracy on the test set; fills `EvalContext.clean` (runs before every other measurement)."""

    name = "clean"
    columns = {"clean_acc": ("clean acc", ("clean_acc",))}

    def accumulate(self, batch: TestBatch) -> None:
        """Score one batch and keep its predictions, confidences and summed cross-entropy."""
        logits = self.ctx.logits(batch.x)
        with torch.no_grad():
            conf, pred = F.softmax(logits, 1).max(1)
            clean, i = self.ctx.clean, batch.idx
            clean.pred[i], clean.conf[i], clean.labels[i] = pred.cpu(), conf.cpu(), batch.y.cpu()
            clean.correct[i] = (pred == batch.y).cpu()
            clean.nll += float(F.cross_entropy(logits, batch.y, reduction="sum"))

    def report(self) -> dict[str, Any]:
        """{'clean_acc'} (%): at the top level of the report, not in a section."""
        return {"clean_acc": pct(self.ctx.clean.correct.double().mean())}
