"""A study's options: the command line every study shares, its recipes, and the typed options it resolves to.

`StudyOptions` holds every option after the recipe, `--smoke` and the command line are applied (in that
order); a study adds its own options as fields of a subclass made with `study_option` (the field is the
option: flag, default, help). `measured_options` and `config_hash` name the configuration whose rows and
checkpoints a rerun may reuse.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from .cli import ArgumentParser, HelpFormatter, add_device_options, model_kwarg
from .data import DATASETS
from .engine import RunConfig
from .fast import COMPILE_BACKENDS, COMPILE_MODES

# fast: the CPU regime where CutMix has something to regularise (on data the network cannot overfit,
# short schedules are only hurt by it): a fixed 1,000-image class-balanced Fashion-MNIST subset trained
# for 40 epochs and evaluated once at the end, sized so the default depth ablation (12 runs) fits the
# README's CPU budget (its measured time is there). paper-cifar: the paper's run.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": dict(model="resnet8_cifar", dataset="fashion-mnist", train_subset=1000, test_subset=0, epochs=40,
                 batch_size=128, lr=0.2, wd=5e-4, schedule="onecycle", cutmix_prob=0.5, alpha=1.0,
                 seeds=[0, 1], eval_every=40),
    "paper-cifar": dict(model="pyramidnet200_a240", dataset="cifar100", train_subset=0, test_subset=0, epochs=300,
                        batch_size=64, lr=0.25, wd=1e-4, schedule="step", cutmix_prob=0.5, alpha=1.0,
                        seeds=[0, 1, 2], eval_every=1),
}
SMOKE = dict(epochs=1, train_subset=256, test_subset=500, seeds=[0], eval_every=1)
SUBSET_SEED = 1234  # fixed: every seed and setting trains on the same subset
# Options that do not change what is measured (only how fast) and so may differ on resume.
_SPEED_ONLY = {"eval_batch_size", "channels_last", "compile", "compile_mode", "compile_backend"}


def _recipe(key: str, text: str) -> str:
    """Help text of a recipe-filled option, with each recipe's value."""
    values = "; ".join(f"{r}: {v[key] if v[key] != 0 or 'subset' not in key else 'all'}" for r, v in RECIPES.items())
    return f"{text} ({values})"

def build_parser(study: str, description: str) -> argparse.ArgumentParser:
    """The options every study takes; a study adds its own (layers, alphas, ...) before parsing."""
    p = ArgumentParser(prog=f"python -m experiments.{study}", description=description, formatter_class=HelpFormatter)
    r = p.add_argument_group("recipe (options left unset take the recipe's value)")
    r.add_argument("--recipe", choices=sorted(RECIPES), default="fast",
                   help="fast: ResNet-8 on a 1k-image Fashion-MNIST subset, minutes on a CPU; paper-cifar: "
                        "PyramidNet-200 (a240) on CIFAR-100, 300 epochs, the paper's schedule")
    r.add_argument("--smoke", action="store_true",
                   help=f"tiny run for CI (<1 min): {SMOKE}, output in runs/<study>-smoke")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", help=_recipe("model", "any timm model name (featmix's models: resnet8_cifar, "
                                                    "resnet20_cifar, pyramidnet200_a240, ...)"))
    m.add_argument("--model-kwargs", nargs="+", type=model_kwarg, default=[], metavar="KEY=VALUE",
                   help="extra keyword arguments for timm.create_model, e.g. width=32 drop_rate=0.1")
    m.add_argument("--dataset",
                   help=_recipe("dataset", f"one of {', '.join(DATASETS)} (synthetic: tiny data for tests)"))
    m.add_argument("--data-dir", default=os.environ.get("FEATMIX_DATA"),
                   help="where datasets live or are downloaded to (Fashion-MNIST is also looked up in "
                        "/usr/share/datasets/fashion-mnist; default for downloads: ./data; env FEATMIX_DATA)")
    m.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    m.add_argument("--train-subset", type=int, metavar="N",
                   help=_recipe("train_subset", "train on a fixed class-balanced subset of N images (0: all)"))
    m.add_argument("--test-subset", type=int, metavar="N",
                   help=_recipe("test_subset", "evaluate on a fixed class-balanced subset of N test images (0: all)"))
    m.add_argument("--image-size", type=int, default=224, help="crop size for imagefolder datasets")
    m.add_argument("--workers", type=int, default=4, help="DataLoader workers for imagefolder datasets")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help=_recipe("epochs", "training epochs"))
    t.add_argument("--batch-size", type=int, help=_recipe("batch_size", "global batch size (split over DDP ranks)"))
    t.add_argument("--eval-batch-size", type=int, default=500, help="test batch size")
    t.add_argument("--lr", type=float, help=_recipe("lr", "peak learning rate (SGD, nesterov momentum)"))
    t.add_argument("--wd", type=float, help=_recipe("wd", "weight decay"))
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (nesterov when > 0)")
    t.add_argument("--schedule", choices=["onecycle", "step", "cosine"],
                   help=_recipe("schedule", "lr schedule; step = /10 at 50%% and 75%% of the epochs"))
    t.add_argument("--cutmix-prob", type=float, help=_recipe("cutmix_prob", "probability that a batch is mixed"))
    t.add_argument("--alpha", type=float,
                   help=_recipe("alpha", "lam ~ Beta(alpha, alpha) (for settings that do not vary it)"))
    t.add_argument("--label-smoothing", type=float, default=0.0,
                   help="smoothing of the one-hot labels (before mixing)")
    t.add_argument("--seeds", type=int, nargs="+",
                   help=_recipe("seeds", "seed k is shared by every setting (paired comparison)"))
    t.add_argument("--eval-every", type=int, metavar="E",
                   help=_recipe("eval_every", "evaluate every E epochs (and after the last)"))
    _add_speed_options(p)
    o = p.add_argument_group("output and long runs")
    o.add_argument("--out", help="output directory (default runs/<study>, or runs/<study>-smoke)")
    o.add_argument("--max-minutes", type=float, metavar="M",
                   help="stop at the first epoch boundary where the next epoch would end past M minutes, state "
                        "saved (exit status 3); the same command resumes (default: no limit)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a TTY)")
    o.add_argument("--debug", action="store_true", help="show the traceback behind an error message")
    return p


def _switch(group: Any, name: str, text: str) -> None:
    """--NAME / --no-NAME sharing one destination, unset (None) unless given: the device decides."""
    dest = name.replace("-", "_")
    group.add_argument(f"--{name}", dest=dest, action="store_true", default=None,
                       help=f"{text} (default: on with CUDA, off on a CPU)")
    group.add_argument(f"--no-{name}", dest=dest, action="store_false", default=None, help=f"turn --{name} off")


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    """Device, threads, the CUDA fast path (each switch with its opt-out) and --jobs."""
    s = p.add_argument_group("hardware and speed")
    add_device_options(s)
    _switch(s, "amp", "autocast to bf16 (fp16 + grad scaling on GPUs without bf16)")
    _switch(s, "channels-last", "channels_last memory format")
    _switch(s, "compile", "torch.compile the model, once per model structure and batch shape")
    s.add_argument("--compile-mode", choices=COMPILE_MODES, default="auto",
                   help="torch.compile mode; auto is reduce-overhead (CUDA graphs) on one CUDA device, inductor's "
                        "plain mode under torchrun or on a CPU")
    s.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                   help="torch.compile backend (aot_eager or eager: check the graphs without inductor)")
    s.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N (setting, seed) runs at once, each in its own process: all on one GPU, one per GPU "
                        "round-robin when several are visible, or splitting the CPU threads; same numbers as one by "
                        "one (not under torchrun)")



@dataclass
class StudyOptions:
    """Every option of a study. Recipe-filled fields (None here) hold the recipe's value after `resolve`;
    `amp`, `channels_last` and `compile` stay None until the device decides (`study.apply_fast_defaults`)."""

    recipe: str = "fast"
    smoke: bool = False
    # model and data
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    image_size: int = 224
    workers: int = 4
    # training
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 500
    lr: float | None = None
    wd: float | None = None
    momentum: float = 0.9
    schedule: str | None = None
    cutmix_prob: float | None = None
    alpha: float | None = None
    label_smoothing: float = 0.0
    seeds: list[int] | None = None
    eval_every: int | None = None
    # hardware and speed
    device: str = "auto"
    threads: int | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    compile_mode: str = "auto"
    compile_backend: str = "inductor"
    jobs: int = 1
    # output and long runs
    out: str | None = None
    max_minutes: float | None = None
    no_progress: bool = False
    debug: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The options that are set, as plain data (config.json, checkpoints)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def study_option(flag: str, default: Any, **argparse_kwargs: Any) -> Any:
    """A study's own option as a dataclass field: `flag` with `default` and argparse's keyword arguments."""
    meta = {"flag": flag, "argparse": {**argparse_kwargs, "default": default}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def own_options(options_type: type[StudyOptions]) -> list[Field]:
    """The fields `options_type` adds to `StudyOptions` with `study_option` (they are its extra flags)."""
    return [f for f in fields(options_type) if "flag" in f.metadata]


def study_parser(study: str, description: str, options_type: type[StudyOptions] = StudyOptions) -> ArgumentParser:
    """`build_parser` plus the study's own options (the `study_option` fields of `options_type`)."""
    p = build_parser(study, description)
    for f in own_options(options_type):
        p.add_argument(f.metadata["flag"], dest=f.name, **f.metadata["argparse"])
    return p


def resolve(args: argparse.Namespace, options_type: type[StudyOptions] = StudyOptions) -> StudyOptions:
    """Recipe defaults <- --smoke <- explicit options -> the study's typed options."""
    values = dict(RECIPES[args.recipe])
    if args.smoke:
        values.update(SMOKE)
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("recipe", "smoke")})
    values.update(recipe=args.recipe, smoke=args.smoke, model_kwargs=dict(args.model_kwargs))
    known = {f.name for f in fields(options_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{options_type.__name__} has no field for the options {unknown}")
    return options_type(**values)


def run_config(opts: StudyOptions) -> RunConfig:
    """The RunConfig fields of the resolved options."""
    return RunConfig(**{f.name: getattr(opts, f.name) for f in fields(RunConfig)})


def measured_options(study: str, opts: StudyOptions) -> dict[str, Any]:
    """The options that define the measurements (not seeds, the settings list, output or speed switches)."""
    keys = [f.name for f in fields(RunConfig) if f.name not in _SPEED_ONLY]
    keys += ["train_subset", "test_subset", "image_size"]
    return {"study": study, "subset_seed": SUBSET_SEED, **{k: getattr(opts, k) for k in keys}}


def config_hash(study: str, opts: StudyOptions) -> str:
    """Fingerprint of `measured_options`: rows and checkpoints of another configuration are never reused."""
    blob = json.dumps(measured_options(study, opts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
