"""What an evaluation loads: study checkpoints, or any timm model with a weights file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn


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
    """A study checkpoint (`experiments.study` format) -> a `Target`."""
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
    """A timm model name + a weights file (a state_dict, or a dict holding one) -> a `Target`."""
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
    """Files and directories (a study dir holding ckpt/, or a ckpt/ dir) -> their *.pt files, sorted, once each."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            d = p / "ckpt" if (p / "ckpt").is_dir() else p
            files = sorted(d.glob("*.pt"))
            if not files:
                raise FileNotFoundError(f"--ckpt {p}: no *.pt checkpoints in {d}")
            found += files
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"--ckpt {p}: no such checkpoint file or directory")
    return list(dict.fromkeys(found))


def default_out(first: str | os.PathLike) -> Path:
    """<study dir>/eval for a study dir, its ckpt/ dir or a checkpoint in it; else eval/ beside the file."""
    p = Path(first)
    if p.is_dir():
        return (p.parent if p.name == "ckpt" else p) / "eval"
    return (p.parent.parent if p.parent.name == "ckpt" else p.parent) / "eval"
