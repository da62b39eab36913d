"""featmix in Lightning: ``CutMixCallback`` mixes each training batch after it reaches the device.

The draw stream is reproducible and resumable: each rank's generator is seeded from the global seed
(``seed=``, else the one ``lightning.seed_everything`` set) and the rank, and the callback's checkpoint
state holds every rank's generator state and the sampler's step, so a run resumed from a checkpoint
draws exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import lightning.pytorch as pl
import torch
from torch import nn

import featmix

_MASK = (1 << 63) - 1


def rank_seed(seed: int, rank: int) -> int:
    """The generator seed of ``rank`` for the global ``seed``: distinct per rank, stable run to run.

    Args:
        seed: the global seed.
        rank: the process's global rank (>= 0).

    Returns:
        A 63-bit seed.

    Raises:
        ValueError: ``rank`` < 0.
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    g = torch.Generator().manual_seed((int(seed) & _MASK) ^ (0x9E3779B97F4A7C15 * (rank + 1) & _MASK))
    return int(torch.randint(0, 2 ** 62, (1,), generator=g))


class CutMixCallback(pl.Callback):
    """Mix every training batch (never validation, test or predict batches) with a featmix transform.

    The batch must be a list ``[images, labels, ...]`` (what ``default_collate`` makes of tuple samples) or a
    dict; it is mixed in place after the transfer to the device, so ``training_step`` receives the mixed
    images and (B, num_classes) float targets: train it with soft-target cross-entropy
    (``featmix.integrations.soft_target_cross_entropy``).

    Args:
        num_classes: the class count of the default ``featmix.CutMix`` (ignored with ``transform=``).
        transform: a featmix batch transform to use instead (``CutMix``, ``Mixup``, ``CutMixOrMixup``, ``Cutout``);
            its generator is replaced by the callback's seeded one.
        seed: the global seed; None reads ``PL_GLOBAL_SEED`` (set by ``lightning.seed_everything``) and, without
            it, takes a fresh seed from torch's default generator (still saved and resumed).
        **cutmix_kwargs: the default ``featmix.CutMix``'s other arguments (``alpha``, ``prob``, ``variant``, ...).

    Raises:
        ValueError: neither ``num_classes`` nor ``transform``, or both; a ``PL_GLOBAL_SEED`` that is not an int.
        TypeError: a training batch that is neither a list nor a dict (a tuple cannot be mixed in place), or a
            checkpoint state this callback did not write.
    """

    def __init__(self, num_classes: Optional[int] = None, transform: Optional[nn.Module] = None,
                 seed: Optional[int] = None, **cutmix_kwargs: Any) -> None:
        super().__init__()
        if (num_classes is None) == (transform is None):
            raise ValueError("pass num_classes= (for the default featmix.CutMix) or transform= (a featmix transform), "
                             f"exactly one of them; got num_classes={num_classes!r}, transform={transform!r}")
        if "generator" in cutmix_kwargs:
            raise ValueError("generator= is owned by CutMixCallback (seeded from the global seed and the rank); "
                             "pass seed= instead")
        self.generator = torch.Generator()
        if transform is None:
            transform = featmix.CutMix(num_classes, generator=self.generator, **cutmix_kwargs)
        elif cutmix_kwargs:
            raise ValueError(f"{sorted(cutmix_kwargs)} configure the default CutMix; with transform= set them on the "
                             f"transform")
        sampler = getattr(transform, "sampler", None)
        if not isinstance(sampler, featmix.MixSampler):
            raise TypeError(f"transform must be a featmix batch transform (with a .sampler), got "
                            f"{type(transform).__name__}")
        sampler.generator = self.generator
        self.transform = transform
        self.seed = seed
        self.rank = 0
        self.world_size = 1
        self._strategy: Any = None

    # -- seeding --------------------------------------------------------------------------------------
    def _global_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        env = os.environ.get("PL_GLOBAL_SEED")
        if env is not None:
            try:
                return int(env)
            except ValueError:
                raise ValueError(f"PL_GLOBAL_SEED must be an int (lightning.seed_everything sets it), got "
                                 f"{env!r}") from None
        return int(torch.randint(0, 2 ** 62, (1,)))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank, self.world_size, self._strategy = trainer.global_rank, trainer.world_size, trainer.strategy
        if self.seed is None and "PL_GLOBAL_SEED" not in os.environ:
            self.seed = self._global_seed()  # one fresh seed, kept (and saved) for the run
        self.generator.manual_seed(rank_seed(self._global_seed(), self.rank))
        self.transform.sampler.generator = self.generator

    # -- mixing ---------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if isinstance(batch, list) and len(batch) >= 2:
            batch[0], batch[1] = self.transform(batch[0], batch[1])
        elif isinstance(batch, dict):
            mixed = self.transform(batch)
            batch.update(mixed)
        else:
            raise TypeError(f"CutMixCallback mixes the training batch in place, so it must be a list [images, labels, "
                            f"...] or a dict; got a {type(batch).__name__}. Return a list from your collate_fn (as "
                            f"default_collate does) or mix in training_step with featmix.CutMix")

    # -- checkpoint state -----------------------------------------------------------------------------
    def _all_generator_states(self) -> Dict[int, torch.Tensor]:
        state = self.generator.get_state()
        if self.world_size > 1 and self._strategy is not None:
            gathered = self._strategy.all_gather(state.to(self._strategy.root_device)).cpu()
            return {r: gathered[r].clone() for r in range(gathered.shape[0])}
        return {self.rank: state}

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "generators": self._all_generator_states(),
                "sampler": self.transform.sampler.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or not {"generators", "sampler"} <= set(state_dict):
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else ""
            raise TypeError(f"not a CutMixCallback state (keys 'generators', 'sampler' expected), got "
                            f"{type(state_dict).__name__} {keys}")
        generators = state_dict["generators"]
        if self.rank not in generators:
            raise ValueError(f"the checkpoint holds draw states for ranks {sorted(generators)} but this is rank "
                             f"{self.rank}: resume with the same number of processes")
        if state_dict.get("seed") is not None:
            self.seed = state_dict["seed"]
        self.transform.sampler.load_state_dict(state_dict["sampler"])  # the step (and rank 0's draw state, if kept)
        self.generator.set_state(generators[self.rank])  # then this rank's own draw state
        self.transform.sampler.generator = self.generator
