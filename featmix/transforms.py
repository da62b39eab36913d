"""Input-level batch transforms: ``CutMix``, ``Mixup``, ``Cutout`` and ``CutMixOrMixup``.

They take every call form of ``torchvision.transforms.v2.CutMix``/``MixUp`` for batches: ``t(images,
labels)``, ``t(batch)`` for the DataLoader's ``[images, labels]``, dict and tuple samples with a
``labels_getter`` (torchvision's default heuristic), extra items passed through unchanged,
``tv_tensors.Image``/``Video`` kept (a video's frames share one box). They also work as timm's
``mixup_fn``: ``mixup_enabled = False`` passes batches through with plain targets, and
``from_timm_args`` maps timm's ``Mixup`` arguments.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .arming import MixRecord, latest_record, leaves
from .kinds import KINDS_BY_NAME, kind_of, place_tensor
from .placement import Placement
from .sampling import MixDraw, MixSampler
from .transfer import load_draw, unpack_draw
from .validation import (
    InputTypeError,
    check_flag,
    check_images,
    check_label_range,
    check_label_smoothing,
    check_labels,
    check_num_classes,
    check_writable,
)

LabelsGetter = Union[str, Callable[[Any], Any], None]


class _BatchMix(nn.Module):
    """The shared machinery of the input-level transforms (see the module docstring)."""

    def __init__(self, num_classes: Optional[int], label_smoothing: float, inplace: bool,
                 labels_getter: LabelsGetter, **sampler_kwargs: Any) -> None:
        super().__init__()
        self.num_classes = None if num_classes is None else check_num_classes(num_classes)
        self.sampler = MixSampler(**sampler_kwargs)
        self._blends_pixels = kind_of(self.sampler.kind).blends_pixels  # then images must be floating point
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.inplace = check_flag(inplace, "inplace")
        self.labels_getter = _labels_getter(labels_getter)
        self.mixup_enabled = True  # timm's train.py sets it to False at --mixup-off-epoch
        self._placed: Any = None  # the latest mix: (0, placement, perm) until ``last_mix`` makes its record
        # the draw on the images' device when it is not the CPU (storage kept across calls, as CUDA graphs need)
        self.draw_buffer: Optional[Tensor] = None

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) == 2 and type(inputs[0]) is Tensor and type(inputs[1]) is Tensor:
            return self._mix(*inputs)  # the common call, without the search below
        sample = inputs if len(inputs) > 1 else inputs[0]
        _reject_unsupported(sample)
        labels = self.labels_getter(sample)
        images = _find_images(sample, labels)
        plain = images.as_subclass(Tensor) if type(images) is not Tensor else images
        mixed, targets = self._mix(plain, labels)
        if type(images) is not Tensor:
            mixed = images if mixed is plain else mixed.as_subclass(type(images))
        return _swap(sample, {id(images): mixed, id(labels): targets})

    def _mix(self, images: Tensor, labels: Optional[Tensor]) -> Tuple[Tensor, Any]:
        """Mix one batch: (images, targets), with the draw, placement and paste of the sampler's kind."""
        num_classes = self._check(images, labels)
        device = images.device
        if not self.mixup_enabled:
            return images, self._targets(labels, num_classes, device)
        draw = self.sampler.draw(images.shape[0])
        targets = self._targets(labels, num_classes, device)
        if not draw.mixed:
            self.__dict__["_placed"] = None
            return images, targets
        shape = images.shape
        if draw.samples is None and device.type == "cpu":  # the host draw as it is; the box as Python ints
            perm, inv, where = draw.perm, None, draw.place(shape[-2], shape[-1])
        else:
            perm, inv, where = self._place_on_device(draw, images, labels)
        kind = KINDS_BY_NAME[where.kind]
        images = kind.paste(images, where, perm, inv, len(shape) - 2, len(shape) - 1, self.inplace)
        self.__dict__["_placed"] = (0, where, draw.perm)  # a plain attribute: see ``_set``
        if num_classes is None:  # Cutout without classes: the labels as they came
            return images, targets
        return images, kind.mix_targets(targets, perm, where)

    def _place_on_device(self, draw: MixDraw, images: Tensor, labels: Optional[Tensor]
                         ) -> Tuple[Tensor, Optional[Tensor], Placement]:
        """(perm, inverse perm or None, placement) for a per-sample draw, or for images off the CPU (where
        the draw goes to the device in one transfer into ``draw_buffer``)."""
        per_sample = draw.samples is not None
        device, shape = images.device, images.shape
        if device.type == "cpu":  # the host draw itself: new for this call, nothing refills it
            perm, inv, params = draw.parts(inverse=False, params=per_sample)
        else:
            # the inverse permutation: a whole-batch CutMix's out-of-place paste (per sample: made where needed)
            inverse = draw.kind == "cutmix" and not (self.inplace or per_sample)
            self._set("draw_buffer", load_draw(self.draw_buffer, draw, device, inverse, params=per_sample))
            packed = self.draw_buffer
            if torch.is_grad_enabled() and (images.requires_grad or getattr(labels, "requires_grad", False)):
                packed = packed.clone()  # autograd keeps the permutation: not the buffer the next call refills
            perm, inv, params = unpack_draw(packed, shape[0], inverse, params=per_sample)
        h, w = shape[-2:]
        where = (place_tensor(params, h, w, draw.variant, draw.rule, draw.per_sample_kind) if per_sample
                 else draw.place(h, w))
        return perm, inv, where

    @property
    def last_mix(self) -> Optional[MixRecord]:
        """The ``MixRecord`` of the latest mixed batch (None when it was not mixed), made when first read."""
        return latest_record(self.__dict__)

    def _check(self, images: object, labels: object) -> Optional[int]:
        """Validate the batch once; the class count (from num_classes or 2-D labels)."""
        check_images(images, floating=self._blends_pixels, dims=(4, 5), why=" for Mixup (it blends pixels)")
        if self.inplace:
            check_writable(images)
        if labels is None and self.sampler.kind == "cutout":
            return None
        if not isinstance(labels, Tensor):
            raise InputTypeError(f"labels must be a torch.Tensor: class indices (B,) or targets (B, num_classes); "
                                 f"got {type(labels).__name__}")
        num_classes = self.num_classes
        if num_classes is None and labels.dim() == 2:
            num_classes = labels.shape[1]
        if num_classes is None and self.sampler.kind != "cutout":
            raise ValueError(f"num_classes must be passed when labels are class indices (shape {tuple(labels.shape)}); "
                             f"it may be None only for (B, num_classes) targets")
        if num_classes is not None:
            check_labels(labels, num_classes, images.shape[0], check_range=False)
        elif labels.shape[:1] != images.shape[:1]:
            raise ValueError(f"labels must have one entry per image: batch size {images.shape[0]}, got "
                             f"{labels.shape[0]} labels")
        return num_classes

    def _targets(self, labels: Optional[Tensor], num_classes: Optional[int], device: torch.device) -> Any:
        if num_classes is None:  # Cutout without classes: the labels as they came
            return labels
        labels = labels if labels.device == device else labels.to(device, non_blocking=True)
        try:  # the scatter finds an index out of range; the range check then words the error
            return F.one_hot_targets(labels, num_classes, self.label_smoothing)
        except (RuntimeError, IndexError):
            check_label_range(labels, num_classes)
            raise

    def _set(self, name: str, value: Any) -> None:
        # A plain attribute: nn.Module.__setattr__'s parameter/buffer/module bookkeeping costs ~10 us a
        # call, a measurable share of the whole transform on small batches.
        self.__dict__[name] = value

    def get_extra_state(self) -> Any:
        return self.sampler.state_dict()

    def set_extra_state(self, state: Any) -> None:
        self.sampler.load_state_dict(state)

    def extra_repr(self) -> str:
        s = self.sampler
        return (f"num_classes={self.num_classes}, kind={s.kind!r}, alpha={s.alpha}, prob={s.prob}, "
                f"variant={s.variant!r}, mode={s.mode!r}, label_smoothing={self.label_smoothing}, "
                f"inplace={self.inplace}")


class CutMix(_BatchMix):
    """CutMix a batch: ``images, targets = cutmix(images, labels)`` (and torchvision's other call forms).

    One draw per call (gate, lam, box, permutation), the box on the image grid with the reference
    code's rule and the label weight corrected to the pasted area (``correct_lam``). ``labels`` are
    class indices (B,) or soft/multi-hot targets (B, num_classes). ``last_mix`` holds the latest
    ``MixRecord`` (None when not mixed); the draw state (generator, ``scheduled`` step) is part of
    ``state_dict()``.

    Args:
        num_classes: the class count (may be None only for (B, K) soft labels).
        alpha: lam ~ Beta(alpha, alpha).
        prob: the chance a batch is mixed.
        variant: the paper's Table 8 variant (``featmix.VARIANTS``).
        total_steps: the schedule's length for ``variant="scheduled"``.
        center_std: the box centre's std for ``variant="center_gaussian"``.
        correct_lam: the label weight is the pasted area (True) or the drawn lam.
        cutmix_minmax: timm's box-side range as fractions of each side (replaces the Beta draw).
        label_smoothing: applied to the one-hot labels before mixing (``(1 - eps) * y + eps / K``).
        generator: a CPU ``torch.Generator``; all randomness (gate, lam, box, permutation) comes from it.
        inplace: mix the caller's tensor in place (the fastest path; a leaf that requires grad is an error).
        mode: ``"batch"`` (one draw for the batch, the paper's), ``"elem"`` or ``"pair"`` (per sample, timm's).
        labels_getter: where the labels are in a sample (torchvision's ``"default"`` heuristic, a callable,
            or None).

    Returns (of a call):
        ``(images, targets)``: the mixed (B, C, H, W) images in their dtype and memory format, and float
        (B, num_classes) targets; other call forms (a tuple, a dict sample) come back in their container.

    Raises:
        ValueError: a bad argument (named, with its valid range); labels outside [0, num_classes);
            one label per image missing.
        InputTypeError: images that are not a (B, C, H, W) tensor (a ``TypeError`` and a ``ValueError``).

    Example:
        >>> cutmix = featmix.CutMix(num_classes=10, generator=torch.Generator().manual_seed(0))
        >>> images, targets = cutmix(torch.rand(8, 3, 32, 32), torch.arange(8))
        >>> targets.shape, bool(torch.allclose(targets.sum(1), torch.ones(8)))
        (torch.Size([8, 10]), True)
    """

    def __init__(self, num_classes: Optional[int] = None, alpha: float = 1.0, prob: float = 1.0,
                 variant: str = "cutmix", label_smoothing: float = 0.0, generator: Optional[torch.Generator] = None,
                 total_steps: Optional[int] = None, inplace: bool = False, center_std: float = 0.25, *,
                 mode: str = "batch", correct_lam: bool = True, cutmix_minmax: Optional[Tuple[float, float]] = None,
                 labels_getter: LabelsGetter = "default") -> None:
        super().__init__(num_classes, label_smoothing, inplace, labels_getter, alpha=alpha, prob=prob,
                         variant=variant, kind="cutmix", mode=mode, correct_lam=correct_lam,
                         cutmix_minmax=cutmix_minmax, total_steps=total_steps, center_std=center_std,
                         generator=generator)


class Mixup(_BatchMix):
    """Mixup a batch: ``lam * x + (1 - lam) * x[perm]``, targets with the same lam (no box, no correction).

    Args:
        num_classes: the class count (may be None only for (B, K) soft labels).
        alpha: lam ~ Beta(alpha, alpha).
        prob: the chance a batch is mixed.
        variant: a label/schedule variant (``"cutmix"`` = none, ``"scheduled"``, ``"one_hot"``,
            ``"complete_label"``).
        total_steps: the schedule's length for ``variant="scheduled"``.
        label_smoothing: applied to the one-hot labels before mixing (``(1 - eps) * y + eps / K``).
        generator: a CPU ``torch.Generator``; all randomness (gate, lam, box, permutation) comes from it.
        inplace: mix the caller's tensor in place (the fastest path; a leaf that requires grad is an error).
        mode: ``"batch"`` (one draw for the batch, the paper's), ``"elem"`` or ``"pair"`` (per sample, timm's).
        labels_getter: where the labels are in a sample (torchvision's ``"default"`` heuristic, a callable,
            or None).

    Returns (of a call):
        ``(images, targets)``: the mixed (B, C, H, W) images in their dtype and memory format, and float
        (B, num_classes) targets; other call forms (a tuple, a dict sample) come back in their container.

    Raises:
        ValueError: a bad argument (named, with its valid range); labels outside [0, num_classes);
            one label per image missing.
        InputTypeError: images that are not a (B, C, H, W) tensor (a ``TypeError`` and a ``ValueError``).

    Example:
        >>> mixup = featmix.Mixup(num_classes=3, generator=torch.Generator().manual_seed(0))
        >>> images, targets = mixup(torch.ones(2, 1, 4, 4), torch.tensor([0, 2]))
        >>> bool(torch.all(images == 1)), targets.shape
        (True, torch.Size([2, 3]))
    """

    def __init__(self, num_classes: Optional[int] = None, alpha: float = 1.0, prob: float = 1.0,
                 label_smoothing: float = 0.0, generator: Optional[torch.Generator] = None, inplace: bool = False, *,
                 mode: str = "batch", variant: str = "cutmix", total_steps: Optional[int] = None,
                 labels_getter: LabelsGetter = "default") -> None:
        super().__init__(num_classes, label_smoothing, inplace, labels_getter, alpha=alpha, prob=prob,
                         variant=variant, kind="mixup", mode=mode, total_steps=total_steps, generator=generator)


class Cutout(_BatchMix):
    """Cutout: a box of ``size`` of each side zeroed (centre uniform, clipped at the border), labels unchanged.

    The paper's CIFAR setting, 16 x 16 on 32 x 32, is ``size=0.5``. With ``num_classes`` the labels come
    back as one-hot (smoothed) targets, like the other transforms; without, as they came. Cutout needs
    no partner: a batch of one is cut too.

    Args:
        size: the box side as a fraction of each side.
        prob: the chance a batch is cut.
        num_classes: the class count, or None to return the labels as they came.
        variant: ``"cutmix"`` (none), ``"center_gaussian"`` or ``"scheduled"``.
        center_std: the box centre's std for ``variant="center_gaussian"``.
        total_steps: the schedule's length for ``variant="scheduled"``.
        label_smoothing: applied to the one-hot labels before mixing (``(1 - eps) * y + eps / K``).
        generator: a CPU ``torch.Generator``; all randomness (gate, lam, box, permutation) comes from it.
        inplace: mix the caller's tensor in place (the fastest path; a leaf that requires grad is an error).
        mode: ``"batch"`` (one draw for the batch, the paper's), ``"elem"`` or ``"pair"`` (per sample, timm's).
        labels_getter: where the labels are in a sample (torchvision's ``"default"`` heuristic, a callable,
            or None).

    Returns (of a call):
        ``(images, targets)``: the mixed (B, C, H, W) images in their dtype and memory format, and float
        (B, num_classes) targets; other call forms (a tuple, a dict sample) come back in their container.

    Raises:
        ValueError: a bad argument (named, with its valid range); labels outside [0, num_classes);
            one label per image missing.
        InputTypeError: images that are not a (B, C, H, W) tensor (a ``TypeError`` and a ``ValueError``).

    Example:
        >>> cutout = featmix.Cutout(size=0.5, generator=torch.Generator().manual_seed(0))
        >>> images, labels = cutout(torch.ones(1, 3, 8, 8), torch.tensor([4]))
        >>> int((images == 0).sum()), labels.tolist()
        (48, [4])
    """

    def __init__(self, size: float = 0.5, prob: float = 1.0, num_classes: Optional[int] = None,
                 label_smoothing: float = 0.0, generator: Optional[torch.Generator] = None, inplace: bool = False, *,
                 mode: str = "batch", variant: str = "cutmix", center_std: float = 0.25,
                 total_steps: Optional[int] = None, labels_getter: LabelsGetter = "default") -> None:
        super().__init__(num_classes, label_smoothing, inplace, labels_getter, prob=prob, variant=variant,
                         kind="cutout", mode=mode, cutout_size=size, center_std=center_std,
                         total_steps=total_steps, generator=generator)


class CutMixOrMixup(_BatchMix):
    """timm's recipe: each batch (or each sample, ``mode="elem"``) gets CutMix with chance ``switch_prob``,
    else Mixup, each with its own alpha.

    Args:
        num_classes: the class count (may be None only for (B, K) soft labels).
        cutmix_alpha: CutMix's lam ~ Beta(cutmix_alpha, cutmix_alpha).
        mixup_alpha: Mixup's lam ~ Beta(mixup_alpha, mixup_alpha).
        switch_prob: the chance of CutMix over Mixup.
        prob: the chance a batch is mixed.
        correct_lam: CutMix's label weight is the pasted area (True) or the drawn lam.
        cutmix_minmax: timm's box-side range as fractions of each side.
        label_smoothing: applied to the one-hot labels before mixing (``(1 - eps) * y + eps / K``).
        generator: a CPU ``torch.Generator``; all randomness (gate, lam, box, permutation) comes from it.
        inplace: mix the caller's tensor in place (the fastest path; a leaf that requires grad is an error).
        mode: ``"batch"`` (one draw for the batch, the paper's), ``"elem"`` or ``"pair"`` (per sample, timm's).
        labels_getter: where the labels are in a sample (torchvision's ``"default"`` heuristic, a callable,
            or None).

    Returns (of a call):
        ``(images, targets)``: the mixed (B, C, H, W) images in their dtype and memory format, and float
        (B, num_classes) targets; other call forms (a tuple, a dict sample) come back in their container.

    Raises:
        ValueError: a bad argument (named, with its valid range); labels outside [0, num_classes);
            one label per image missing.
        InputTypeError: images that are not a (B, C, H, W) tensor (a ``TypeError`` and a ``ValueError``).

    Example:
        >>> mix = featmix.CutMixOrMixup(num_classes=4, generator=torch.Generator().manual_seed(0))
        >>> images, targets = mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
        >>> mix.last_mix.kind in ("cutmix", "mixup")
        True
    """

    def __init__(self, num_classes: Optional[int] = None, cutmix_alpha: float = 1.0, mixup_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.0,
                 generator: Optional[torch.Generator] = None, inplace: bool = False, *, mode: str = "batch",
                 correct_lam: bool = True, cutmix_minmax: Optional[Tuple[float, float]] = None,
                 labels_getter: LabelsGetter = "default") -> None:
        super().__init__(num_classes, label_smoothing, inplace, labels_getter, alpha=cutmix_alpha,
                         mixup_alpha=mixup_alpha, switch_prob=switch_prob, prob=prob, kind="cutmix_or_mixup",
                         mode=mode, correct_lam=correct_lam, cutmix_minmax=cutmix_minmax, generator=generator)


def from_timm_args(mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0,
                   cutmix_minmax: Optional[Tuple[float, float]] = None, prob: float = 1.0, switch_prob: float = 0.5,
                   mode: str = "batch", correct_lam: bool = True, label_smoothing: float = 0.1,
                   num_classes: int = 1000, generator: Optional[torch.Generator] = None) -> _BatchMix:
    """The featmix transform for ``timm.data.Mixup``'s arguments (same names and defaults, label
    smoothing 0.1 included): CutMix, Mixup, or CutMixOrMixup when both alphas are > 0.

    Args:
        mixup_alpha: Mixup's Beta parameter (0: no Mixup).
        cutmix_alpha: CutMix's Beta parameter (0: no CutMix).
        cutmix_minmax: CutMix's box-side range as fractions of each side (enables CutMix).
        prob: the chance a batch is mixed.
        switch_prob: the chance of CutMix over Mixup when both are on.
        mode: ``"batch"``, ``"elem"`` or ``"pair"``.
        correct_lam: CutMix's label weight is the pasted area.
        label_smoothing: timm's ``smoothing`` (0.1 by default, as timm's).
        num_classes: the class count.
        generator: a CPU ``torch.Generator`` for the draws.

    Returns:
        A ``CutMix``, ``Mixup`` or ``CutMixOrMixup`` transform (``mixup_enabled = False`` turns it off,
        as timm's ``train.py`` does at ``--mixup-off-epoch``).

    Raises:
        ValueError: neither alpha is > 0 and no ``cutmix_minmax``.

    Example:
        >>> type(featmix.from_timm_args(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)).__name__
        'CutMixOrMixup'
    """
    if cutmix_minmax is not None:
        cutmix_alpha = 1.0  # timm: a min/max box size enables CutMix and replaces its alpha
    common = dict(prob=prob, label_smoothing=label_smoothing, generator=generator, mode=mode)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        return CutMixOrMixup(num_classes, cutmix_alpha, mixup_alpha, switch_prob, correct_lam=correct_lam,
                             cutmix_minmax=cutmix_minmax, **common)
    if cutmix_alpha > 0:
        return CutMix(num_classes, cutmix_alpha, correct_lam=correct_lam, cutmix_minmax=cutmix_minmax, **common)
    if mixup_alpha > 0:
        return Mixup(num_classes, mixup_alpha, **common)
    raise ValueError(f"timm's Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax; got mixup_alpha="
                     f"{mixup_alpha}, cutmix_alpha={cutmix_alpha}, cutmix_minmax={cutmix_minmax}")


# -- torchvision's call forms -----------------------------------------------------------------------

def _labels_getter(getter: LabelsGetter) -> Callable[[Any], Any]:
    if getter == "default":
        return _default_labels
    if getter is None:
        return lambda sample: None
    if callable(getter):
        return getter
    raise ValueError(f"labels_getter must be 'default', a callable or None, got {getter!r}")


def _default_labels(sample: Any) -> Any:
    """torchvision's documented heuristic: the second item of a tuple/list, or a label-like dict key."""
    if isinstance(sample, (tuple, list)):
        if len(sample) < 2:
            raise ValueError(f"expected (images, labels) or a sample whose second item holds the labels; got a "
                             f"{type(sample).__name__} of {len(sample)} item(s)")
        sample = sample[1]
    if not isinstance(sample, Mapping):
        return sample  # the labels (checked to be a tensor with the images)
    keys = [k for k in sample if isinstance(k, str)]
    key = next((k for k in keys if k.lower() == "labels"), None)
    key = key or next((k for k in keys if "label" in k.lower()), None)
    if key is None:
        raise ValueError(f"no label-like key in the sample (keys: {list(sample)}): pass labels_getter=")
    return sample[key]


def _find_images(sample: Any, labels: Any) -> Tensor:
    """The tv_tensors Image/Video of the sample, else its first plain tensor that is not the labels."""
    tensors = [x for x in leaves(sample) if isinstance(x, Tensor) and x is not labels]
    typed = [x for x in tensors if type(x).__name__ in ("Image", "Video") and _from_torchvision(x)]
    if len(typed) > 1:
        raise ValueError(f"the sample holds {len(typed)} images/videos; one batch of images per call is expected")
    found = typed or [x for x in tensors if type(x) is Tensor]
    if not found:
        first = sample[0] if isinstance(sample, (tuple, list)) and sample else sample
        raise InputTypeError(f"images must be a torch.Tensor of shape (B, C, H, W) (or a tv_tensors.Image/Video); "
                             f"found none in the sample (first item: {type(first).__name__})")
    return found[0]


def _reject_unsupported(sample: Any) -> None:
    for x in leaves(sample):
        name = type(x).__name__
        if (_from_torchvision(x) and name in ("BoundingBoxes", "Mask", "KeyPoints")) or \
                type(x).__module__.startswith("PIL"):
            raise ValueError(f"batch mixing does not support PIL images, bounding boxes, keypoints or masks; the "
                             f"sample holds a {name}")


def _from_torchvision(x: object) -> bool:
    return type(x).__module__.startswith("torchvision")


def _swap(obj: Any, new: Dict[int, Any]) -> Any:
    """``obj`` with the leaves whose id is in ``new`` replaced (same containers, same order)."""
    if id(obj) in new:
        return new[id(obj)]
    if isinstance(obj, Mapping):
        return type(obj)((k, _swap(v, new)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_swap(v, new) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_swap(v, new) for v in obj)
    return obj
