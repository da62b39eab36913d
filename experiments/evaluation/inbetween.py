"""In-between-class samples (the paper's Figure 5b): accuracy on CutMix-ed and Mixup-ed pairs of test
images of different classes, for each share lam of image A.

A prediction is correct when it is the label of the larger part (A when its share is >= 0.5); the
report also gives how often it is either source label. CutMix pastes a centred box of B into A (never
clipped, so A's share is exact and reported per lam).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch

from .base import EVAL_SEED, GridMeasurement, TestBatch

Mixer = Callable[[torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, float]"]


def cutmix_center(xa: torch.Tensor, xb: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """A with a centred box of B pasted (side int(H * sqrt(1 - lam))); returns (mixed, exact share of A)."""
    H, W = xa.shape[-2:]
    ch, cw = int(H * math.sqrt(1.0 - lam)), int(W * math.sqrt(1.0 - lam))
    y1, x1 = (H - ch) // 2, (W - cw) // 2
    out = xa.clone()
    out[..., y1:y1 + ch, x1:x1 + cw] = xb[..., y1:y1 + ch, x1:x1 + cw]
    return out, 1.0 - ch * cw / (H * W)


def mixup(xa: torch.Tensor, xb: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Mixup's pixel blend lam * A + (1 - lam) * B; returns (mixed, lam)."""
    return lam * xa + (1.0 - lam) * xb, lam


MIXERS: dict[str, Mixer] = {"cutmix": cutmix_center, "mixup": mixup}


def partner_indices(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A partner per sample, of another class where the batch allows: a seeded shuffle, then the nearest
    following sample in that order whose label differs."""
    n = y.numel()
    perm = torch.randperm(n, generator=generator).to(y.device)
    ys = y[perm]
    partner_pos = (torch.arange(n, device=y.device) + 1) % max(n, 1)
    unresolved = ys[partner_pos] == ys
    for shift in range(2, n):
        if not bool(unresolved.any()):
            break
        cand = (torch.arange(n, device=y.device) + shift) % n
        ok = unresolved & (ys[cand] != ys)
        partner_pos = torch.where(ok, cand, partner_pos)
        unresolved &= ~ok
    out = torch.empty_like(perm)
    out[perm] = perm[partner_pos]
    return out


def inbetween_correct(pred: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor,
                      share_a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(major, either) per sample: `pred` is the label of the larger part (ties go to A) / one of the two labels."""
    major = ya if share_a >= 0.5 else yb
    return pred == major, (pred == ya) | (pred == yb)


class InBetween(GridMeasurement):
    """Accuracy per lam on CutMix-ed and Mixup-ed pairs, and its mean over lam (on the grid subset)."""

    name = "inbetween"
    columns = {"inb_cutmix": ("in-between CutMix", ("cutmix", "major_mean")),
               "inb_mixup": ("in-between Mixup", ("mixup", "major_mean"))}
    title = "In-between samples"
    note = "Score: {score}; *either*: top-1 is one of the two labels."
    header = ("lam", "CutMix share of A", "CutMix acc", "CutMix either", "Mixup acc", "Mixup either")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.lams = tuple(ctx.opts.lams)
        self.pair_gen = torch.Generator().manual_seed(EVAL_SEED)
        self.tally = {kind: {key: torch.zeros(len(self.lams), dtype=torch.float64) for key in ("major", "either")}
                      for kind in MIXERS}
        self.share_a = {kind: [0.0] * len(self.lams) for kind in MIXERS}

    def skip_reason(self) -> str | None:
        """Pairs of different classes need two classes."""
        return "needs at least two classes" if self.ctx.data.num_classes < 2 else None

    def accumulate(self, batch: TestBatch) -> None:
        """Pair the batch, mix every (kind, lam), score them in shared model calls."""
        partner = partner_indices(batch.y, self.pair_gen)
        xb, yb = batch.x[partner], batch.y[partner]
        known = {1.0: batch.pred, 0.0: batch.pred[partner]}  # the pure images: scored by the clean pass
        mixed, todo = [], []
        for kind, mix in MIXERS.items():
            for i, lam in enumerate(self.lams):
                xm, share = mix(batch.x, xb, lam)
                self.share_a[kind][i] = share
                if share not in known:
                    mixed.append(xm)
                    todo.append((kind, i))
        preds = dict(zip(todo, self.ctx.predict_many(mixed)))
        for kind in MIXERS:
            for i, share in enumerate(self.share_a[kind]):
                pred = known[share] if share in known else preds[(kind, i)]
                major, either = inbetween_correct(pred, batch.y, yb, share)
                self.tally[kind]["major"][i] += int(major.sum())
                self.tally[kind]["either"][i] += int(either.sum())
        self.seen += batch.y.numel()

    def report(self) -> dict[str, Any]:
        """{'lams', 'score', 'n', per kind: 'share_a', 'major', 'either' (%), 'major_mean'}."""
        rep: dict[str, Any] = {"lams": list(self.lams), "n": self.seen,
                               "score": "top-1 == label of the larger part (A if share_a >= 0.5)"}
        for kind in MIXERS:
            major = (100 * self.tally[kind]["major"] / self.seen).tolist()
            rep[kind] = {"share_a": self.share_a[kind], "major": major,
                         "either": (100 * self.tally[kind]["either"] / self.seen).tolist(),
                         "major_mean": statistics.fmean(major)}
        return rep

    @staticmethod
    def rows(section: dict[str, Any]) -> list[list[Any]]:
        """Per lam: CutMix's share of A, both kinds' accuracy and 'either' share."""
        c, m = section["cutmix"], section["mixup"]
        return [[lam, c["share_a"][i], c["major"][i], c["either"][i], m["major"][i], m["either"][i]]
                for i, lam in enumerate(section["lams"])]
