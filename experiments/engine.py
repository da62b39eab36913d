"""Train and evaluate one run: one model, one setting (baseline or CutMix somewhere), one seed.

Randomness is split into independent streams, each from its own seed derived from (seed, stream, rank):
initial weights, data order, augmentation and mixing. So seed k of the baseline and seed k of every
CutMix setting start from the same weights and see the same images, in the same order, with the same
crops and flips; only the mixing differs. That pairing is what lets the studies resolve small effects.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import featmix
import models  # noqa: F401  (registers the CIFAR models with timm)

from .data import FolderData, TensorData

# Random streams; the numbers are part of the experiment's definition, do not renumber.
INIT, ORDER, AUG, MIX, GLOBAL = range(5)


def derive_seed(seed: int, stream: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for one random stream of one rank (SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, stream, rank]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class Setting:
    """One column of a study: `layer=None` is the baseline (no mixing)."""

    name: str
    layer: int | str | list[int] | None = None
    alpha: float = 1.0
    variant: str = "cutmix"

    @property
    def mixes(self) -> bool:
        return self.layer is not None


@dataclass
class RunConfig:
    """Everything that defines a training run (filled from the recipe and the command line)."""

    model: str = "resnet8_cifar"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    epochs: int = 60
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 0.2
    wd: float = 5e-4
    momentum: float = 0.9
    schedule: str = "onecycle"
    cutmix_prob: float = 0.5
    alpha: float = 1.0
    label_smoothing: float = 0.0
    eval_every: int = 10
    amp: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def lr_factor(step: int, total: int, steps_per_epoch: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimiser step `step` of `total`.

    onecycle: linear warm-up from lr/25 over the first 25% of steps, then linear decay to 0 (the
    short-schedule regime); step: /10 at 50% and again at 75% of the epochs (the paper's 150/225 of
    300); cosine: half a cosine to 0.
    """
    t = step / max(total, 1)
    if schedule == "onecycle":
        return 0.04 + 0.96 * t / 0.25 if t < 0.25 else max(0.0, (1 - t) / 0.75)
    if schedule == "step":
        epoch, epochs = step // steps_per_epoch, total / steps_per_epoch
        return 0.1 ** ((epoch >= 0.5 * epochs) + (epoch >= 0.75 * epochs))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}; choose onecycle, step or cosine")


def build_model(cfg: RunConfig, num_classes: int, in_chans: int, seed: int) -> nn.Module:
    """Create the timm model with the init stream's seed, so every setting of seed k starts alike."""
    torch.manual_seed(derive_seed(seed, INIT))
    return timm.create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, **cfg.model_kwargs)


def autocast_ctx(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device supports it (fp16 on older GPUs), or nothing without --amp."""
    if not cfg.amp:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(net: nn.Module, data: TensorData | FolderData, cfg: RunConfig, di: DistInfo) -> tuple[float, float]:
    """Top-1 and top-5 error (%) on the (sharded) test set; counts are summed over ranks."""
    net.eval()
    k = min(5, data.num_classes)
    counts = torch.zeros(3, dtype=torch.float64, device=di.device)  # correct@1, correct@k, n
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for x, y in data.test_batches(cfg.eval_batch_size, di.rank, di.world_size):
        with autocast_ctx(cfg, di.device):
            logits = net(x.contiguous(memory_format=mf))
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(1).sum()
        counts[2] += y.numel()
    if di.world_size > 1:
        dist.all_reduce(counts)
    c1, ck, n = counts.tolist()
    net.train()
    return 100 * (1 - c1 / n), 100 * (1 - ck / n)


def train_run(cfg: RunConfig, setting: Setting, seed: int, data: TensorData | FolderData,
              di: DistInfo | None = None, progress: bool = False, desc: str = "") -> tuple[dict, dict]:
    """Train one run and return (metrics, model state_dict). Metrics: errors in %, times in s."""
    di = di or DistInfo()
    device = di.device
    model = build_model(cfg, data.num_classes, data.in_chans, seed)
    torch.manual_seed(derive_seed(seed, GLOBAL, di.rank))  # anything else (dropout, drop-path)
    order_gen = torch.Generator().manual_seed(derive_seed(seed, ORDER))  # same on all ranks
    aug_gen = torch.Generator().manual_seed(derive_seed(seed, AUG, di.rank))
    mix_gen = torch.Generator().manual_seed(derive_seed(seed, MIX, di.rank))

    per_rank_batch = cfg.batch_size // di.world_size
    if per_rank_batch * di.world_size != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the world size {di.world_size}")
    steps_per_epoch = math.ceil((data.num_train // di.world_size) / per_rank_batch)
    total_steps = steps_per_epoch * cfg.epochs

    core: nn.Module = model
    if setting.mixes:
        core = featmix.CutMixAt(model, layer=setting.layer, alpha=setting.alpha, prob=cfg.cutmix_prob,
                                variant=setting.variant, num_classes=data.num_classes,
                                label_smoothing=cfg.label_smoothing, generator=mix_gen,
                                total_steps=total_steps if setting.variant == "scheduled" else None)
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    core = core.to(device, memory_format=mf)
    train_net: nn.Module = core
    if di.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_net = DDP(core, device_ids=[device.index] if device.type == "cuda" else None)
    eval_net = core
    if cfg.compile:
        train_net, eval_net = torch.compile(train_net), torch.compile(core)

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.wd)
    use_scaler = cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    ls = 0.0 if setting.mixes else cfg.label_smoothing  # CutMixAt smooths its own targets

    history: list[dict] = []
    best1 = best5 = math.inf
    best_epoch = -1
    top1 = top5 = math.nan
    train_time = eval_time = 0.0
    images = 0
    step = 0
    bar = None
    if progress and di.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs, desc=desc, unit="ep", leave=False, dynamic_ncols=True, file=sys.stderr)
    train_net.train()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        for x, y in data.train_batches(per_rank_batch, order_gen, aug_gen, di.rank, di.world_size):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, total_steps, steps_per_epoch, cfg.schedule)
            x = x.contiguous(memory_format=mf)
            with autocast_ctx(cfg, device):
                if setting.mixes:
                    logits, targets = train_net(x, y)
                else:
                    logits, targets = train_net(x), y
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=ls)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            with torch.no_grad():  # accumulate on the device: no host sync per batch
                sums[0] += loss.detach().double() * y.shape[0]
                sums[1] += (logits.argmax(1) == y).sum()
                sums[2] += y.shape[0]
        if di.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, correct, n_seen = sums.tolist()  # one device sync per epoch
        dt = time.perf_counter() - t0
        train_time += dt
        images += int(n_seen)
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / n_seen, "train_acc": 100 * correct / n_seen}
        if not math.isfinite(rec["train_loss"]):
            raise RuntimeError(f"{setting.name} seed {seed}: training loss is {rec['train_loss']} at epoch "
                               f"{epoch + 1}; lower --lr or check the data")
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            t1 = time.perf_counter()
            if di.world_size > 1:  # evaluate rank 0's BN statistics on every shard
                for b in model.buffers():
                    dist.broadcast(b, 0)
            top1, top5 = evaluate(eval_net, data, cfg, di)
            eval_time += time.perf_counter() - t1
            rec.update(top1_err=top1, top5_err=top5)
            if top1 < best1:
                best1, best_epoch = top1, epoch + 1
            best5 = min(best5, top5)
        history.append(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['train_acc']:.1f}",
                            img_s=f"{n_seen / dt:.0f}", err=f"{top1:.2f}")
            bar.update()
    if bar is not None:
        bar.close()
    metrics = {
        "best_top1_err": best1, "best_top5_err": best5, "best_epoch": best_epoch,
        "final_top1_err": top1, "final_top5_err": top5, "final_train_loss": history[-1]["train_loss"],
        "train_time_s": train_time, "eval_time_s": eval_time, "images_per_s": images / max(train_time, 1e-9),
        "history": history,
    }
    return metrics, model.state_dict()
