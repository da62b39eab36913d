"""featmix in timm's ``train.py``: input-level CutMix on both loader paths, or Feature CutMix at a layer.

- ``FastCollateCutMix``: the counterpart of ``timm.data.FastCollateMixup`` for the prefetcher path (the
  loader collates uint8 images and the prefetcher normalises them on the device), taking timm's ``Mixup``
  arguments; the no-prefetcher path takes ``featmix.from_timm_args(**mixup_args)`` as its ``mixup_fn``.
- ``cutmix_at_from_timm_args``: ``featmix.CutMixAt`` from the same arguments (timm's defaults: label
  smoothing 0.1).
- ``CutMixAtTask``: a ``timm.task.ClassificationTask`` that calls ``model(input, target)`` and trains on the
  mixed targets with soft-target cross-entropy.

``docs/recipes.md`` holds the patch to ``train.py`` for each.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import FastCollateMixup
from timm.task import ClassificationTask
from torch import Tensor, nn

import featmix

from . import soft_target_cross_entropy

_logger = logging.getLogger(__name__)

_MODES = ("batch", "pair", "elem")


def _check_mode(mode: object) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))} (timm's 'half' mode is not supported: "
                         f"it mixes half a batch and drops the rest), got {mode!r}")
    return mode  # type: ignore[return-value]


class FastCollateCutMix(FastCollateMixup):
    """Collate uint8 samples into a uint8 (B, C, H, W) batch mixed by featmix, with float (B, num_classes) targets.

    A drop-in for ``timm.data.FastCollateMixup(**mixup_args)`` as the ``collate_fn`` of timm's prefetcher
    loader: same arguments and defaults (label smoothing 0.1), one featmix draw per batch (or per sample in
    ``mode="elem"``/``"pair"``). CutMix pastes the uint8 pixels; Mixup blends in float and rounds back to
    uint8, as timm does. It subclasses ``FastCollateMixup`` only so that timm's ``PrefetchLoader`` sees it
    (``loader.mixup_enabled = False`` at ``--mixup-off-epoch``); the mixing is ``featmix.from_timm_args``.

    Args:
        mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, correct_lam, label_smoothing,
            num_classes: as ``timm.data.Mixup``.
        mode: ``"batch"``, ``"pair"`` or ``"elem"``.
        generator: a CPU ``torch.Generator`` for the draws (reseeded once per DataLoader worker), or None for
            torch's default generator.

    Returns:
        Called on a list of ``(image, label)`` samples (image: uint8 (C, H, W) ``numpy.ndarray`` or tensor,
        label: int), it returns ``(images, targets)``: uint8 (B, C, H, W) and float32 (B, num_classes).

    Raises:
        ValueError: an argument timm's ``Mixup`` or featmix rejects (``mode="half"`` included); a batch that is
            empty, whose images differ in shape or are not uint8 (C, H, W).
        TypeError: a sample that is not an ``(image, label)`` pair.
    """

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0,
                 cutmix_minmax: Optional[Tuple[float, float]] = None, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = "batch", correct_lam: bool = True, label_smoothing: float = 0.1,
                 num_classes: int = 1000, generator: Optional[torch.Generator] = None) -> None:
        self.transform = featmix.from_timm_args(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax, prob=prob,
            switch_prob=switch_prob, mode=_check_mode(mode), correct_lam=correct_lam,
            label_smoothing=label_smoothing, num_classes=num_classes, generator=generator)
        self.transform.inplace = self.transform.sampler.kind == "cutmix"  # the batch is ours: paste in place
        super().__init__(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax, prob=prob,
                         switch_prob=switch_prob, mode=mode, correct_lam=correct_lam,
                         label_smoothing=label_smoothing, num_classes=num_classes)

    @property
    def mixup_enabled(self) -> bool:  # timm's PrefetchLoader toggles this at --mixup-off-epoch
        return self.transform.mixup_enabled

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        self.transform.mixup_enabled = bool(value)

    def __call__(self, batch: Sequence[Tuple[Any, Any]], _: Any = None) -> Tuple[Tensor, Tensor]:
        images, labels = _collate_uint8(batch)
        transform = self.transform
        if transform.sampler.kind == "cutmix":
            return transform(images, labels)
        mixed, targets = transform(images.float(), labels)  # Mixup blends: in float, rounded back like timm
        return mixed.round_().clamp_(0, 255).to(torch.uint8), targets

    def __repr__(self) -> str:
        return f"FastCollateCutMix({self.transform!r})"


def _collate_uint8(batch: Sequence[Tuple[Any, Any]]) -> Tuple[Tensor, Tensor]:
    if not batch:
        raise ValueError("batch must hold at least one (image, label) sample, got an empty batch")
    images, labels = [], []
    for i, sample in enumerate(batch):
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise TypeError(f"batch[{i}] must be an (image, label) pair, got {type(sample).__name__}")
        image = torch.from_numpy(np.ascontiguousarray(sample[0])) if isinstance(sample[0], np.ndarray) else sample[0]
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
            what = f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(
                image).__name__
            raise ValueError(f"batch[{i}][0] must be a uint8 (C, H, W) image (timm's prefetcher transforms end in "
                             f"ToNumpy/MaybePILToTensor), got a {what}")
        if images and image.shape != images[0].shape:
            raise ValueError(f"batch[{i}][0] has shape {tuple(image.shape)} but batch[0][0] has "
                             f"{tuple(images[0].shape)}: images of one batch must share a shape")
        images.append(image)
        labels.append(int(sample[1]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def cutmix_at_from_timm_args(model: nn.Module, layer: featmix.resolve.LayerSpec = 2, mixup_alpha: float = 1.0,
                             cutmix_alpha: float = 0.0, cutmix_minmax: Optional[Tuple[float, float]] = None,
                             prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch",
                             correct_lam: bool = True, label_smoothing: float = 0.1,
                             num_classes: Optional[int] = None, generator: Optional[torch.Generator] = None,
                             ) -> featmix.CutMixAt:
    """``featmix.CutMixAt(model, layer)`` configured from timm's ``Mixup`` arguments (timm's defaults).

    CutMix when only ``cutmix_alpha > 0`` (or ``cutmix_minmax`` is set), Mixup at the layer (Manifold Mixup)
    when only ``mixup_alpha > 0``, and timm's per-batch switch between them when both are.

    Args:
        model: the model to wrap (timm, torchvision, Hugging Face or any ``nn.Module``).
        layer: where to mix, as ``featmix.CutMixAt``'s ``layer=`` (default 2: after the first stage).
        mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam, label_smoothing: as
            ``timm.data.Mixup`` (same defaults: ``mixup_alpha=1``, ``label_smoothing=0.1``).
        num_classes: the class count; None reads it from the model (timm passes ``args.num_classes``).
        generator: a CPU ``torch.Generator`` for the draws, or None for torch's default generator.

    Returns:
        A ``featmix.CutMixAt`` in training mode: ``output, targets = wrapper(images, labels)``.

    Raises:
        ValueError: no mixing enabled (both alphas 0 and no ``cutmix_minmax``), ``mode="half"``, or any argument
            ``featmix.CutMixAt`` rejects (it names the argument).
    """
    _check_mode(mode)
    if cutmix_minmax is not None:
        cutmix_alpha = 1.0  # timm: a min/max box size enables CutMix and replaces its alpha
    if mixup_alpha > 0 and cutmix_alpha > 0:
        kind, alpha = "cutmix_or_mixup", cutmix_alpha
    elif cutmix_alpha > 0:
        kind, alpha = "cutmix", cutmix_alpha
    elif mixup_alpha > 0:
        kind, alpha = "mixup", mixup_alpha
    else:
        raise ValueError(f"timm's Mixup arguments enable nothing: mixup_alpha={mixup_alpha}, cutmix_alpha="
                         f"{cutmix_alpha}, cutmix_minmax={cutmix_minmax}; pass cutmix_alpha > 0 (train.py --cutmix)")
    wrapper = featmix.CutMixAt(model, layer=layer, alpha=alpha, prob=prob, num_classes=num_classes,
                               label_smoothing=label_smoothing, generator=generator, kind=kind, mode=mode,
                               mixup_alpha=mixup_alpha if mixup_alpha > 0 else 1.0, switch_prob=switch_prob,
                               correct_lam=correct_lam, cutmix_minmax=cutmix_minmax)
    return wrapper.train(model.training)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None) or (
            module.module if isinstance(module, nn.parallel.DistributedDataParallel) else None)
        if inner is None:
            return module
        module = inner


class CutMixAtTask(ClassificationTask):
    """timm's ``ClassificationTask`` for a ``featmix.CutMixAt`` model: the mix happens inside the forward.

    In training, ``task(input, target)`` calls ``model(input, target)`` (class-index targets, as the loader
    gives them with input mixing off), and the loss is soft-target cross-entropy on the returned mixed
    targets. A model that is not a ``CutMixAt`` (train.py run without ``--cutmix``/``--mixup``) trains as
    ``ClassificationTask`` does, with ``criterion``; so does a task called in eval mode.

    Args:
        model: a ``featmix.CutMixAt`` (or a plain model, see above).
        criterion, criterion_kwargs, device, dtype, verbose: as ``ClassificationTask``; ``criterion`` scores
            the unmixed calls only.

    Returns:
        Called as ``task(input, target)``: ``{"loss": loss, "output": logits}``.

    Raises:
        TypeError: in training with a ``CutMixAt``, targets that are not class indices (B,) or (B, num_classes)
            (``CutMixAt`` names what it got).
    """

    def __init__(self, model: nn.Module, criterion: Any = None, criterion_kwargs: Optional[Dict[str, Any]] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 verbose: bool = True) -> None:
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype,
                         verbose=verbose)
        self.mixes = isinstance(_unwrap(model), featmix.CutMixAt)
        if verbose:
            if self.mixes:
                _logger.info(f"CutMixAtTask: mixing inside the model ({_unwrap(model).extra_repr()}); "
                             f"training loss: soft-target cross-entropy")
            else:
                _logger.info("CutMixAtTask: the model is not a featmix.CutMixAt, so nothing is mixed by the task")

    def forward(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]:
        module = self.trainable_module
        if not (self.mixes and module.training):
            return super().forward(input, target)
        output, targets = module(input, target)
        return {"loss": soft_target_cross_entropy(output, targets), "output": output}
