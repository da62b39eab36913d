"""Occlusion robustness (the paper's Figure 5a): accuracy when a centred s x s hole is set to black
("center") or everything outside it is ("boundary"), for hole sides s on an even grid."""
from __future__ import annotations

import statistics
from typing import Any

import torch

from .base import GridMeasurement, TestBatch

MODES = ("center", "boundary")


def occlusion_mask(h: int, w: int, size: int, mode: str, device: torch.device | str | None = None) -> torch.Tensor:
    """(h, w) float mask, 1 = kept; the hole is the size x size square from ((h - size) // 2, (w - size) // 2).

    "center" zeroes the hole (size 0 keeps everything); "boundary" zeroes everything outside it (size 0 keeps nothing).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    hole = torch.zeros(h, w, device=device)
    y1, x1 = max((h - size) // 2, 0), max((w - size) // 2, 0)
    hole[y1:y1 + size, x1:x1 + size] = 1.0
    return 1.0 - hole if mode == "center" else hole


def occlude(x_pix: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Pixels (B, C, H, W) with the centred hole ("center") or everything around it ("boundary") set to 0."""
    return x_pix * occlusion_mask(x_pix.shape[-2], x_pix.shape[-1], size, mode, x_pix.device)


def occlusion_sizes(side: int, steps: int = 8) -> list[int]:
    """Hole sides from 0 to `side` in `steps` equal steps (rounded, duplicates dropped)."""
    return sorted({int(round(side * k / steps)) for k in range(steps + 1)})


def occlusion_effect(h: int, w: int, size: int, mode: str) -> str:
    """'clean' when the setting changes no pixel, 'blank' when it blacks out the whole image, else 'partial'."""
    covers_all = size >= h and size >= w
    if (mode == "center" and size == 0) or (mode == "boundary" and covers_all):
        return "clean"
    if (mode == "center" and covers_all) or (mode == "boundary" and size == 0):
        return "blank"
    return "partial"


class Occlusion(GridMeasurement):
    """Top-1 accuracy per hole side and mode, and its mean over the grid (on the grid subset of the test set)."""

    name = "occlusion"
    columns = {"occ_center": ("occl. center (mean)", ("center_mean",)),
               "occ_boundary": ("occl. boundary (mean)", ("boundary_mean",))}
    title = "Occlusion (top-1 accuracy)"
    header = ("hole side s", "center (hole black)", "boundary (outside black)")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.h, self.w = ctx.shape[-2:]
        self.sizes = occlusion_sizes(max(self.h, self.w), ctx.opts.occlusion_steps)
        self.correct = {mode: torch.zeros(len(self.sizes), dtype=torch.float64) for mode in MODES}

    def accumulate(self, batch: TestBatch) -> None:
        """Score every (mode, side) on one batch; the partial settings share model calls."""
        settings = [(mode, i, occlusion_effect(self.h, self.w, s, mode)) for mode in MODES
                    for i, s in enumerate(self.sizes)]
        partial = [(mode, i) for mode, i, effect in settings if effect == "partial"]
        preds = dict(zip(partial, self.ctx.predict_many([occlude(batch.x, self.sizes[i], mode)
                                                         for mode, i in partial])))
        for mode, i, effect in settings:
            pred = {"clean": batch.pred, "blank": self.ctx.blank_prediction()}.get(effect, preds.get((mode, i)))
            self.correct[mode][i] += int((pred == batch.y).sum())
        self.seen += batch.y.numel()

    def report(self) -> dict[str, Any]:
        """{'sizes', 'side', 'n', 'center', 'boundary' (curves, %), 'center_mean', 'boundary_mean'}."""
        rep: dict[str, Any] = {"sizes": self.sizes, "side": max(self.h, self.w), "n": self.seen}
        for mode in MODES:
            curve = (100 * self.correct[mode] / self.seen).tolist()
            rep[mode], rep[f"{mode}_mean"] = curve, statistics.fmean(curve)
        return rep

    @staticmethod
    def rows(section: dict[str, Any]) -> list[list[Any]]:
        """Per hole side: both modes' accuracy."""
        return [list(r) for r in zip(section["sizes"], section["center"], section["boundary"])]
