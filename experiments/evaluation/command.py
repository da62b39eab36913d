"""The paper's claims beyond top-1 error, measured on trained checkpoints: FGSM robustness, occlusion
robustness, in-between-class samples, CAM localisation, out-of-distribution detection and calibration.

    python -m experiments.evaluation --ckpt runs/depth_ablation            # every checkpoint of a study
    python -m experiments.evaluation --ckpt runs/depth_ablation --full     # the complete grids, every image
    python -m experiments.evaluation --ckpt a.pt b.pt --test-subset 2000 --metrics fgsm,ood
    python -m experiments.evaluation --model resnet50 --weights w.pth --dataset imagefolder:/data/cub
    python -m experiments.evaluation --ckpt runs/x/ckpt/baseline_seed0.pt --dataset synthetic-loc

Per checkpoint it writes <out>/<checkpoint>/report.json + report.md (+ occlusion.png, inbetween.png); across checkpoints
<out>/comparison.md, comparison.csv (one row per checkpoint), comparison_by_setting.csv (mean/std over
seeds) and the plots occlusion.png / inbetween.png, and prints the comparison table. Accuracies,
AUROC, TNR and ECE are percentages. Each measurement's definition is in its module under
experiments/evaluation/ (fgsm, occlusion, inbetween, ood, calibration, localization).

Default: clean accuracy, calibration, FGSM and OOD on the whole test set; occlusion and in-between on
coarser grids (hole sides in 4 steps; lam 0, 0.2, 0.5, 0.8, 1) over a fixed class-balanced subset of
2,000 test images. --full: the complete grids (8 steps; lam 0 to 1 by 0.1) on every test image.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..cli import HelpFormatter, add_device_options, model_kwarg, resolve_device, set_threads
from ..data import DATASETS, PixelNormalizer
from .base import DEFAULT_LAMS, EvalOptions
from .checkpoints import Target, collect_checkpoints, default_out, load_checkpoint, target_from_weights
from .report import write_comparison, write_report
from .runner import METRICS, evaluate_model
from .synthetic_loc import NAME as LOC_NAME
from .testsets import load_eval_data

# the grid measurements' settings: the default (minutes for a study) and --full (the complete grids)
GRIDS = {"default": {"occlusion_steps": 4, "lams": (0.0, 0.2, 0.5, 0.8, 1.0), "grid_images": 2000},
         "full": {"occlusion_steps": 8, "lams": DEFAULT_LAMS, "grid_images": 0}}


def _metric_list(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}; choose from {','.join(METRICS)}")
    return names


def _grid_help(key: str, text: str) -> str:
    return f"{text} (default {GRIDS['default'][key]}; --full: {GRIDS['full'][key]})"


def build_parser() -> argparse.ArgumentParser:
    """Every option of `python -m experiments.evaluation`."""
    p = argparse.ArgumentParser(prog="python -m experiments.evaluation", description=__doc__,
                                formatter_class=HelpFormatter)
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
    m.add_argument("--full", action="store_true",
                   help="the complete occlusion and in-between grids on every test image (slower: see docs/studies.md)")
    m.add_argument("--epsilon", type=float, default=8.0, help="FGSM step in pixel units over 255 (8 means 8/255)")
    m.add_argument("--occlusion-steps", type=int, help=_grid_help("occlusion_steps", "occlusion hole sides: this "
                                                                  "many equal steps from 0 to the image side"))
    m.add_argument("--lams", type=float, nargs="+", metavar="LAM",
                   help=_grid_help("lams", "in-between mixing ratios (share of image A)"))
    m.add_argument("--grid-images", type=int, metavar="N", help=_grid_help(
        "grid_images", "occlusion and in-between on a fixed class-balanced subset of N test images (0: all)"))
    m.add_argument("--ece-bins", type=int, default=15, help="equal-width confidence bins for ECE")
    m.add_argument("--cam-threshold", type=float, default=0.15, help="CAM threshold, a fraction of the map's max")
    m.add_argument("--ood-size", type=int, metavar="N",
                   help="images per OOD set (default: the test-set size, at most 10,000)")
    h = p.add_argument_group("hardware and output")
    add_device_options(h)
    h.add_argument("--batch-size", type=int, default=500, help="test images per batch (in-between pairs are drawn "
                                                               "within a batch)")
    h.add_argument("--forward-batch", type=int, help="images per model call (default 128 on CPU, 4096 on CUDA)")
    h.add_argument("--image-size", type=int, default=224,
                   help="crop size for imagefolder data with --weights (checkpoints carry their input size)")
    h.add_argument("--workers", type=int, default=4, help="DataLoader workers for imagefolder data")
    h.add_argument("--out", help="output directory (default: <study dir>/eval, or eval/ beside --weights)")
    h.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    h.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a TTY)")
    return p


def eval_options(args: argparse.Namespace, device: torch.device) -> EvalOptions:
    """The measurement options: explicit values, else --full's or the default grids."""
    grid = GRIDS["full" if args.full else "default"]
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in grid.items()}
    forward = args.forward_batch or (4096 if device.type == "cuda" else 128)
    return EvalOptions(metrics=tuple(args.metrics), epsilon=args.epsilon, batch_size=args.batch_size, device=device,
                       occlusion_steps=pick["occlusion_steps"], lams=tuple(pick["lams"]), ece_bins=args.ece_bins,
                       cam_threshold=args.cam_threshold, ood_size=args.ood_size, data_dir=args.data_dir,
                       forward_batch=forward, grid_images=pick["grid_images"])


class DataCache:
    """Test sets loaded once per (dataset, channels, input size[, classes]) and kept on the device."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.sets: dict[tuple, Any] = {}

    def for_target(self, target: Target, name: str) -> Any:
        """The test set `name` as `target`'s model takes it (size, channels; classes for synthetic-loc)."""
        a = self.args
        key = (name, target.in_chans, target.input_size, target.num_classes if name == LOC_NAME else None)
        if key not in self.sets:
            size = target.input_size[-1] if target.input_size else (
                a.image_size if name.startswith("imagefolder:") else 32)
            self.sets[key] = load_eval_data(name, a.data_dir, a.test_subset, size, target.in_chans,
                                            target.num_classes, a.workers).to(self.device)
        data = self.sets[key]
        if data.in_chans != target.in_chans:
            raise SystemExit(f"{target.path}: the model takes {target.in_chans} channels, {name} has {data.in_chans}")
        return data


def _target(item: Path | None, args: argparse.Namespace) -> Target:
    if item is not None:
        return load_checkpoint(item)
    probe = load_eval_data(args.dataset, args.data_dir, args.test_subset, args.image_size, workers=args.workers)
    target = target_from_weights(args.model, args.weights, args.dataset, probe.num_classes, probe.in_chans,
                                 dict(args.model_kwargs))
    target.input_size = tuple(probe.input_size)
    return target


def _one_line(report: dict[str, Any]) -> str:
    parts = [f"clean {report['clean_acc']:.2f}%"]
    parts += [f"FGSM {report['fgsm']['acc']:.2f}%"] if "fgsm" in report else []
    parts += [f"OOD AUROC {report['ood']['mean']['auroc']:.2f}"] if "ood" in report else []
    parts += [f"GT-known loc {report['localization']['gt_known']:.2f}%"] if "localization" in report else []
    return "    " + ", ".join(parts) + f" ({report['eval_time_s']:.0f} s)"


def evaluate_target(target: Target, label: str, data: Any, ds_name: str, opts: EvalOptions,
                    args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    """Build `target`'s model, run every measurement on `data` -> the full report (metadata + numbers)."""
    # the model's own input convention (its training data's statistics) whatever it is evaluated on
    mean, std = target.mean or data.mean, target.std or data.std
    model = target.build().to(opts.device)
    body = evaluate_model(model, data, PixelNormalizer(mean, std), opts, progress, label)
    return {"label": label, "checkpoint": str(target.path), "model": target.model, "model_kwargs": target.model_kwargs,
            "setting": target.setting, "seed": target.seed, "dataset": ds_name, "test_subset": args.test_subset,
            "normalization": {"mean": list(mean), "std": list(std)}, "metrics_requested": list(opts.metrics),
            "options": {"occlusion_steps": opts.occlusion_steps, "lams": list(opts.lams),
                        "grid_images": opts.grid_images, "full": args.full},
            "train_metrics": target.train_metrics, "device": str(opts.device), **body}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: either --ckpt, or --model with --weights and --dataset."""
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.ckpt) == bool(args.model or args.weights):
        p.error("give either --ckpt PATH..., or --model NAME --weights FILE --dataset D")
    if args.model and not (args.weights and args.dataset):
        p.error("--model needs --weights FILE and --dataset D")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Evaluate every checkpoint given, write the reports and the comparison; returns the output dir."""
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    opts = eval_options(args, device)
    items: list[Path | None] = collect_checkpoints(args.ckpt) if args.ckpt else [None]
    out = Path(args.out) if args.out else default_out(args.ckpt[0] if args.ckpt else args.weights)
    progress = not args.no_progress and sys.stderr.isatty()
    cache, reports, labels, t_all = DataCache(args, device), [], set(), time.perf_counter()
    for i, item in enumerate(items, 1):
        target = _target(item, args)
        ds_name = args.dataset or target.dataset
        if not ds_name:
            raise SystemExit(f"{target.path}: the checkpoint names no dataset; pass --dataset")
        data = cache.for_target(target, ds_name)
        label = target.label if target.label not in labels else f"{target.label}_{i}"
        labels.add(label)
        print(f"[{i}/{len(items)}] {label}: {target.model} on {ds_name} ({data.num_test} test images) ...", flush=True)
        report = evaluate_target(target, label, data, ds_name, opts, args, progress)
        write_report(report, out / label, plots=not args.no_plots)
        reports.append(report)
        print(_one_line(report), flush=True)
    table = write_comparison(reports, out, plots=not args.no_plots)
    print("\n" + table + f"\n\n{len(reports)} checkpoint(s) in {time.perf_counter() - t_all:.0f} s; "
          f"reports and comparison.md in {out}")
    return out
