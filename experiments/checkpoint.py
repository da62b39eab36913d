"""Long runs survive: a run's whole state saved after every epoch, resumed by the same command, and a deadline
(`--max-minutes`) that stops a study cleanly at an epoch boundary.

The state is everything the next epoch reads: model (weights and BN buffers), SGD (momentum buffers, lr),
the lr schedule's step, the grad scaler, the mixing sampler's step, and every random stream of every rank
(data order, augmentation, mixing generator, the global CPU RNG and the device's CUDA RNG), with the
run log so far (history, best errors, times). Restored into a freshly built run, the remaining epochs
compute exactly what an uninterrupted run computes (tests/test_study_runs.py checks it bit for bit on CPU).
Under DistributedDataParallel rank 0 gathers the per-rank streams, writes, and hands them back on resume.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .engine import DistInfo, Run, RunLog, Setting

FORMAT = 1


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a killed process never leaves half a file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def agree(decision: bool, dist_info: DistInfo) -> bool:
    """Rank 0's `decision`, on every rank (so that all of them stop at the same epoch)."""
    if dist_info.world_size == 1:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


@dataclass
class Deadline:
    """`--max-minutes`: the wall-clock time (time.time()) after which no epoch starts that would end past it.

    A process always trains at least one epoch before the deadline can stop it, so that every invocation of
    a study makes progress, however small M is.
    """

    at: float | None = None
    progressed: bool = False
    epoch_s: float = 0.0  # how long the latest epoch took: the estimate for the next one, in any run

    def epoch_done(self, seconds: float) -> None:
        """Record a trained epoch (this process has made progress) and its duration."""
        self.progressed, self.epoch_s = True, seconds

    def next_epoch_passes(self) -> bool:
        """Whether an epoch as long as the latest one would end past the deadline."""
        return self.passed(self.epoch_s)

    @classmethod
    def after_minutes(cls, minutes: float | None, start: float | None = None) -> "Deadline":
        """A deadline `minutes` after `start` (default: now); None: never."""
        return cls(None if minutes is None else (start or time.time()) + 60 * minutes)

    def passed(self, ahead: float = 0.0) -> bool:
        """Whether `ahead` more seconds would end past the deadline (False before this process trained an epoch)."""
        return self.at is not None and self.progressed and time.time() + ahead > self.at


def run_state(run: Run) -> dict[str, Any] | None:
    """The run's whole state after its latest epoch (a collective under DDP); None on ranks other than 0."""
    streams = run.streams.state_dict(run.dist_info.device)
    ranks = [streams]
    if run.dist_info.world_size > 1:
        ranks = [None] * run.dist_info.world_size if run.dist_info.is_main else None
        dist.gather_object(streams, ranks, dst=0)
    if not run.dist_info.is_main:
        return None
    return {"format": FORMAT, "epoch": run.epoch, "world_size": run.dist_info.world_size,
            "model": run.model.state_dict(), "optimizer": run.optim.opt.state_dict(),
            "scheduler": run.optim.schedule.state_dict(), "scaler": run.optim.scaler.state_dict(),
            "sampler": run.nets.sampler.state_dict() if run.nets.sampler is not None else None,
            "ranks": ranks, "log": dataclasses.asdict(run.log), "clock": run.clock.state_dict()}


def load_run_state(run: Run, state: dict[str, Any]) -> None:
    """Put `state` (from `run_state`, same world size) into a freshly started run of the same setting and seed."""
    run.model.load_state_dict(state["model"])
    run.optim.opt.load_state_dict(state["optimizer"])
    run.optim.schedule.load_state_dict(state["scheduler"])
    run.optim.scaler.load_state_dict(state["scaler"])
    if run.nets.sampler is not None:
        run.nets.sampler.load_state_dict(state["sampler"])
    run.streams.load_state_dict(state["ranks"][run.dist_info.rank], run.dist_info.device)
    run.log = RunLog(**state["log"])
    run.clock.load_state_dict(state["clock"])
    run.epoch = state["epoch"]
    run.nets.train.train()


class RunKeeper:
    """Saves a run after every epoch to `path`, resumes it from there, and stops it at the `deadline`."""

    def __init__(self, path: Path, config_hash: str, setting: Setting, seed: int, deadline: Deadline | None = None,
                 say: Any = print) -> None:
        self.path, self.deadline, self.say = Path(path), deadline or Deadline(), say
        self.identity = {"config_hash": config_hash, "setting": dataclasses.asdict(setting), "seed": seed}

    def _load(self, run: Run) -> dict[str, Any] | None:
        """The saved state if it belongs to this run (same configuration, setting, seed, world size), else None."""
        if not self.path.exists():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        if saved.get("identity") != self.identity or saved.get("format") != FORMAT:
            self.say(f"{self.path}: saved by another configuration or version; starting this run afresh")
            return None
        if saved["world_size"] != run.dist_info.world_size or saved["epoch"] >= run.cfg.epochs:
            self.say(f"{self.path}: saved with {saved['world_size']} processes at epoch {saved['epoch']}; this run "
                     f"has {run.dist_info.world_size} and {run.cfg.epochs} epochs: starting it afresh")
            return None
        return saved

    def restore(self, run: Run) -> None:
        """Load the saved state into `run` if there is one for it (rank 0 reads, then shares it)."""
        box = [self._load(run) if run.dist_info.is_main else None]
        if run.dist_info.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            load_run_state(run, box[0])
            if run.dist_info.is_main:
                self.say(f"resuming {run.setting.name} seed {run.seed} after epoch {run.epoch} from {self.path}")

    def save(self, run: Run) -> None:
        """Write the run's state (rank 0) after the epoch just finished."""
        state = run_state(run)
        if state is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic({**state, "identity": self.identity}, self.path)

    def should_stop(self, run: Run, epoch_seconds: float) -> bool:
        """Stop when another epoch as long as the last one would end past the deadline (rank 0 decides)."""
        self.deadline.epoch_done(epoch_seconds)
        return agree(self.deadline.next_epoch_passes(), run.dist_info)

    def discard(self) -> None:
        """The run is finished and its checkpoint written: the resume state is no longer needed."""
        self.path.unlink(missing_ok=True)
