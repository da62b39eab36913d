"""Weakly-supervised localisation with class activation maps (Zhou et al. 2016), scored against true boxes.

CAMs of the last stage (predicted class for top-1 localisation, true class for GT-known), min-max
normalised, thresholded at --cam-threshold of the maximum, box around the largest 8-connected region;
correct when IoU >= 0.5 (top-1 localisation also needs the class right). Boxes are (x1, y1, x2, y2) in
pixels, x2/y2 exclusive. Needs a dataset with boxes: offline only `synthetic-loc` has them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import EVAL_SEED, Measurement, TestBatch, pct
from .synthetic_loc import NAME as LOC_NAME

IOU_CHUNK = 1024  # boxes per call of torchvision's pairwise box_iou (a chunk^2 matrix, diagonal kept)


def label_components(mask: torch.Tensor | np.ndarray, connectivity: int = 8) -> tuple[torch.Tensor, int]:
    """Connected components of a boolean (H, W) mask -> (labels 1..n numbered in raster order, 0 = background; n)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    fg = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if fg.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {fg.shape}")
    try:
        from scipy import ndimage
    except ImportError as e:
        raise ImportError("label_components needs scipy (the [dev] extra: pip install -e '.[dev]', or pip install "
                          "scipy); only the localisation measurement uses it") from e
    structure = np.ones((3, 3), dtype=bool) if connectivity == 8 else None
    labels, n = ndimage.label(fg.astype(bool), structure=structure)
    return torch.from_numpy(labels.astype(np.int64)), int(n)


def largest_component_box(mask: torch.Tensor, connectivity: int = 8) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) around the largest connected region (ties: first in raster order; empty mask: whole image)."""
    labels, n = label_components(mask, connectivity)
    H, W = mask.shape
    if n == 0:
        return (0, 0, W, H)
    counts = torch.bincount(labels.flatten(), minlength=n + 1)[1:]
    k = int(torch.argmax(counts)) + 1  # argmax returns the first maximum
    ys, xs = (labels == k).nonzero(as_tuple=True)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two (N, 4) box lists (x1, y1, x2, y2; x2/y2 exclusive); 0 where both are empty."""
    from torchvision.ops import box_iou as pairwise_iou

    a, b = a.double().reshape(-1, 4), b.double().reshape(-1, 4)
    if a.shape != b.shape:
        raise ValueError(f"box_iou needs two box lists of one length, got {tuple(a.shape)} and {tuple(b.shape)}")
    parts = [pairwise_iou(a[i:i + IOU_CHUNK], b[i:i + IOU_CHUNK]).diagonal() for i in range(0, a.shape[0], IOU_CHUNK)]
    return torch.cat(parts).nan_to_num(0.0) if parts else torch.zeros(0, dtype=torch.float64)


def cam_supported(model: nn.Module, x: torch.Tensor) -> str | None:
    """None if `model`'s head is global-average-pool + one Linear on a (B, C, h, w) map (checked on `x`), else why."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return "the model has no forward_features/forward_head (not a timm model)"
    fc = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(fc, nn.Linear):
        return f"the classifier is {type(fc).__name__}, not one nn.Linear"
    with torch.no_grad():
        feat = model.forward_features(x)
        if feat.dim() != 4:
            return f"forward_features returns shape {tuple(feat.shape)}, not a (B, C, h, w) map"
        logits = model.forward_head(feat)
        direct = F.linear(feat.float().mean((2, 3)), fc.weight.float(), None if fc.bias is None else fc.bias.float())
    if not torch.allclose(logits.float(), direct, rtol=1e-3, atol=1e-3 * float(direct.abs().max()) + 1e-5):
        return "the head is not global-average-pool + Linear (logits differ from the CAM decomposition)"
    return None


def class_activation_maps(model: nn.Module, x: torch.Tensor, classes: Sequence[torch.Tensor],
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, [CAMs (B, H, W) of each tensor of class indices]): sum_c w[k, c] f_c, no bias, upsampled bilinearly."""
    fc = model.get_classifier()
    feat = model.forward_features(x)
    logits = model.forward_head(feat)
    maps = []
    for k in classes:
        w = fc.weight[k].to(feat.dtype)  # (B, C)
        cam = torch.einsum("bc,bchw->bhw", w, feat)
        maps.append(F.interpolate(cam[:, None].float(), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0])
    return logits, maps


def cam_boxes(cams: torch.Tensor, threshold: float = 0.15, connectivity: int = 8) -> torch.Tensor:
    """Boxes (B, 4) from CAMs (B, H, W): min-max normalise, keep >= threshold, box the largest region."""
    boxes = []
    for cam in cams:
        lo, hi = cam.min(), cam.max()
        norm = (cam - lo) / (hi - lo) if hi > lo else torch.ones_like(cam)
        boxes.append(largest_component_box(norm >= threshold, connectivity))
    return torch.tensor(boxes, dtype=torch.long).view(-1, 4)


def chance_gt_known(boxes: torch.Tensor, generator: torch.Generator, iou_threshold: float = 0.5) -> float:
    """GT-known accuracy of guessing: each image scored with another image's true box (a seeded cycle)."""
    n = boxes.shape[0]
    if n < 2:
        return float("nan")
    perm = torch.randperm(n, generator=generator)
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(1)  # a cycle through the shuffled order: never an image's own box
    return float((box_iou(boxes, boxes[partner]) >= iou_threshold).double().mean())


class Localization(Measurement):
    """Top-1 and GT-known localisation accuracy of CAM boxes, with the chance level of guessing."""

    name = "localization"
    columns = {"loc_top1": ("top-1 loc", ("top1_loc",)), "loc_gt_known": ("GT-known loc", ("gt_known",))}
    line = ("Localisation: top-1 loc {top1_loc:.2f}%, GT-known {gt_known:.2f}% (chance, another image's box: "
            "{chance_gt_known:.2f}%), mean IoU (GT class) {mean_iou_gt_known:.3f}; CAM threshold {cam_threshold} x "
            "max, IoU >= {iou_threshold}.")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.pred_boxes: list[torch.Tensor] = []
        self.true_boxes: list[torch.Tensor] = []
        self.preds: list[torch.Tensor] = []

    def skip_reason(self) -> str | None:
        """No boxes in the data, or a head that CAMs cannot decompose."""
        boxes = getattr(self.ctx.data, "test_boxes", None)
        if boxes is None or boxes.shape[0] != self.ctx.num_test:
            return f"{self.ctx.data.name} has no ground-truth boxes (use --dataset {LOC_NAME})"
        first = next(iter(self.ctx.test_batches()))
        return cam_supported(self.ctx.model, self.ctx.normalize(first.x[:4]))

    def accumulate(self, batch: TestBatch) -> None:
        """CAM boxes of the predicted and of the true class for one batch."""
        with torch.no_grad():
            logits, (cam_pred, cam_true) = class_activation_maps(self.ctx.model, self.ctx.normalize(batch.x),
                                                                 [batch.pred, batch.y])
        threshold = self.ctx.opts.cam_threshold
        self.pred_boxes.append(cam_boxes(cam_pred.cpu(), threshold))
        self.true_boxes.append(cam_boxes(cam_true.cpu(), threshold))
        self.preds.append(logits.argmax(1).cpu())

    def report(self) -> dict[str, Any]:
        """{'top1_loc', 'gt_known' (%), 'mean_iou_gt_known', 'chance_gt_known' (%), thresholds}."""
        boxes, iou_at = self.ctx.data.test_boxes, self.ctx.opts.iou_threshold
        iou_pred, iou_true = box_iou(torch.cat(self.pred_boxes), boxes), box_iou(torch.cat(self.true_boxes), boxes)
        class_right = torch.cat(self.preds) == self.ctx.clean.labels
        return {"top1_loc": pct((class_right & (iou_pred >= iou_at)).double().mean()),
                "gt_known": pct((iou_true >= iou_at).double().mean()), "mean_iou_gt_known": float(iou_true.mean()),
                "chance_gt_known": pct(chance_gt_known(boxes, torch.Generator().manual_seed(EVAL_SEED), iou_at)),
                "cam_threshold": self.ctx.opts.cam_threshold, "iou_threshold": iou_at}
