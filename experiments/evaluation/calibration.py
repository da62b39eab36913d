"""Calibration of the clean predictions: expected calibration error (Guo et al. 2017), NLL, mean confidence."""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from .base import Measurement, as_double, pct


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over equal-width confidence bins (k/n, (k+1)/n]: sum of |accuracy - confidence| weighted by bin share."""
    conf = as_double(confidence)
    acc = as_double(correct)
    if conf.numel() == 0:
        return math.nan
    b = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    s_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, conf)
    s_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, acc)
    return float((s_acc - s_conf).abs().sum() / conf.numel())


class Calibration(Measurement):
    """ECE (--ece-bins bins), NLL and mean confidence of the clean pass: no forward pass of its own."""

    name = "calibration"
    columns = {"ece": ("ECE", ("ece",))}
    line = ("Calibration: ECE ({bins} bins) {ece:.2f}%, NLL {nll:.4f}, mean confidence {mean_confidence:.2f}% "
            "(clean accuracy {clean_acc:.2f}%).")

    def steps(self) -> Iterator[Any]:
        """Nothing to iterate: everything comes from the clean pass."""
        return iter(())

    def num_steps(self) -> int:
        """0: no pass of its own."""
        return 0

    def accumulate(self, step: Any) -> None:
        """Never called (no steps)."""

    def report(self) -> dict[str, Any]:
        """{'ece', 'bins', 'nll', 'mean_confidence'} (ECE and confidence in %)."""
        clean, bins = self.ctx.clean, self.ctx.opts.ece_bins
        return {"ece": pct(expected_calibration_error(clean.conf, clean.correct, bins)), "bins": bins,
                "nll": clean.nll / self.ctx.num_test, "mean_confidence": pct(clean.conf.double().mean())}
