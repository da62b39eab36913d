"""The measurements behind the paper's robustness, localisation, OOD and calibration claims, as pure functions.

Everything here works on tensors and a model; nothing reads files or knows about checkpoints (that is
`experiments.evaluate`). Images enter in *pixel space*: float in [0, 1], shape (B, C, H, W); a
`normalize` callable maps them to what the model was trained on. Perturbations (FGSM steps, occlusion,
mixing) are applied in pixel space, where "black" and "clip to the valid range" mean what they say.

Conventions: accuracies are fractions in [0, 1] here (the reports print %); boxes are
(x1, y1, x2, y2) in pixel coordinates with x2/y2 exclusive, so a box covers (x2 - x1) * (y2 - y1) pixels.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Normalize = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "fgsm", "occlusion_mask", "occlude", "occlusion_sizes", "cutmix_center", "mixup", "partner_indices",
    "inbetween_correct", "label_components", "largest_component_box", "box_iou", "class_activation_maps",
    "cam_boxes", "cam_supported", "auroc", "tnr_at_tpr", "detection_accuracy", "expected_calibration_error",
    "ood_noise",
]


# ----------------------------------------------------------------------------------------------- FGSM
def fgsm(model: nn.Module, x_pix: torch.Tensor, y: torch.Tensor, eps: float, normalize: Normalize) -> torch.Tensor:
    """One FGSM step (Goodfellow et al. 2015) in pixel space: clip(x + eps * sign(d CE / d x), 0, 1).

    The gradient is taken w.r.t. the *pixels* through `normalize`, so `eps` keeps its pixel meaning
    (8/255 = eight grey levels) whatever the dataset's mean/std. The model should be in eval mode.
    """
    x = x_pix.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(normalize(x)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return (x_pix + eps * grad.sign()).clamp_(0.0, 1.0).detach()


# ------------------------------------------------------------------------------------------ occlusion
def occlusion_mask(h: int, w: int, size: int, mode: str, device: torch.device | str | None = None) -> torch.Tensor:
    """(h, w) float mask, 1 = pixel kept. The hole is the centred size x size square (clipped to the image).

    "center": the hole is zeroed (size 0 keeps everything); "boundary": everything *outside* the hole is
    zeroed (size 0 keeps nothing). The hole starts at ((h - size) // 2, (w - size) // 2).
    """
    if mode not in ("center", "boundary"):
        raise ValueError(f"mode must be 'center' or 'boundary', got {mode!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    hole = torch.zeros(h, w, device=device)
    y1, x1 = max((h - size) // 2, 0), max((w - size) // 2, 0)
    hole[y1:y1 + size, x1:x1 + size] = 1.0
    return 1.0 - hole if mode == "center" else hole


def occlude(x_pix: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Zero (black, in pixel space) the centred hole ("center") or everything around it ("boundary")."""
    return x_pix * occlusion_mask(x_pix.shape[-2], x_pix.shape[-1], size, mode, x_pix.device)


def occlusion_sizes(side: int, steps: int = 8) -> list[int]:
    """Hole sides from 0 to the image side in `steps` equal steps (rounded, duplicates dropped)."""
    return sorted({int(round(side * k / steps)) for k in range(steps + 1)})


# -------------------------------------------------------------------------------- in-between samples
def cutmix_center(xa: torch.Tensor, xb: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Paste a centred box of B into A; returns (mixed, area fraction of A that is left).

    The box side follows the reference code's truncation (int(H * sqrt(1 - lam))) but is centred, so it
    is never clipped and the returned fraction is the exact share of A's pixels (close to `lam`).
    """
    H, W = xa.shape[-2:]
    ch, cw = int(H * math.sqrt(1.0 - lam)), int(W * math.sqrt(1.0 - lam))
    y1, x1 = (H - ch) // 2, (W - cw) // 2
    out = xa.clone()
    out[..., y1:y1 + ch, x1:x1 + cw] = xb[..., y1:y1 + ch, x1:x1 + cw]
    return out, 1.0 - ch * cw / (H * W)


def mixup(xa: torch.Tensor, xb: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Mixup's pixel blend lam * A + (1 - lam) * B; returns (mixed, lam)."""
    return lam * xa + (1.0 - lam) * xb, lam


def partner_indices(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A partner for every sample, of another class where the batch allows (a seeded shuffle, then the
    nearest following sample in that shuffled order whose label differs)."""
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


def inbetween_correct(logits: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor,
                      share_a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(major, either) correctness of predictions on samples that are `share_a` A and 1 - share_a B.

    major: top-1 equals the label of the larger part (A when share_a >= 0.5, ties go to A);
    either: top-1 is one of the two source labels.
    """
    pred = logits.argmax(1)
    major = ya if share_a >= 0.5 else yb
    return pred == major, (pred == ya) | (pred == yb)


# ------------------------------------------------------------------------------------------ localisation
def label_components(mask: torch.Tensor | np.ndarray, connectivity: int = 8) -> tuple[torch.Tensor, int]:
    """Connected components of a boolean (H, W) mask: (labels 1..n, 0 = background; n).

    Label propagation on the grid (numpy, single-threaded: per-image work this small only loses to
    thread start-up in torch): every foreground pixel holds the index of a pixel of its own component,
    takes the maximum over its neighbours and then jumps to its label's label (pointer jumping), so
    blob-like regions converge in a few dozen vectorised steps. Components are numbered in raster order
    of their first pixel, as scipy.ndimage.label numbers them.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    fg = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    fg = fg.astype(bool)
    if fg.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {fg.shape}")
    H, W = fg.shape
    if not fg.any():
        return torch.zeros(H, W, dtype=torch.long), 0
    idx = np.arange(H * W, dtype=np.int64).reshape(H, W)
    lab = np.where(fg, idx, -1)
    if connectivity == 8:
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    else:
        shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    padded = np.full((H + 2, W + 2), -1, dtype=np.int64)
    fg_flat = fg.ravel()
    while True:
        padded[1:-1, 1:-1] = lab
        best = lab.copy()
        for dy, dx in shifts:
            np.maximum(best, padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W], out=best)
        best = np.where(fg, best, -1).ravel()
        jumped = np.where(fg_flat, best[np.maximum(best, 0)], -1).reshape(H, W)
        if np.array_equal(jumped, lab):
            break
        lab = jumped
    roots = lab[fg]  # one root (the component's largest pixel index) per foreground pixel, raster order
    _, first_pos = np.unique(roots, return_index=True)
    ordered_roots = roots[np.sort(first_pos)]  # roots in order of their component's first pixel
    new_id = np.zeros(H * W, dtype=np.int64)
    new_id[ordered_roots] = np.arange(1, ordered_roots.size + 1)
    out = np.zeros((H, W), dtype=np.int64)
    out[fg] = new_id[roots]
    return torch.from_numpy(out), int(ordered_roots.size)


def largest_component_box(mask: torch.Tensor, connectivity: int = 8) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) around the largest connected region of `mask` (ties: the first in raster order).

    An empty mask gives the whole image (nothing to localise: the least committal answer).
    """
    labels, n = label_components(mask, connectivity)
    H, W = mask.shape
    if n == 0:
        return (0, 0, W, H)
    counts = torch.bincount(labels.flatten(), minlength=n + 1)[1:]
    k = int(torch.argmax(counts)) + 1  # argmax returns the first maximum
    ys, xs = (labels == k).nonzero(as_tuple=True)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of boxes (..., 4) as (x1, y1, x2, y2), x2/y2 exclusive; 0 when both are empty."""
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    area = lambda t: (t[..., 2] - t[..., 0]).clamp(min=0) * (t[..., 3] - t[..., 1]).clamp(min=0)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def cam_supported(model: nn.Module, x: torch.Tensor) -> str | None:
    """None if `model` has a CAM-able head (forward_features -> (B, C, h, w) -> global average pool ->
    one Linear), else the reason it has not. Checked numerically on the batch `x` (normalised)."""
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
    """CAMs (Zhou et al. 2016) of the last conv stage: sum_c w[k, c] * f_c(i, j), upsampled to the image.

    Returns (logits, [maps (B, H, W) for each tensor of class indices in `classes`]); the classifier's
    bias is left out (a constant shift per class, as in the CAM paper). Upsampling is bilinear.
    """
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
    """Boxes (B, 4) from CAMs (B, H, W): min-max normalise each map to [0, 1], keep pixels >= threshold,
    box the largest connected region (the paper's 0.15 x max rule on the normalised map)."""
    boxes = []
    for cam in cams:
        lo, hi = cam.min(), cam.max()
        norm = (cam - lo) / (hi - lo) if hi > lo else torch.ones_like(cam)
        boxes.append(largest_component_box(norm >= threshold, connectivity))
    return torch.tensor(boxes, dtype=torch.long).view(-1, 4)


# ---------------------------------------------------------------------------------------------- OOD
def _as_double(t: torch.Tensor | Sequence[float]) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64).flatten().cpu()


def auroc(scores_in: torch.Tensor | Sequence[float], scores_out: torch.Tensor | Sequence[float]) -> float:
    """Area under the ROC curve with in-distribution as the positive class (higher score = more "in").

    Computed as the Mann-Whitney statistic P(s_in > s_out) + 0.5 P(s_in == s_out) from average ranks,
    O(n log n), exact with ties.
    """
    si, so = _as_double(scores_in), _as_double(scores_out)
    if si.numel() == 0 or so.numel() == 0:
        raise ValueError("auroc needs at least one in- and one out-of-distribution score")
    allv = torch.cat([si, so])
    uniq, inv, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    r_in = avg_rank[inv[: si.numel()]].sum()
    n1, n0 = si.numel(), so.numel()
    return float((r_in - n1 * (n1 + 1) / 2) / (n1 * n0))


def tnr_at_tpr(scores_in: torch.Tensor | Sequence[float], scores_out: torch.Tensor | Sequence[float],
               tpr: float = 0.95) -> float:
    """True-negative rate at the threshold that keeps at least `tpr` of the in-distribution samples.

    Threshold t = the ceil(tpr * n_in)-th largest in-distribution score (samples with s >= t are called
    "in"); TNR = fraction of OOD scores strictly below t.
    """
    si, so = _as_double(scores_in), _as_double(scores_out)
    k = max(1, math.ceil(tpr * si.numel() - 1e-9))
    t = torch.sort(si, descending=True).values[k - 1]
    return float((so < t).double().mean())


def detection_accuracy(scores_in: torch.Tensor | Sequence[float], scores_out: torch.Tensor | Sequence[float]) -> float:
    """Best balanced accuracy over thresholds: max_t 0.5 * P_in(s >= t) + 0.5 * P_out(s < t) (ODIN's
    "detection accuracy", with equal priors), searched over every observed score and +inf."""
    si, so = _as_double(scores_in), _as_double(scores_out)
    cand = torch.cat([torch.unique(torch.cat([si, so])), torch.tensor([math.inf], dtype=torch.float64)])
    si_s, so_s = torch.sort(si).values, torch.sort(so).values
    tpr = 1 - torch.searchsorted(si_s, cand, right=False).double() / si.numel()  # P_in(s >= t)
    tnr = torch.searchsorted(so_s, cand, right=False).double() / so.numel()      # P_out(s < t)
    return float((0.5 * tpr + 0.5 * tnr).max())


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins (k/n, (k+1)/n] of
    |accuracy - mean confidence| weighted by the bin's share of samples."""
    conf = _as_double(confidence)
    acc = _as_double(correct)
    if conf.numel() == 0:
        return math.nan
    b = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    n = torch.bincount(b, minlength=n_bins).double()
    s_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, conf)
    s_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, acc)
    return float((s_acc - s_conf).abs().sum() / conf.numel())


def ood_noise(kind: str, n: int, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Synthetic OOD images in pixel space, as ODIN (Liang et al. 2018) defines them: "uniform" = i.i.d.
    U[0, 1] pixels; "gaussian" = i.i.d. N(0.5, 1) pixels clipped to [0, 1]."""
    if kind == "uniform":
        return torch.rand(n, *shape, generator=generator)
    if kind == "gaussian":
        return (0.5 + torch.randn(n, *shape, generator=generator)).clamp_(0, 1)
    raise ValueError(f"unknown noise kind {kind!r}; choose uniform or gaussian")
