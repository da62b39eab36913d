"""Out-of-distribution detection with the max-softmax score (Hendrycks & Gimpel 2017).

In-distribution: the test set (scores from the clean pass); out: uniform and Gaussian noise (ODIN's
definitions) and, where it is on disk, the dataset paired with the test set (MNIST for Fashion-MNIST,
CIFAR-100 for CIFAR-10 and back).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import results
from .base import EVAL_SEED, Measurement, as_double, pct
from .testsets import load_other_dataset, pixel_batches

NOISE_KINDS = ("uniform", "gaussian")
SCORES = ("auroc", "tnr_at_tpr95", "detection_acc")


def auroc(scores_in: torch.Tensor | Sequence[float], scores_out: torch.Tensor | Sequence[float]) -> float:
    """Area under the ROC curve, in-distribution positive: P(s_in > s_out) + 0.5 P(s_in == s_out), exact with ties."""
    si, so = as_double(scores_in), as_double(scores_out)
    if si.numel() == 0 or so.numel() == 0:
        raise ValueError("auroc needs at least one in- and one out-of-distribution score, got "
                         f"{si.numel()} and {so.numel()}")
    _, inv, counts = torch.unique(torch.cat([si, so]), return_inverse=True, return_counts=True)
    avg_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2  # average 1-based rank per value
    r_in = avg_rank[inv[: si.numel()]].sum()
    n1, n0 = si.numel(), so.numel()
    return float((r_in - n1 * (n1 + 1) / 2) / (n1 * n0))


def tnr_at_tpr(scores_in: torch.Tensor | Sequence[float], scores_out: torch.Tensor | Sequence[float],
               tpr: float = 0.95) -> float:
    """Fraction of OOD scores strictly below the ceil(tpr * n_in)-th largest in-distribution score."""
    si, so = as_double(scores_in), as_double(scores_out)
    k = max(1, math.ceil(tpr * si.numel() - 1e-9))
    t = torch.sort(si, descending=True).values[k - 1]
    return float((so < t).double().mean())


def detection_accuracy(scores_in: torch.Tensor | Sequence[float], scores_out: torch.Tensor | Sequence[float]) -> float:
    """max over thresholds t (every observed score and +inf) of 0.5 P_in(s >= t) + 0.5 P_out(s < t)."""
    si, so = as_double(scores_in), as_double(scores_out)
    cand = torch.cat([torch.unique(torch.cat([si, so])), torch.tensor([math.inf], dtype=torch.float64)])
    tpr = 1 - torch.searchsorted(torch.sort(si).values, cand, right=False).double() / si.numel()  # P_in(s >= t)
    tnr = torch.searchsorted(torch.sort(so).values, cand, right=False).double() / so.numel()      # P_out(s < t)
    return float((0.5 * tpr + 0.5 * tnr).max())


def ood_noise(kind: str, n: int, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """`n` noise images in pixel space: 'uniform' U[0, 1], or 'gaussian' N(0.5, 1) clipped to [0, 1]."""
    if kind == "uniform":
        return torch.rand(n, *shape, generator=generator)
    if kind == "gaussian":
        return (0.5 + torch.randn(n, *shape, generator=generator)).clamp_(0, 1)
    raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")


class OOD(Measurement):
    """AUROC, TNR at 95% TPR and detection accuracy of the max-softmax score, per OOD set and averaged."""

    name = "ood"
    columns = {"ood_auroc": ("OOD AUROC", ("mean", "auroc")), "ood_tnr95": ("OOD TNR@95", ("mean", "tnr_at_tpr95")),
               "ood_det_acc": ("OOD det. acc", ("mean", "detection_acc"))}

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.size = ctx.opts.ood_size or min(ctx.num_test, 10000)
        self.other, self.other_x, self.other_note = load_other_dataset(ctx.data.name, ctx.opts.data_dir, ctx.shape)
        self.scores: dict[str, list[torch.Tensor]] = {}

    def _noise(self, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(EVAL_SEED + 1 + NOISE_KINDS.index(kind))
        bs = self.ctx.opts.batch_size
        for start in range(0, self.size, bs):
            yield kind, ood_noise(kind, min(bs, self.size - start), self.ctx.shape, g).to(self.ctx.device)

    def steps(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(set name, a batch of its pixels on the device): the noise sets, then the paired dataset if found."""
        for kind in NOISE_KINDS:
            yield from self._noise(kind)
        if self.other_x is not None:
            pick = torch.randperm(self.other_x.shape[0], generator=torch.Generator().manual_seed(EVAL_SEED))
            for x, _, _ in pixel_batches(self.other_x[pick[:self.size]], None, self.ctx.opts.batch_size,
                                         self.ctx.device):
                yield self.other, x

    def num_steps(self) -> int:
        """Batches over all OOD sets."""
        per_set = math.ceil(self.size / self.ctx.opts.batch_size)
        return per_set * (len(NOISE_KINDS) + (self.other_x is not None))

    def accumulate(self, step: tuple[str, torch.Tensor]) -> None:
        """Max-softmax scores of one batch of one OOD set."""
        name, x = step
        with torch.no_grad():
            self.scores.setdefault(name, []).append(F.softmax(self.ctx.logits(x), 1).amax(1).cpu())

    def report(self) -> dict[str, Any]:
        """{'detector', 'in_dist', 'sets': {name: scores in %}, 'mean', 'skipped'}."""
        conf = self.ctx.clean.conf
        sets = {}
        for name, parts in self.scores.items():
            s = torch.cat(parts)
            sets[name] = {"auroc": pct(auroc(conf, s)), "tnr_at_tpr95": pct(tnr_at_tpr(conf, s, 0.95)),
                          "detection_acc": pct(detection_accuracy(conf, s)), "n": int(s.numel())}
        skipped = {}
        if self.other_x is None:
            self.ctx.notes.append(f"ood: {self.other_note}")
            if self.other:
                skipped[self.other] = self.other_note
        mean = {key: statistics.fmean(r[key] for r in sets.values()) for key in SCORES}
        return {"detector": "max softmax", "in_dist": self.ctx.data.name, "sets": sets, "mean": mean,
                "skipped": skipped}

    @classmethod
    def markdown(cls, report: dict[str, Any]) -> list[str]:
        """A table: one row per OOD set and their mean."""
        o = report["ood"]
        rows = [[k, r["n"], r["auroc"], r["tnr_at_tpr95"], r["detection_acc"]] for k, r in o["sets"].items()]
        rows.append(["mean", "", *(o["mean"][key] for key in SCORES)])
        return [f"## OOD detection (max softmax; in-distribution: {o['in_dist']} test set)", "",
                results.md_table(["OOD set", "n", "AUROC", "TNR at TPR 95%", "detection acc"], rows)]
