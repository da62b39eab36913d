"""Studies fail fast: every option and every setting is checked before the first run trains.

`check_options` looks at the resolved options alone (numbers, the dataset name, the model name in timm's
registry, the data directory); `check_settings` builds the model once on the meta device (no memory, no
weights) and checks each setting against it: its layer with `featmix.resolve_layers`, its alpha, variant
and kind with `featmix.MixSampler`, the label smoothing and mixing probability. Every failure is a
`UsageError` naming the option, what it expects and what it got.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn as nn

import featmix
import models  # noqa: F401  (registers the CIFAR models with timm)

from .cli import UsageError
from .data import DATASETS
from .engine import Setting
from .options import StudyOptions

# the flag each Setting field comes from when a study does not say otherwise
DEFAULT_FLAGS = {"layer": "--layer", "alpha": "--alpha", "variant": "--variant", "kind": "--kind"}
_POSITIVE = {"epochs": "--epochs", "batch_size": "--batch-size", "eval_batch_size": "--eval-batch-size",
             "eval_every": "--eval-every", "jobs": "--jobs"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(_fmt, value))
    return str(value)


def check_numbers(opts: StudyOptions) -> None:
    """Counts are >= 1, rates are in range, seeds are given, --max-minutes is > 0."""
    for key, flag in _POSITIVE.items():
        v = getattr(opts, key)
        if v is not None and v < 1:
            raise UsageError(f"{flag}: expected an integer >= 1, got {v}")
    for key, flag in (("train_subset", "--train-subset"), ("test_subset", "--test-subset")):
        if (getattr(opts, key) or 0) < 0:
            raise UsageError(f"{flag}: expected N >= 0 (0: all images), got {getattr(opts, key)}")
    if not opts.seeds:
        raise UsageError("--seeds: expected at least one seed")
    if len(set(opts.seeds)) != len(opts.seeds):
        raise UsageError(f"--seeds: expected distinct seeds, got {_fmt(opts.seeds)}")
    for key, flag in (("lr", "--lr"), ("wd", "--wd"), ("momentum", "--momentum")):
        if getattr(opts, key) is not None and not getattr(opts, key) >= 0:
            raise UsageError(f"{flag}: expected a number >= 0, got {getattr(opts, key)}")
    if opts.max_minutes is not None and not opts.max_minutes > 0:
        raise UsageError(f"--max-minutes: expected minutes > 0, got {opts.max_minutes}")


def check_model_name(name: str) -> None:
    """The model is in timm's registry (featmix's CIFAR models included); hub names are left to timm."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"--model: {name!r} is not a model in timm's registry (timm {timm.__version__}, with featmix's "
                     f"resnet8_cifar, resnet20_cifar, pyramidnet200_a240, ...){hint} (list: timm.list_models())")


def check_data_options(opts: StudyOptions) -> None:
    """--dataset is a known name (or imagefolder:PATH with PATH present); an explicit --data-dir exists."""
    name = opts.dataset
    if name.startswith("imagefolder:"):
        root = name.split(":", 1)[1]
        if not os.path.isdir(root):
            raise UsageError(f"--dataset {name}: {root} is not a directory (expected {root}/train and {root}/val)")
    elif name not in DATASETS:
        raise UsageError(f"--dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    d = opts.data_dir
    if d and not opts.download and not os.path.isdir(d) and name not in ("synthetic",):
        raise UsageError(f"--data-dir: {d} is not a directory (pass --download to create it and fetch the data)")


def check_options(opts: StudyOptions) -> None:
    """Everything the resolved options alone decide, before any data is read."""
    check_numbers(opts)
    check_data_options(opts)
    check_model_name(opts.model)


def meta_model(opts: StudyOptions, num_classes: int, in_chans: int) -> nn.Module:
    """The study's model on the meta device (shapes only): what the settings are checked against."""
    kwargs = opts.model_kwargs or {}
    try:
        with torch.device("meta"):
            return timm.create_model(opts.model, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as e:  # a model's constructor can raise anything on bad keyword arguments
        given = " ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"
        raise UsageError(f"--model {opts.model} (--model-kwargs: {given}): timm.create_model failed: "
                         f"{type(e).__name__}: {e}") from e


def _setting_checks(s: Setting, opts: StudyOptions, model: nn.Module, num_classes: int,
                    flags: dict[str, str]) -> list[tuple[str, Any, Callable[[], Any]]]:
    """(flag, value, check) for each thing a mixing setting passes to featmix."""
    steps = 1 if s.variant == "scheduled" else None
    return [
        (flags["layer"], s.layer, lambda: featmix.resolve_layers(model, s.layer)),
        (flags["alpha"], s.alpha, lambda: featmix.MixSampler(alpha=s.alpha)),
        (flags["variant"], s.variant, lambda: featmix.MixSampler(variant=s.variant, total_steps=steps)),
        (flags["kind"], s.kind, lambda: featmix.MixSampler(kind=s.kind)),
        ("--cutmix-prob", opts.cutmix_prob, lambda: featmix.MixSampler(prob=opts.cutmix_prob)),
        ("--label-smoothing", opts.label_smoothing,
         lambda: featmix.CutMix(num_classes=num_classes, label_smoothing=opts.label_smoothing)),
    ]


def check_settings(opts: StudyOptions, settings: Sequence[Setting], num_classes: int, in_chans: int,
                   flags: dict[str, str] | None = None) -> None:
    """Check every setting against the study's model (built on the meta device) before any run trains."""
    flags = {**DEFAULT_FLAGS, **(flags or {})}
    model = meta_model(opts, num_classes, in_chans)
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise UsageError(f"settings: each must have its own name, got {', '.join(names)} (a value given twice?)")
    if not 0 <= opts.label_smoothing < 1:
        raise UsageError(f"--label-smoothing: expected a number in [0, 1), got {opts.label_smoothing}")
    for s in settings:
        if not s.mixes:
            continue
        for flag, value, check in _setting_checks(s, opts, model, num_classes, flags):
            try:
                check()
            except (ValueError, TypeError) as e:
                raise UsageError(f"{flag} {_fmt(value)} (setting {s.name!r}, model {opts.model}): {e}") from e
