"""featmix in torchvision's classification reference scripts (``references/classification/train.py``).

The references mix in the DataLoader with ``collate_fn=lambda batch: mixup_cutmix(*default_collate(batch))``;
a lambda cannot be pickled, so that loader fails with ``multiprocessing_context="spawn"`` workers (the default
on macOS and Windows). ``MixCollate`` is the same thing as a picklable object.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import default_collate

import featmix


class MixCollate:
    """``collate_fn`` that collates with ``default_collate`` and then mixes the batch with a featmix transform.

    ``DataLoader(dataset, batch_size=..., collate_fn=MixCollate(featmix.CutMix(num_classes=100)))``: each
    worker receives a pickled copy (a seeded generator is reseeded once per worker, so workers draw
    different, reproducible streams).

    Args:
        transform: a featmix batch transform (``featmix.CutMix``, ``Mixup``, ``CutMixOrMixup``, ``Cutout``) or any
            picklable callable taking ``(images, labels)`` and returning ``(images, targets)``.
        collate_fn: how samples become a batch; default ``torch.utils.data.default_collate``.

    Returns:
        Called on a list of samples, ``transform(*collate_fn(samples))``: ``[images, targets]`` or whatever the
        transform returns.

    Raises:
        TypeError: ``transform`` or ``collate_fn`` is not callable; a collated batch that is not a pair
            ``(images, labels)`` (for dict samples, pass ``transform`` a featmix transform and it is called on the
            whole batch instead).
    """

    def __init__(self, transform: Callable[..., Any], collate_fn: Optional[Callable[[Sequence[Any]], Any]] = None):
        if not callable(transform):
            raise TypeError(f"transform must be callable (a featmix transform such as featmix.CutMix(...)), got "
                            f"{type(transform).__name__}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable or None, got {type(collate_fn).__name__}")
        self.transform = transform
        self.collate_fn = collate_fn if collate_fn is not None else default_collate

    def __call__(self, samples: Sequence[Any]) -> Any:
        batch = self.collate_fn(samples)
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            return self.transform(*batch)
        if isinstance(self.transform, torch.nn.Module) and hasattr(self.transform, "labels_getter"):
            return self.transform(batch)  # featmix transforms find images and labels in dicts/longer tuples
        raise TypeError(f"the collated batch is a {type(batch).__name__}"
                        f"{f' of {len(batch)} items' if isinstance(batch, (list, tuple)) else ''}, not (images, "
                        f"labels): pass a featmix transform (it reads dict samples) or a collate_fn that returns "
                        f"(images, labels)")

    def __repr__(self) -> str:
        return f"MixCollate({self.transform!r})"


def mix_from_reference_args(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                            generator: Optional[torch.Generator] = None) -> Optional[torch.nn.Module]:
    """The featmix transform for the references' ``--mixup-alpha``/``--cutmix-alpha`` (their defaults: both 0).

    The references pick MixUp or CutMix with equal chance per batch when both are on, with no label
    smoothing in the transform (their ``--label-smoothing`` goes to the loss).

    Args:
        num_classes: the class count.
        mixup_alpha: MixUp's alpha (0: off).
        cutmix_alpha: CutMix's alpha (0: off).
        generator: a CPU ``torch.Generator`` for the draws, or None for torch's default generator.

    Returns:
        ``featmix.CutMix``, ``featmix.Mixup`` or ``featmix.CutMixOrMixup`` (switch chance 0.5); None when both
        alphas are 0, as the references' ``get_mixup_cutmix``.

    Raises:
        ValueError: a negative alpha, or a ``num_classes`` featmix rejects.
    """
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0 turns it off), got {value}")
    if mixup_alpha > 0 and cutmix_alpha > 0:
        return featmix.CutMixOrMixup(num_classes, cutmix_alpha=cutmix_alpha, mixup_alpha=mixup_alpha, switch_prob=0.5,
                                     generator=generator)
    if cutmix_alpha > 0:
        return featmix.CutMix(num_classes, alpha=cutmix_alpha, generator=generator)
    if mixup_alpha > 0:
        return featmix.Mixup(num_classes, alpha=mixup_alpha, generator=generator)
    return None
