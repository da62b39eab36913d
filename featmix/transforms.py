"""``CutMix``: the input-level batch transform, a drop-in for ``torchvision.transforms.v2.CutMix``."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from .arming import MixRecord
from .sampling import MixSampler, load_draw, unpack_draw
from .validation import (check_flag, check_images, check_label_range, check_label_smoothing, check_labels,
                         check_num_classes, check_writable)


class CutMix(nn.Module):
    """CutMix a batch: ``images, targets = cutmix(images, labels)``.

    One draw per call (gate, lam, box, permutation), the box on the image grid with the reference
    code's rule and the label weight corrected to the pasted area. ``labels`` are class indices (B,)
    or soft/multi-hot targets (B, num_classes); ``targets`` are float (B, num_classes) for
    ``F.cross_entropy(logits, targets)``. By default the caller's tensor is left untouched;
    ``inplace=True`` mixes it in place (only the box is written: the fastest path).

    ``last_mix`` holds the ``MixRecord`` of the latest call (None when it was not mixed). The schedule
    step of ``variant="scheduled"`` is part of ``state_dict()``.
    """

    def __init__(self, num_classes: int, alpha: float = 1.0, prob: float = 1.0, variant: str = "cutmix",
                 label_smoothing: float = 0.0, generator: Optional[torch.Generator] = None,
                 total_steps: Optional[int] = None, inplace: bool = False, center_std: float = 0.25) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.sampler = MixSampler(alpha, prob, variant, total_steps=total_steps, center_std=center_std,
                                  generator=generator)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.inplace = check_flag(inplace, "inplace")
        self.last_mix: Optional[MixRecord] = None
        self.draw_buffer: Optional[Tensor] = None  # the draw on the images' device (storage kept across calls)

    def forward(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        check_images(images)
        check_labels(labels, self.num_classes, images.shape[0], check_range=False)
        if self.inplace:
            check_writable(images)
        draw = self.sampler.draw(images.shape[0])
        targets = self._one_hot(labels, images.device)
        if not draw.mixed:
            self._set_last_mix(None)
            return images, targets
        where = draw.place(images.shape[-2], images.shape[-1])
        # one transfer into storage kept across calls, for the paste and the targets
        inverse = not self.inplace  # the out-of-place kernel writes the box through the inverse permutation
        self.__dict__["draw_buffer"] = load_draw(self.draw_buffer, draw, images.device, inverse, params=False)
        perm, inv, _ = unpack_draw(self.draw_buffer, images.shape[0], inverse, params=False)
        h, w = images.dim() - 2, images.dim() - 1
        images = (F._paste_checked_(images, perm, where.box, h, w) if self.inplace
                  else F.paste_box(images, perm, where.box, h, w, inv_perm=inv))
        self._set_last_mix(MixRecord(0, where.grid, where.box, where.lam, where.weight))
        return images, F.mix_targets(targets, perm, where.weight)

    def _one_hot(self, labels: Tensor, device: torch.device) -> Tensor:
        try:  # the scatter finds an index out of range; the range check then words the error
            labels = labels if labels.device == device else labels.to(device, non_blocking=True)
            return F.one_hot_targets(labels, self.num_classes, self.label_smoothing)
        except RuntimeError:
            check_label_range(labels, self.num_classes)
            raise

    def _set_last_mix(self, record: Optional[MixRecord]) -> None:
        # A plain attribute: nn.Module.__setattr__'s parameter/buffer/module bookkeeping costs ~10 us
        # a call, a measurable share of the whole transform on small batches.
        self.__dict__["last_mix"] = record

    def get_extra_state(self) -> Any:
        return self.sampler.state_dict()

    def set_extra_state(self, state: Any) -> None:
        self.sampler.load_state_dict(state)

    def extra_repr(self) -> str:
        s = self.sampler
        return (f"num_classes={self.num_classes}, alpha={s.alpha}, prob={s.prob}, variant={s.variant!r}, "
                f"label_smoothing={self.label_smoothing}, inplace={self.inplace}")
