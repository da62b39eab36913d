"""Train and evaluate one run: one model, one setting (baseline or CutMix somewhere), one seed.

Randomness is split into independent streams, each from its own seed derived from (seed, stream, rank):
initial weights, data order, augmentation and mixing. So seed k of the baseline and seed k of every
CutMix setting start from the same weights and see the same images, in the same order, with the same
crops and flips; only the mixing differs. That pairing is what lets the studies resolve small effects.

A run is `start_run` (build everything), then `run_epoch` until done; `train_run` drives it and can hand
each finished epoch to a keeper (`experiments.checkpoint`) that saves the whole state, resumes from it and
stops at an epoch boundary, so a resumed run ends bit for bit where an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import featmix
import models  # noqa: F401  (registers the CIFAR models with timm)

from .data import FolderData, TensorData
from .fast import CompileClock, compile_module, mark_step, uses_cuda_graphs

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
    kind: str = "cutmix"  # featmix's mix kind: cutmix, mixup, cutout, cutmix_or_mixup

    @property
    def mixes(self) -> bool:
        """Whether this setting mixes anywhere (False: the baseline)."""
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
    compile_mode: str = "default"  # torch.compile's mode (inductor): default, reduce-overhead, ...
    compile_backend: str = "inductor"

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled model replays CUDA graphs."""
        return uses_cuda_graphs(self.compile, self.compile_mode, self.compile_backend)


@dataclass
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes."""
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


def lr_schedule(opt: torch.optim.Optimizer, cfg: RunConfig, total_steps: int,
                steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over `lr_factor`: step k trains at cfg.lr * lr_factor(k), bit for bit, with a state_dict."""
    # lr_factor is hand-written: OneCycleLR ends its warm-up one step earlier and floors at lr/final_div_factor,
    # CosineAnnealingLR's recursive form drifts by rounding; both change most steps' lr (MultiStepLR matches 'step').
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total_steps, steps_per_epoch, cfg.schedule))


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
def evaluate(net: nn.Module, data: TensorData | FolderData, cfg: RunConfig, dist_info: DistInfo,
             clock: CompileClock | None = None) -> tuple[float, float]:
    """Top-1 and top-5 error (%) on the (sharded) test set; counts are summed over ranks."""
    net.eval()
    k = min(5, data.num_classes)
    counts = torch.zeros(3, dtype=torch.float64, device=dist_info.device)  # correct@1, correct@k, n
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    clock = clock or CompileClock(False)
    for x, y in data.test_batches(cfg.eval_batch_size, dist_info.rank, dist_info.world_size):
        mark_step(cfg.cuda_graphs)
        with clock.call(), autocast_ctx(cfg, dist_info.device):
            logits = net(x.contiguous(memory_format=mf))
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(1).sum()
        counts[2] += y.numel()
    if dist_info.world_size > 1:
        dist.all_reduce(counts)
    c1, ck, n = counts.tolist()
    net.train()
    return 100 * (1 - c1 / n), 100 * (1 - ck / n)


@dataclass
class Streams:
    """The run's random streams beyond the initial weights: data order (shared by ranks), augmentation, mixing."""

    order: torch.Generator
    aug: torch.Generator
    mix: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int) -> "Streams":
        """Seed the global RNG (dropout, drop-path) and the three generators of `seed` on `rank`."""
        torch.manual_seed(derive_seed(seed, GLOBAL, rank))
        return cls(torch.Generator().manual_seed(derive_seed(seed, ORDER)),
                   torch.Generator().manual_seed(derive_seed(seed, AUG, rank)),
                   torch.Generator().manual_seed(derive_seed(seed, MIX, rank)))

    def state_dict(self, device: torch.device) -> dict[str, Any]:
        """Every stream's state: the three generators and the global RNG (CPU, and `device`'s when CUDA)."""
        state = {"order": self.order.get_state(), "aug": self.aug.get_state(), "mix": self.mix.get_state(),
                 "global": torch.get_rng_state()}
        if device.type == "cuda":
            state["global_cuda"] = torch.cuda.get_rng_state(device)
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Put back the streams of `state_dict`."""
        for name in ("order", "aug", "mix"):
            getattr(self, name).set_state(state[name])
        torch.set_rng_state(state["global"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["global_cuda"], device)


@dataclass
class Nets:
    """The model as trained (CutMixAt-wrapped, DDP, compiled as asked) and as evaluated, its memory format, and
    the mixing sampler (None for the baseline) whose step is part of a run's state."""

    train: nn.Module
    eval: nn.Module
    memory_format: torch.memory_format
    sampler: featmix.MixSampler | None = None


def build_nets(cfg: RunConfig, setting: Setting, model: nn.Module, num_classes: int, mix_gen: torch.Generator,
               total_steps: int, dist_info: DistInfo) -> Nets:
    """Wrap `model` for `setting` (CutMixAt when it mixes), move it to the device, add DDP and torch.compile."""
    core: nn.Module = model
    if setting.mixes:
        core = featmix.CutMixAt(model, layer=setting.layer, alpha=setting.alpha, prob=cfg.cutmix_prob,
                                variant=setting.variant, kind=setting.kind, num_classes=num_classes,
                                label_smoothing=cfg.label_smoothing, generator=mix_gen,
                                total_steps=total_steps if setting.variant == "scheduled" else None)
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    core = core.to(dist_info.device, memory_format=mf)
    sampler = core.sampler if setting.mixes else None
    train_net: nn.Module = core
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_net = DDP(core, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None)
    if cfg.compile:
        return Nets(compile_module(train_net, cfg.compile_mode, cfg.compile_backend),
                    compile_module(core, cfg.compile_mode, cfg.compile_backend), mf, sampler)
    return Nets(train_net, core, mf, sampler)


@dataclass
class Optimisation:
    """SGD (nesterov), its lr schedule and the fp16 grad scaler (a no-op unless fp16 autocast on CUDA)."""

    opt: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    def step(self, loss: torch.Tensor) -> None:
        """Backward, optimiser step, next lr."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.schedule.step()


def build_optimisation(cfg: RunConfig, model: nn.Module, total_steps: int, steps_per_epoch: int,
                       device: torch.device) -> Optimisation:
    """SGD over `model`'s parameters with the run's lr schedule and grad scaler."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.wd)
    use_scaler = cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return Optimisation(opt, lr_schedule(opt, cfg, total_steps, steps_per_epoch),
                        torch.amp.GradScaler("cuda", enabled=use_scaler))


def train_epoch(cfg: RunConfig, setting: Setting, nets: Nets, optim: Optimisation, data: TensorData | FolderData,
                per_rank_batch: int, streams: Streams, dist_info: DistInfo,
                clock: CompileClock | None = None) -> dict[str, Any]:
    """One epoch of training -> {'train_loss', 'train_acc' (%), 'n', 'seconds'} summed over ranks; the time and
    images of steps that compiled go to `clock`, not into 'seconds'."""
    t0 = time.perf_counter()
    clock = clock or CompileClock(False)
    compiled_before = clock.seconds
    ls = 0.0 if setting.mixes else cfg.label_smoothing  # CutMixAt smooths its own targets
    sums = torch.zeros(3, dtype=torch.float64, device=dist_info.device)  # loss * n, correct, n
    for x, y in data.train_batches(per_rank_batch, streams.order, streams.aug, dist_info.rank, dist_info.world_size):
        x = x.contiguous(memory_format=nets.memory_format)
        mark_step(cfg.cuda_graphs)
        with clock.call(y.shape[0] * dist_info.world_size):
            with autocast_ctx(cfg, dist_info.device):
                logits, targets = nets.train(x, y) if setting.mixes else (nets.train(x), y)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=ls)
            optim.step(loss)
        with torch.no_grad():  # accumulate on the device: no host sync per batch
            sums[0] += loss.detach().double() * y.shape[0]
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.shape[0]
    if dist_info.world_size > 1:
        dist.all_reduce(sums)
    loss_sum, correct, n_seen = sums.tolist()  # one device sync per epoch
    return {"train_loss": loss_sum / n_seen, "train_acc": 100 * correct / n_seen, "n": int(n_seen),
            "seconds": time.perf_counter() - t0 - (clock.seconds - compiled_before)}


@dataclass
class RunLog:
    """Per-epoch history and the running totals a run reports (errors in %, times in s)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best1: float = math.inf
    best5: float = math.inf
    best_epoch: int = -1
    top1: float = math.nan
    top5: float = math.nan
    train_time: float = 0.0
    eval_time: float = 0.0
    images: int = 0

    def evaluated(self, epoch: int, top1: float, top5: float, seconds: float) -> None:
        """Record an evaluation after `epoch` (1-based)."""
        self.top1, self.top5 = top1, top5
        self.eval_time += seconds
        if top1 < self.best1:
            self.best1, self.best_epoch = top1, epoch
        self.best5 = min(self.best5, top5)

    def metrics(self, clock: CompileClock | None = None) -> dict[str, Any]:
        """The run's metrics: best/final errors, final loss, times (compilation apart), throughput, history."""
        clock = clock or CompileClock(False)
        return {"best_top1_err": self.best1, "best_top5_err": self.best5, "best_epoch": self.best_epoch,
                "final_top1_err": self.top1, "final_top5_err": self.top5,
                "final_train_loss": self.history[-1]["train_loss"], "train_time_s": self.train_time,
                "eval_time_s": self.eval_time, "compile_time_s": clock.seconds, "compiled_graphs": clock.graphs,
                "images_per_s": (self.images - clock.images) / max(self.train_time, 1e-9), "history": self.history}


@dataclass
class Run:
    """One training run in progress: what it trains, everything it holds, and how many epochs are done."""

    cfg: RunConfig
    setting: Setting
    seed: int
    data: TensorData | FolderData
    dist_info: DistInfo
    model: nn.Module
    streams: Streams
    nets: Nets
    optim: Optimisation
    per_rank_batch: int
    log: RunLog = field(default_factory=RunLog)
    clock: CompileClock = field(default_factory=lambda: CompileClock(False))
    epoch: int = 0

    @property
    def done(self) -> bool:
        """Whether every epoch has been trained."""
        return self.epoch >= self.cfg.epochs


def start_run(cfg: RunConfig, setting: Setting, seed: int, data: TensorData | FolderData, dist_info: DistInfo) -> Run:
    """Build a run at epoch 0: seeded model, streams, (wrapped, compiled) nets, SGD and its schedule."""
    per_rank_batch = cfg.batch_size // dist_info.world_size
    if per_rank_batch * dist_info.world_size != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the world size {dist_info.world_size}")
    model = build_model(cfg, data.num_classes, data.in_chans, seed)
    streams = Streams.seeded(seed, dist_info.rank)
    steps_per_epoch = math.ceil((data.num_train // dist_info.world_size) / per_rank_batch)
    total_steps = steps_per_epoch * cfg.epochs
    nets = build_nets(cfg, setting, model, data.num_classes, streams.mix, total_steps, dist_info)
    optim = build_optimisation(cfg, model, total_steps, steps_per_epoch, dist_info.device)
    nets.train.train()
    return Run(cfg, setting, seed, data, dist_info, model, streams, nets, optim, per_rank_batch,
               clock=CompileClock(cfg.compile))


def _evaluate_now(run: Run) -> dict[str, float]:
    t1 = time.perf_counter()
    compiled_before = run.clock.seconds
    if run.dist_info.world_size > 1:  # evaluate rank 0's BN statistics on every shard
        for b in run.model.buffers():
            dist.broadcast(b, 0)
    top1, top5 = evaluate(run.nets.eval, run.data, run.cfg, run.dist_info, run.clock)
    run.log.evaluated(run.epoch, top1, top5, time.perf_counter() - t1 - (run.clock.seconds - compiled_before))
    return {"top1_err": top1, "top5_err": top5}


def run_epoch(run: Run) -> dict[str, Any]:
    """Train the next epoch (and evaluate when due); returns the epoch's record (with 'seconds' of training)."""
    cfg = run.cfg
    rec = train_epoch(cfg, run.setting, run.nets, run.optim, run.data, run.per_rank_batch, run.streams, run.dist_info,
                      run.clock)
    run.epoch += 1
    run.log.train_time += rec["seconds"]
    run.log.images += rec["n"]
    if not math.isfinite(rec["train_loss"]):
        raise RuntimeError(f"{run.setting.name} seed {run.seed}: training loss is {rec['train_loss']} at epoch "
                           f"{run.epoch}; lower --lr or check the data")
    entry = {"epoch": run.epoch, "train_loss": rec["train_loss"], "train_acc": rec["train_acc"]}
    if run.epoch % cfg.eval_every == 0 or run.epoch == cfg.epochs:
        entry.update(_evaluate_now(run))
    run.log.history.append(entry)
    return rec


class Keeper(Protocol):
    """What `train_run` asks of a checkpoint keeper (`experiments.checkpoint.RunKeeper`)."""

    def restore(self, run: Run) -> None:
        """Put the saved state (if any) into a freshly started run."""

    def save(self, run: Run) -> None:
        """Save the run's whole state after an epoch."""

    def should_stop(self, run: Run, epoch_seconds: float) -> bool:
        """Whether to stop now, at this epoch boundary (the same answer on every rank)."""


def train_run(cfg: RunConfig, setting: Setting, seed: int, data: TensorData | FolderData,
              dist_info: DistInfo | None = None, progress: bool = False, desc: str = "",
              keeper: Keeper | None = None) -> tuple[dict | None, dict | None]:
    """Train one run -> (metrics: errors in %, times in s, per-epoch history; the model's state_dict), or
    (None, None) when `keeper` stopped it at an epoch boundary (its state saved for the same call to resume)."""
    run = start_run(cfg, setting, seed, data, dist_info or DistInfo())
    if keeper is not None:
        keeper.restore(run)
    bar = _progress_bar(cfg.epochs, run.epoch, desc) if progress and run.dist_info.is_main else None
    while not run.done:
        t0 = time.perf_counter()
        rec = run_epoch(run)
        if keeper is not None and not run.done:
            keeper.save(run)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['train_acc']:.1f}",
                            img_s=f"{rec['n'] / max(rec['seconds'], 1e-9):.0f}", err=f"{run.log.top1:.2f}")
            bar.update()
        if keeper is not None and keeper.should_stop(run, time.perf_counter() - t0) and not run.done:
            break
    if bar is not None:
        bar.close()
    if not run.done:
        return None, None
    return run.log.metrics(run.clock), run.model.state_dict()


def _progress_bar(epochs: int, done: int, desc: str) -> Any:
    from tqdm.auto import tqdm
    return tqdm(total=epochs, initial=done, desc=desc, unit="ep", leave=False, dynamic_ncols=True, file=sys.stderr)
