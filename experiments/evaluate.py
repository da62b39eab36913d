"""The paper's claims beyond top-1 error, measured on trained checkpoints: FGSM robustness, occlusion
robustness, in-between-class samples, CAM localisation, out-of-distribution detection and calibration.

    python -m experiments.evaluate --ckpt runs/depth_ablation            # every checkpoint of a study
    python -m experiments.evaluate --ckpt a.pt b.pt --test-subset 2000 --metrics fgsm,ood
    python -m experiments.evaluate --model resnet50 --weights w.pth --dataset imagefolder:/data/cub
    python -m experiments.evaluate --ckpt runs/x/ckpt/baseline_seed0.pt --dataset synthetic-loc

Per checkpoint it writes <out>/<checkpoint>/report.json + report.md (+ occlusion.png, inbetween.png);
across checkpoints <out>/comparison.md, comparison.csv (one row per checkpoint), comparison_by_setting.csv
(mean/std over seeds) and the plots occlusion.png / inbetween.png, and prints the comparison table.
All accuracies, AUROC, TNR and ECE in the reports are percentages.

What each metric computes (definitions in `experiments.metrics`):
- clean: top-1 accuracy on the (subset of the) test set.
- fgsm: top-1 accuracy on one-step FGSM images, eps = --epsilon / 255 in [0, 1] pixel space, clipped to
  [0, 1], gradient taken through the normalisation (the paper: eps = 8/255 on ImageNet).
- occlusion: top-1 accuracy when a centred s x s hole is set to black ("center") or everything outside
  it is ("boundary"), s on an even grid from 0 to the image side (the paper's Figure 5a).
- inbetween: top-1 accuracy on CutMix-ed and Mixup-ed pairs of test images of different classes, for
  lam in --lams (Figure 5b). paper-notes.md does not pin down how the paper scores these, so a
  prediction counts as correct when it is the label of the *larger part* (image A when its share is
  >= 0.5); the report also gives the share of predictions that are *either* source label. CutMix pastes
  a centred box of B into A (never clipped, so A's share is exact; it is reported per lam).
- ood: max-softmax detector (Hendrycks & Gimpel 2017); in-distribution = the test set, OOD = uniform
  noise, Gaussian noise (ODIN's definitions) and another dataset where one is on disk (MNIST for
  Fashion-MNIST, CIFAR-100 for CIFAR-10 and back). AUROC, TNR at 95% TPR, detection accuracy.
- calibration: expected calibration error (15 equal-width bins), NLL and mean confidence.
- localization: CAMs of the last stage (predicted class for top-1 localisation, true class for
  GT-known), min-max normalised, thresholded at 0.15, box around the largest 8-connected region;
  correct when IoU >= 0.5 (and, for top-1 localisation, the class is right). Needs boxes: only
  `--dataset synthetic-loc` (experiments.localization) has them offline.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics as M
from .data import DEBIAN_FASHION_MNIST, DATASETS, FolderData, TensorData, load_dataset, read_idx
from .study import model_kwarg
from .localization import MAX_CLASSES as LOC_MAX_CLASSES, NAME as LOC_NAME, chance_gt_known, load_synthetic_loc

METRICS = ("fgsm", "occlusion", "inbetween", "ood", "calibration", "localization")
DEFAULT_LAMS = tuple(round(0.1 * k, 1) for k in range(11))
EVAL_SEED = 0            # in-between partners, OOD noise, chance boxes: the same for every checkpoint
SUBSET_SEED = 1234 + 1   # as the studies pick their --test-subset, so the same N picks the same images
OTHER_DATASET = {"fashion-mnist": "mnist", "cifar10": "cifar100", "cifar100": "cifar10"}

# Scalars of a report that the comparison tables show: key -> (column title, path into the report).
SUMMARY_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clean_acc": ("clean acc", ("clean_acc",)),
    "fgsm_acc": ("FGSM acc", ("fgsm", "acc")),
    "occ_center": ("occl. center (mean)", ("occlusion", "center_mean")),
    "occ_boundary": ("occl. boundary (mean)", ("occlusion", "boundary_mean")),
    "inb_cutmix": ("in-between CutMix", ("inbetween", "cutmix", "major_mean")),
    "inb_mixup": ("in-between Mixup", ("inbetween", "mixup", "major_mean")),
    "ood_auroc": ("OOD AUROC", ("ood", "mean", "auroc")),
    "ood_tnr95": ("OOD TNR@95", ("ood", "mean", "tnr_at_tpr95")),
    "ood_det_acc": ("OOD det. acc", ("ood", "mean", "detection_acc")),
    "ece": ("ECE", ("calibration", "ece")),
    "loc_top1": ("top-1 loc", ("localization", "top1_loc")),
    "loc_gt_known": ("GT-known loc", ("localization", "gt_known")),
}


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Target:
    """One model to evaluate: its weights and what is needed to rebuild and feed it."""

    label: str
    path: Path
    model: str
    model_kwargs: dict[str, Any]
    num_classes: int
    in_chans: int
    input_size: tuple[int, ...] | None
    dataset: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    setting: dict[str, Any]
    seed: int | None
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    train_metrics: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The timm model with the checkpoint's weights, in eval mode, parameters frozen."""
        import timm
        import models  # noqa: F401  (registers resnet8_cifar, pyramidnet200_a240, ... with timm)
        net = timm.create_model(self.model, num_classes=self.num_classes, in_chans=self.in_chans, **self.model_kwargs)
        net.load_state_dict(self.state)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net


def load_checkpoint(path: str | os.PathLike) -> Target:
    """A study checkpoint (`experiments.study` format) as a `Target`."""
    path = Path(path)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    missing = [k for k in ("model_state", "model", "num_classes", "in_chans") if k not in ck]
    if missing:
        raise ValueError(f"{path}: not a featmix study checkpoint (missing {missing}); for a plain state_dict "
                         "use --model NAME --weights FILE --dataset D")
    setting = dict(ck.get("setting") or {"name": path.stem, "layer": None})
    metrics = {k: v for k, v in (ck.get("metrics") or {}).items() if k != "history"}
    return Target(path.stem, path, ck["model"], dict(ck.get("model_kwargs") or {}), int(ck["num_classes"]),
                  int(ck["in_chans"]), tuple(ck["input_size"]) if ck.get("input_size") else None, ck.get("dataset"),
                  tuple(ck["mean"]) if ck.get("mean") else None, tuple(ck["std"]) if ck.get("std") else None,
                  setting, ck.get("seed"), ck["model_state"], metrics)


def target_from_weights(model: str, weights: str | os.PathLike, dataset: str, num_classes: int, in_chans: int,
                        model_kwargs: dict[str, Any] | None = None) -> Target:
    """Any timm model + a weights file (a state_dict, or a dict holding one under model_state/state_dict/model)."""
    path = Path(weights)
    sd = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(sd, dict):
        for key in ("model_state", "state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    return Target(path.stem, path, model, dict(model_kwargs or {}), num_classes, in_chans, None, dataset, None, None,
                  {"name": f"{model}:{path.stem}", "layer": None}, None, sd)


def collect_checkpoints(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories (a study dir holding ckpt/, or a ckpt/ dir) into their *.pt files, sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            d = p / "ckpt" if (p / "ckpt").is_dir() else p
            files = sorted(d.glob("*.pt"))
            if not files:
                raise FileNotFoundError(f"{p}: no *.pt checkpoints in {d}")
            found += files
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such checkpoint file or directory")
    return list(dict.fromkeys(found))


def default_out(first: str | os.PathLike) -> Path:
    """<study dir>/eval for a study dir, its ckpt/ dir or a checkpoint inside it; else <dir of file>/eval."""
    p = Path(first)
    if p.is_dir():
        return (p.parent if p.name == "ckpt" else p) / "eval"
    return (p.parent.parent if p.parent.name == "ckpt" else p.parent) / "eval"


def load_eval_data(name: str, data_dir: str | None, test_subset: int | None, size: int = 32, in_chans: int = 3,
                   num_classes: int = LOC_MAX_CLASSES, workers: int = 4) -> TensorData | FolderData:
    """The test set to evaluate on; synthetic-loc is drawn at the model's input size, channels and classes,
    image folders are centre-cropped to `size`."""
    if name == LOC_NAME:
        k = min(LOC_MAX_CLASSES, num_classes)
        if k < 2:
            raise ValueError(f"{LOC_NAME} needs a model with >= 2 classes, got {num_classes}")
        data: Any = load_synthetic_loc(n_train=0, size=size, num_classes=k, in_chans=in_chans)
    else:
        data = load_dataset(name, data_dir, download=False, image_size=size, workers=workers)
    if test_subset:
        data.test_subset(test_subset, torch.Generator().manual_seed(SUBSET_SEED))
    return data


def _find_mnist_test(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MNIST's test idx files under data_dir (flat, torchvision's MNIST/raw, or mnist/), if present."""
    roots = [Path(data_dir)] if data_dir else []
    roots.append(Path("data"))
    roots.append(DEBIAN_FASHION_MNIST.parent / "mnist")
    for r in roots:
        for d in (r, r / "MNIST" / "raw", r / "mnist"):
            for suffix in ("", ".gz"):
                xi, yi = d / f"t10k-images-idx3-ubyte{suffix}", d / f"t10k-labels-idx1-ubyte{suffix}"
                if xi.is_file() and yi.is_file():
                    return read_idx(xi).unsqueeze(1).contiguous(), read_idx(yi).long()
    return None


@functools.lru_cache(maxsize=4)
def load_other_dataset(in_dist: str, data_dir: str | None,
                       shape: tuple[int, ...]) -> tuple[str, torch.Tensor | None, str]:
    """(name, uint8 test images or None, note) of the natural OOD partner of `in_dist`, if on disk."""
    other = OTHER_DATASET.get(in_dist)
    if other is None:
        return "", None, f"no natural OOD dataset paired with {in_dist!r} (noise sets only)"
    try:
        if other == "mnist":
            found = _find_mnist_test(data_dir)
            if found is None:
                return other, None, ("MNIST not found locally (looked for t10k-images-idx3-ubyte[.gz] in --data-dir, "
                                     "--data-dir/MNIST/raw, ./data, /usr/share/datasets/mnist); skipped")
            x = found[0]
        else:
            x = load_dataset(other, data_dir, download=False).test_x
    except (FileNotFoundError, RuntimeError, OSError) as e:
        return other, None, f"{other} not available locally ({str(e).splitlines()[0]}); skipped"
    if tuple(x.shape[1:]) != tuple(shape):
        return other, None, f"{other} images are {tuple(x.shape[1:])}, the model's are {tuple(shape)}; skipped"
    return other, x, ""


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalOptions:
    """What to measure and how (filled from the command line)."""

    metrics: tuple[str, ...] = METRICS
    epsilon: float = 8.0
    batch_size: int = 500
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    occlusion_steps: int = 8
    lams: tuple[float, ...] = DEFAULT_LAMS
    ece_bins: int = 15
    cam_threshold: float = 0.15
    iou_threshold: float = 0.5
    ood_size: int | None = None
    data_dir: str | None = None


def _pixel_batches(x_u8: torch.Tensor, y: torch.Tensor | None, batch_size: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, slice]]:
    """(pixels in [0, 1] on `device`, labels, slice of the test set) per batch of a uint8 tensor."""
    for s in range(0, x_u8.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        yield x_u8[sl].to(device).float().div_(255), (None if y is None else y[sl].to(device)), sl


def pixel_test_batches(data: TensorData | FolderData, batch_size: int,
                       device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, slice]]:
    """The test set in order as unnormalised pixels: from memory for TensorData, through a DataLoader
    (uint8 images, as `FolderData` decodes them) for image folders."""
    if isinstance(data, TensorData):
        yield from _pixel_batches(data.test_x, data.test_y, batch_size, device)  # type: ignore[misc]
        return
    from torch.utils.data import DataLoader
    start = 0
    for x, y in DataLoader(data.test_set, batch_size=batch_size, shuffle=False, num_workers=data.workers):
        yield x.to(device).float().div_(255), y.to(device), slice(start, start + x.shape[0])
        start += x.shape[0]


def _maxsoftmax(model: nn.Module, x_u8: torch.Tensor, normalize: M.Normalize, opts: EvalOptions) -> torch.Tensor:
    with torch.no_grad():
        out = [F.softmax(model(normalize(x)).float(), 1).amax(1).cpu()
               for x, _, _ in _pixel_batches(x_u8, None, opts.batch_size, opts.device)]
    return torch.cat(out)


def _noise_scores(model: nn.Module, kind: str, n: int, shape: Sequence[int], normalize: M.Normalize,
                  opts: EvalOptions) -> torch.Tensor:
    g = torch.Generator().manual_seed(EVAL_SEED + (1 if kind == "uniform" else 2))
    out = []
    with torch.no_grad():
        for s in range(0, n, opts.batch_size):
            x = M.ood_noise(kind, min(opts.batch_size, n - s), shape, g).to(opts.device)
            out.append(F.softmax(model(normalize(x)).float(), 1).amax(1).cpu())
    return torch.cat(out)


def _pct(t: torch.Tensor | float) -> float:
    return 100.0 * float(t)


def evaluate_model(model: nn.Module, data: TensorData | FolderData, normalize: M.Normalize,
                   opts: EvalOptions) -> dict[str, Any]:
    """Every requested metric of one model on `data`'s test set; numbers in %. Returns the report body.

    One pass over the test set: each batch is scored clean, under FGSM, under every occlusion and
    every in-between mix (so image folders are decoded once), then the OOD sets are scored.
    """
    t0 = time.perf_counter()
    want = set(opts.metrics)
    notes: list[str] = []
    dev = opts.device
    n = data.num_test
    shape = tuple(data.input_size)
    H, W = shape[-2:]
    eps = opts.epsilon / 255.0
    sizes = M.occlusion_sizes(max(H, W), opts.occlusion_steps)
    boxes = getattr(data, "test_boxes", None)
    if "localization" in want and (boxes is None or boxes.shape[0] != n):
        notes.append(f"localization skipped: {data.name} has no ground-truth boxes (use --dataset {LOC_NAME})")
        want.discard("localization")
    if "inbetween" in want and data.num_classes < 2:
        notes.append("inbetween skipped: needs at least two classes")
        want.discard("inbetween")

    correct = torch.zeros(n, dtype=torch.bool)
    conf = torch.zeros(n)
    nll = 0.0
    fgsm_correct = 0
    occ = {m: torch.zeros(len(sizes), dtype=torch.float64) for m in ("center", "boundary")}
    kinds = {"cutmix": M.cutmix_center, "mixup": M.mixup}
    inb = {k: {"major": torch.zeros(len(opts.lams), dtype=torch.float64),
               "either": torch.zeros(len(opts.lams), dtype=torch.float64), "share_a": [0.0] * len(opts.lams)}
           for k in kinds}
    pair_gen = torch.Generator().manual_seed(EVAL_SEED)
    loc_pred_boxes, loc_true_boxes, loc_pred = [], [], []
    y_all = torch.zeros(n, dtype=torch.long)

    for x, y, sl in pixel_test_batches(data, opts.batch_size, dev):
        y_all[sl] = y.cpu()
        if "localization" in want and sl.start == 0:
            reason = M.cam_supported(model, normalize(x[:4]))
            if reason:
                notes.append(f"localization skipped: {reason}")
                want.discard("localization")
        with torch.no_grad():
            logits = model(normalize(x)).float()
            prob = F.softmax(logits, 1)
            c, pred = prob.max(1)
            correct[sl], conf[sl] = (pred == y).cpu(), c.cpu()
            nll += float(F.cross_entropy(logits, y, reduction="sum"))
        if "fgsm" in want:
            x_adv = M.fgsm(model, x, y, eps, normalize)
            with torch.no_grad():
                fgsm_correct += int((model(normalize(x_adv)).argmax(1) == y).sum())
        if "occlusion" in want:
            with torch.no_grad():
                for mode in ("center", "boundary"):
                    for i, s in enumerate(sizes):
                        untouched = (s == 0) if mode == "center" else (s >= max(H, W))
                        p_occ = pred if untouched else model(normalize(M.occlude(x, s, mode))).argmax(1)
                        occ[mode][i] += int((p_occ == y).sum())
        if "inbetween" in want:
            partner = M.partner_indices(y, pair_gen)
            xb, yb = x[partner], y[partner]
            with torch.no_grad():
                for kind, fn in kinds.items():
                    for i, lam in enumerate(opts.lams):
                        xm, share = fn(x, xb, lam)
                        # the pure images (share 1 or 0) were already scored by the clean pass
                        p_mix = pred if share == 1.0 else pred[partner] if share == 0.0 else model(normalize(xm))
                        if p_mix.dim() == 1:
                            p_mix = F.one_hot(p_mix, logits.shape[1])
                        major, either = M.inbetween_correct(p_mix, y, yb, share)
                        inb[kind]["major"][i] += int(major.sum())
                        inb[kind]["either"][i] += int(either.sum())
                        inb[kind]["share_a"][i] = share
        if "localization" in want:
            with torch.no_grad():
                logits_c, (cam_pred, cam_true) = M.class_activation_maps(model, normalize(x), [pred, y])
            loc_pred_boxes.append(M.cam_boxes(cam_pred.cpu(), opts.cam_threshold))
            loc_true_boxes.append(M.cam_boxes(cam_true.cpu(), opts.cam_threshold))
            loc_pred.append(logits_c.argmax(1).cpu())

    rep: dict[str, Any] = {"test_size": n, "clean_acc": _pct(correct.double().mean())}
    if "fgsm" in want:
        rep["fgsm"] = {"epsilon_255": opts.epsilon, "acc": _pct(fgsm_correct / n)}
    if "occlusion" in want:
        rep["occlusion"] = {"sizes": sizes, "side": max(H, W)}
        for mode in ("center", "boundary"):
            curve = (100 * occ[mode] / n).tolist()
            rep["occlusion"][mode], rep["occlusion"][f"{mode}_mean"] = curve, statistics.fmean(curve)
    if "inbetween" in want:
        rep["inbetween"] = {"lams": list(opts.lams), "score": "top-1 == label of the larger part (A if share_a >= 0.5)"}
        for kind in kinds:
            major = (100 * inb[kind]["major"] / n).tolist()
            rep["inbetween"][kind] = {"share_a": inb[kind]["share_a"], "major": major,
                                      "either": (100 * inb[kind]["either"] / n).tolist(),
                                      "major_mean": statistics.fmean(major)}
    if "calibration" in want:
        rep["calibration"] = {"ece": _pct(M.expected_calibration_error(conf, correct, opts.ece_bins)),
                              "bins": opts.ece_bins, "nll": nll / n, "mean_confidence": _pct(conf.double().mean())}
    if "ood" in want:
        m = opts.ood_size or min(n, 10000)
        sets: dict[str, torch.Tensor] = {k: _noise_scores(model, k, m, shape, normalize, opts)
                                         for k in ("uniform", "gaussian")}
        other, ox, note = load_other_dataset(data.name, opts.data_dir, shape)
        skipped = {}
        if ox is not None:
            pick = torch.randperm(ox.shape[0], generator=torch.Generator().manual_seed(EVAL_SEED))[:m]
            sets[other] = _maxsoftmax(model, ox[pick], normalize, opts)
        else:
            notes.append(f"ood: {note}")
            if other:
                skipped[other] = note
        res = {k: {"auroc": _pct(M.auroc(conf, s)), "tnr_at_tpr95": _pct(M.tnr_at_tpr(conf, s, 0.95)),
                   "detection_acc": _pct(M.detection_accuracy(conf, s)), "n": int(s.numel())} for k, s in sets.items()}
        mean = {key: statistics.fmean(r[key] for r in res.values())
                for key in ("auroc", "tnr_at_tpr95", "detection_acc")}
        rep["ood"] = {"detector": "max softmax", "in_dist": data.name, "sets": res, "mean": mean, "skipped": skipped}
    if "localization" in want:
        pb, tb, pr = torch.cat(loc_pred_boxes), torch.cat(loc_true_boxes), torch.cat(loc_pred)
        iou_pred, iou_true = M.box_iou(pb, boxes), M.box_iou(tb, boxes)
        hit = iou_pred >= opts.iou_threshold
        rep["localization"] = {
            "top1_loc": _pct(((pr == y_all) & hit).double().mean()),
            "gt_known": _pct((iou_true >= opts.iou_threshold).double().mean()),
            "mean_iou_gt_known": float(iou_true.mean()),
            "chance_gt_known": _pct(chance_gt_known(boxes, torch.Generator().manual_seed(EVAL_SEED),
                                                    opts.iou_threshold)),
            "cam_threshold": opts.cam_threshold, "iou_threshold": opts.iou_threshold}
    rep["notes"] = notes
    rep["eval_time_s"] = time.perf_counter() - t0
    return rep


# ------------------------------------------------------------------------------------------ writing
def summary_row(report: dict[str, Any]) -> dict[str, Any]:
    """The scalars of one report that the comparison shows (missing metrics left out)."""
    row: dict[str, Any] = {"label": report["label"], "setting": report["setting"].get("name"),
                           "layer": report["setting"].get("layer"), "seed": report.get("seed")}
    for key, (_, path) in SUMMARY_KEYS.items():
        v: Any = report
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            row[key] = v
    return row


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else ("–" if v is None else str(v))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path, plots: bool) -> None:
    """report.json and report.md (and this checkpoint's plots) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    s = report["setting"]
    md = [f"# {report['label']}", "",
          f"`{report['checkpoint']}`: {report['model']}, setting {s.get('name')} (layer {s.get('layer')}, alpha "
          f"{s.get('alpha', '–')}, variant {s.get('variant', '–')}), seed {report.get('seed')}; evaluated on "
          f"{report['dataset']} ({report['test_size']} test images) in {report['eval_time_s']:.0f} s. "
          "Numbers are %.", "",
          _md_table(["metric", "value"], [[SUMMARY_KEYS[k][0], v] for k, v in summary_row(report).items()
                                          if k in SUMMARY_KEYS])]
    if "fgsm" in report:
        md += ["", f"FGSM: eps = {report['fgsm']['epsilon_255']:g}/255 in pixel space, one step, clipped to [0, 1]."]
    if "occlusion" in report:
        o = report["occlusion"]
        md += ["", "## Occlusion (top-1 accuracy)", "",
               _md_table(["hole side s", "center (hole black)", "boundary (outside black)"],
                         list(zip(o["sizes"], o["center"], o["boundary"])))]
    if "inbetween" in report:
        ib = report["inbetween"]
        md += ["", "## In-between samples", "", f"Score: {ib['score']}; *either*: top-1 is one of the two labels.", "",
               _md_table(["lam", "CutMix share of A", "CutMix acc", "CutMix either", "Mixup acc", "Mixup either"],
                         [[lam, ib["cutmix"]["share_a"][i], ib["cutmix"]["major"][i], ib["cutmix"]["either"][i],
                           ib["mixup"]["major"][i], ib["mixup"]["either"][i]] for i, lam in enumerate(ib["lams"])])]
    if "ood" in report:
        o = report["ood"]
        md += ["", f"## OOD detection (max softmax; in-distribution: {o['in_dist']} test set)", "",
               _md_table(["OOD set", "n", "AUROC", "TNR at TPR 95%", "detection acc"],
                         [[k, r["n"], r["auroc"], r["tnr_at_tpr95"], r["detection_acc"]] for k, r in o["sets"].items()]
                         + [["mean", "", o["mean"]["auroc"], o["mean"]["tnr_at_tpr95"], o["mean"]["detection_acc"]]])]
    if "calibration" in report:
        c = report["calibration"]
        md += ["", f"Calibration: ECE ({c['bins']} bins) {c['ece']:.2f}%, NLL {c['nll']:.4f}, mean confidence "
                   f"{c['mean_confidence']:.2f}% (clean accuracy {report['clean_acc']:.2f}%)."]
    if "localization" in report:
        lo = report["localization"]
        md += ["", f"Localisation: top-1 loc {lo['top1_loc']:.2f}%, GT-known {lo['gt_known']:.2f}% (chance, "
                   f"another image's box: {lo['chance_gt_known']:.2f}%), mean IoU (GT class) "
                   f"{lo['mean_iou_gt_known']:.3f}; CAM threshold {lo['cam_threshold']} x max, "
                   f"IoU >= {lo['iou_threshold']}."]
    if report.get("notes"):
        md += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    if plots:
        if "occlusion" in report:
            plot_occlusion({report["setting"].get("name"): [report]}, out / "occlusion.png")
        if "inbetween" in report:
            plot_inbetween({report["setting"].get("name"): [report]}, out / "inbetween.png")


def _setting_key(reports: Sequence[dict[str, Any]]) -> tuple:
    layer = reports[0]["setting"].get("layer")
    name = reports[0]["setting"].get("name") or ""
    if layer is None:
        return (0, 0, "" if name == "baseline" else name)
    if isinstance(layer, int):
        return (1, layer, name)
    return (2, 0, name)


def group_by_setting(reports: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Reports per setting name, the baseline first, then by layer index, then the rest by name."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        groups.setdefault(r["setting"].get("name") or r["label"], []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: _setting_key(kv[1])))


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def _pm(ms: tuple[float, float], sign: bool = False) -> str:
    m, s = ms
    if m != m:
        return "–"
    head = f"{m:+.2f}" if sign else f"{m:.2f}"
    return head if s != s else f"{head} ± {s:.2f}"


def write_comparison(reports: Sequence[dict[str, Any]], out: Path, plots: bool) -> str:
    """comparison.md / .csv / _by_setting.csv and the cross-checkpoint plots; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    groups = group_by_setting(reports)
    by_seed = lambda r: (r.get("seed") is None, r.get("seed"))  # noqa: E731
    rows = [summary_row(r) for g in groups.values() for r in sorted(g, key=by_seed)]
    keys = [k for k in SUMMARY_KEYS if any(k in r for r in rows)]
    cols = ["label", "setting", "layer", "seed"] + keys
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    agg_rows, by_csv = [], []
    base = groups.get("baseline")
    base_by_seed = {r.get("seed"): summary_row(r) for r in base} if base else {}
    delta_rows = []
    for name, g in groups.items():
        srows = [summary_row(r) for r in g]
        stats = {k: _mean_std([r[k] for r in srows if k in r]) for k in keys}
        agg_rows.append([name, srows[0]["layer"], len(g)] + [_pm(stats[k]) for k in keys])
        by_csv.append({"setting": name, "layer": srows[0]["layer"], "n": len(g),
                       **{f"{k}_mean": stats[k][0] for k in keys}, **{f"{k}_std": stats[k][1] for k in keys}})
        if base and name != "baseline":
            paired = [r for r in srows if r["seed"] in base_by_seed]
            if paired:
                d = {k: _mean_std([r[k] - base_by_seed[r["seed"]][k] for r in paired
                                   if k in r and k in base_by_seed[r["seed"]]]) for k in keys}
                delta_rows.append([name, len(paired)] + [_pm(d[k], sign=True) for k in keys])
    with open(out / "comparison_by_setting.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(by_csv[0]))
        w.writeheader()
        w.writerows(by_csv)
    titles = [SUMMARY_KEYS[k][0] for k in keys]
    table = _md_table(["setting", "layer", "n"] + titles, agg_rows)
    first = reports[0]
    subset = ", a fixed subset" if first.get("test_subset") else ""
    eps = f"; FGSM eps {first['fgsm']['epsilon_255']:g}/255" if "fgsm" in first else ""
    md = ["# Evaluation: robustness, in-between samples, OOD, calibration, localisation", "",
          f"{len(reports)} checkpoint(s) of {first['model']} on {first['dataset']} ({first['test_size']} test "
          f"images{subset}){eps}. All numbers are %, mean ± sample std over seeds (no ± with one seed). Higher is "
          "better except ECE.", "",
          "## By setting", "", table]
    if delta_rows:
        md += ["", "## Difference to the baseline of the same seed (paired; positive = higher than baseline)", "",
               _md_table(["setting", "pairs"] + titles, delta_rows)]
    per_ckpt = [[r["label"], r["setting"], r["seed"]] + [r.get(k) for k in keys] for r in rows]
    md += ["", "## Per checkpoint", "", _md_table(["checkpoint", "setting", "seed"] + titles, per_ckpt)]
    md += ["", "Columns: clean = top-1 accuracy; FGSM = accuracy under one-step FGSM; occlusion = mean accuracy over "
               "the hole-size grid (per-size curves in each report and occlusion.png); in-between = accuracy against "
               "the label of the larger part, mean over lam (inbetween.png); OOD = max-softmax detector, mean over "
               "the OOD sets; ECE = 15-bin expected calibration error; loc = CAM boxes with IoU >= 0.5 (top-1: and "
               "class correct)."]
    notes = sorted({n for r in reports for n in r.get("notes", [])})
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out / "comparison.md").write_text("\n".join(md) + "\n")
    if plots:
        if any("occlusion" in r for r in reports):
            plot_occlusion(groups, out / "occlusion.png")
        if any("inbetween" in r for r in reports):
            plot_inbetween(groups, out / "inbetween.png")
    return table


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _curve(ax, x: Sequence[float], ys: list[list[float]], label: str, color: str) -> None:
    t = torch.tensor(ys, dtype=torch.float64)
    m = t.mean(0)
    ax.plot(x, m.tolist(), marker="o", ms=3, label=f"{label} (n={len(ys)})", color=color)
    if len(ys) > 1:
        sd = t.std(0)
        ax.fill_between(x, (m - sd).tolist(), (m + sd).tolist(), alpha=0.15, color=color, lw=0)


def _plot_two_panels(groups: dict[str, list[dict[str, Any]]], path: Path, metric: str, xs_key: str,
                     panels: tuple[tuple[str, str], ...], value: Callable[[dict[str, Any], str], list[float]],
                     xlabel: str, ylabel: str) -> Path:
    """One figure, two panels (one per ``(panel key, title)``), one mean ± std line per setting."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharey=True)
    for i, (name, g) in enumerate(groups.items()):
        g = [r for r in g if metric in r]
        if not g:
            continue
        for ax, (key, _) in zip(axes, panels):
            _curve(ax, g[0][metric][xs_key], [value(r[metric], key) for r in g], name, f"C{i % 10}")
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_occlusion(groups: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Accuracy vs hole side, center and boundary occlusion side by side, one line per setting (mean, ±std band)."""
    return _plot_two_panels(groups, path, "occlusion", "sizes",
                            (("center", "occlusion: center (hole zeroed)"),
                             ("boundary", "occlusion: boundary (outside zeroed)")),
                            lambda m, key: m[key], "hole side s (pixels)", "top-1 accuracy (%)")


def plot_inbetween(groups: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Accuracy on CutMix-ed and Mixup-ed pairs vs lam (label of the larger part), one line per setting."""
    return _plot_two_panels(groups, path, "inbetween", "lams",
                            (("cutmix", "in-between samples: CutMix-ed pairs"),
                             ("mixup", "in-between samples: Mixup-ed pairs")),
                            lambda m, key: m[key]["major"], "lam (share of image A)",
                            "top-1 acc vs label of larger part (%)")


# ------------------------------------------------------------------------------------------ CLI
def _metric_list(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}; choose from {','.join(METRICS)}")
    return names


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every option's default."""


def build_parser() -> argparse.ArgumentParser:
    """Every option of `python -m experiments.evaluate` (see the module docstring for the metrics)."""
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                                formatter_class=_HelpFormatter)
    src = p.add_argument_group("what to evaluate (either --ckpt, or --model with --weights and --dataset)")
    src.add_argument("--ckpt", nargs="+", metavar="PATH",
                     help="checkpoint files, or directories: a study's --out dir or its ckpt/ dir (every *.pt in it)")
    src.add_argument("--model", help="a timm model name (with --weights): any timm model, or featmix's "
                                     "resnet8_cifar, ...")
    src.add_argument("--weights", help="a state_dict file for --model (or a dict holding it under "
                                       "model_state/state_dict)")
    src.add_argument("--model-kwargs", nargs="+", type=model_kwarg, default=[], metavar="KEY=VALUE",
                     help="extra timm.create_model keyword arguments for --model")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="evaluate on this dataset instead of the checkpoint's: one of "
                                     f"{', '.join(DATASETS)}, or {LOC_NAME} (generated boxes, for localization)")
    d.add_argument("--data-dir", default=os.environ.get("FEATMIX_DATA"),
                   help="where datasets live (as for the studies; env FEATMIX_DATA); also searched for MNIST's "
                        "t10k idx files, the OOD set for Fashion-MNIST")
    d.add_argument("--test-subset", type=int, metavar="N",
                   help="evaluate on a fixed class-balanced subset of N test images (the studies' subset seed); "
                        "default: the whole test set")
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics", type=_metric_list, default=METRICS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all that apply; localization "
                        "only applies to datasets with boxes)")
    m.add_argument("--epsilon", type=float, default=8.0, help="FGSM step in pixel units over 255 (8 means 8/255)")
    m.add_argument("--occlusion-steps", type=int, default=8,
                   help="occlusion hole sides: this many equal steps from 0 to the image side")
    m.add_argument("--lams", type=float, nargs="+", default=list(DEFAULT_LAMS), metavar="LAM",
                   help="in-between mixing ratios (share of image A)")
    m.add_argument("--ece-bins", type=int, default=15, help="equal-width confidence bins for ECE")
    m.add_argument("--cam-threshold", type=float, default=0.15, help="CAM threshold, a fraction of the map's max")
    m.add_argument("--ood-size", type=int, metavar="N",
                   help="images per OOD set (default: the test-set size, at most 10,000)")
    h = p.add_argument_group("hardware and output")
    h.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    h.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    h.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    h.add_argument("--image-size", type=int, default=224,
                   help="crop size for imagefolder data with --weights (checkpoints carry their input size)")
    h.add_argument("--workers", type=int, default=4, help="DataLoader workers for imagefolder data")
    h.add_argument("--out", help="output directory (default: <study dir>/eval, or eval/ beside --weights)")
    h.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Evaluate every checkpoint given, write the reports and the comparison; returns the output dir."""
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.ckpt) == bool(args.model or args.weights):
        p.error("give either --ckpt PATH..., or --model NAME --weights FILE --dataset D")
    if args.model and not (args.weights and args.dataset):
        p.error("--model needs --weights FILE and --dataset D")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    opts = EvalOptions(metrics=tuple(args.metrics), epsilon=args.epsilon, batch_size=args.batch_size, device=device,
                       occlusion_steps=args.occlusion_steps, lams=tuple(args.lams), ece_bins=args.ece_bins,
                       cam_threshold=args.cam_threshold, ood_size=args.ood_size, data_dir=args.data_dir)

    if args.ckpt:
        paths = collect_checkpoints(args.ckpt)
        out = Path(args.out) if args.out else default_out(args.ckpt[0])
        targets: list[Any] = paths
    else:
        out = Path(args.out) if args.out else default_out(args.weights)
        targets = [None]
    cache: dict[tuple, Any] = {}
    reports: list[dict[str, Any]] = []
    labels: set[str] = set()
    t_all = time.perf_counter()
    for i, item in enumerate(targets, 1):
        if item is None:
            probe = load_eval_data(args.dataset, args.data_dir, args.test_subset, args.image_size,
                                   workers=args.workers)
            target = target_from_weights(args.model, args.weights, args.dataset, probe.num_classes, probe.in_chans,
                                         dict(args.model_kwargs))
            target.input_size = tuple(probe.input_size)
        else:
            target = load_checkpoint(item)
        ds_name = args.dataset or target.dataset
        if not ds_name:
            raise SystemExit(f"{target.path}: the checkpoint names no dataset; pass --dataset")
        key = (ds_name, target.in_chans, target.input_size, target.num_classes if ds_name == LOC_NAME else None)
        if key not in cache:
            size = target.input_size[-1] if target.input_size else (args.image_size if ds_name.startswith(
                "imagefolder:") else 32)
            cache[key] = load_eval_data(ds_name, args.data_dir, args.test_subset, size, target.in_chans,
                                        target.num_classes, args.workers).to(device)
        data = cache[key]
        if data.in_chans != target.in_chans:
            raise SystemExit(f"{target.path}: the model takes {target.in_chans} channels, "
                             f"{ds_name} has {data.in_chans}")
        # the model's own input convention (its training data's statistics) whatever it is evaluated on
        mean, std = target.mean or data.mean, target.std or data.std
        mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

        def normalize(x: torch.Tensor, mean_t: torch.Tensor = mean_t, std_t: torch.Tensor = std_t) -> torch.Tensor:
            return (x - mean_t) / std_t

        model = target.build().to(device)
        label = target.label if target.label not in labels else f"{target.label}_{i}"
        labels.add(label)
        print(f"[{i}/{len(targets)}] {label}: {target.model} on {ds_name} ({data.num_test} test images) ...",
              flush=True)
        body = evaluate_model(model, data, normalize, opts)
        report = {"label": label, "checkpoint": str(target.path), "model": target.model,
                  "model_kwargs": target.model_kwargs,
                  "setting": target.setting, "seed": target.seed, "dataset": ds_name, "test_subset": args.test_subset,
                  "normalization": {"mean": list(mean), "std": list(std)}, "metrics_requested": list(opts.metrics),
                  "train_metrics": target.train_metrics, "device": str(device), **body}
        write_report(report, out / label, plots=not args.no_plots)
        reports.append(report)
        print(f"    clean {report['clean_acc']:.2f}%"
              + (f", FGSM {report['fgsm']['acc']:.2f}%" if "fgsm" in report else "")
              + (f", OOD AUROC {report['ood']['mean']['auroc']:.2f}" if "ood" in report else "")
              + (f", GT-known loc {report['localization']['gt_known']:.2f}%" if "localization" in report else "")
              + f" ({report['eval_time_s']:.0f} s)", flush=True)
        del model
    table = write_comparison(reports, out, plots=not args.no_plots)
    print("\n" + table + f"\n\n{len(reports)} checkpoint(s) in {time.perf_counter() - t_all:.0f} s; "
          f"reports and comparison.md in {out}")
    return out


if __name__ == "__main__":
    main()
