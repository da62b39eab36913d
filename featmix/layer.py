"""``FeatureCutMix``: CutMix as a layer, and ``mixing``: how a training loop arms it for one batch.

A ``FeatureCutMix`` is the identity until a draw arms it. Arming is per forward pass and scoped: the
``mixing`` context (or ``CutMixAt``, which uses the same two functions) picks the one site that mixes,
hands it the batch's permutation and box parameters, and disarms every site on exit, so nothing from
one batch can leak into the next. The armed site records the box it pasted on its own grid; the
targets are built from that record, so they always describe what the network saw.

State lives in plain attributes of persistent modules (a bool and a few tensors) rather than in a
fresh object per batch: under ``torch.compile`` that gives guards on a bool and on tensor metadata
only, so no batch triggers a recompile.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .sampling import MixDraw, MixSampler

try:  # torch >= 2.3
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # pragma: no cover - torch 2.1/2.2
    from torch._dynamo import is_compiling as _is_compiling


@dataclass(frozen=True)
class MixRecord:
    """What one batch's mixing did: where, on which grid, which box, and the corrected lam.

    ``lam`` is the pasted-area-corrected weight of each sample's own image (``1 - box area / grid
    area``); ``weight`` is the weight its own label gets in the targets (``lam``, or the variant's
    rule). On the compiled path ``box``, ``lam`` and ``weight`` are tensors (no host sync).
    """

    layer: object
    grid: Tuple[int, int]
    box: object
    lam: object
    weight: object


class FeatureCutMix(nn.Module):
    """CutMix on the output of the previous layer; the identity in eval mode or when not armed.

    Works on (B, C, H, W) maps (box on the last two dims, or on ``hw_dims``) and on (B, N, C) token
    sequences: the first ``num_prefix_tokens`` tokens (class/register tokens) are left alone and the
    rest are laid out on ``grid`` (inferred as a square when not given). Mixing is out of place and
    differentiable, so it is safe right after ``nn.ReLU(inplace=True)``.
    """

    def __init__(self, hw_dims: Tuple[int, int] = (-2, -1), num_prefix_tokens: int = 0,
                 grid: Optional[Tuple[int, int]] = None, label: object = None) -> None:
        super().__init__()
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.hw_dims = tuple(hw_dims)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid = tuple(grid) if grid is not None else None
        self.label = label
        self._disarm()

    # -- arming (called by ``mixing`` / ``CutMixAt``, never by user code) -------------------------
    def _disarm(self) -> None:
        self._armed = False
        self._draw: Optional[MixDraw] = None
        self._perm: Optional[Tensor] = None
        self._inv: Optional[Tensor] = None
        self._params: Optional[Tensor] = None
        self._fixed = False
        self._result = None

    def _arm(self, draw: MixDraw, device: torch.device) -> None:
        self._draw = draw
        self._perm = draw.perm.to(device, non_blocking=True)
        self._inv = F.inverse_permutation(draw.perm).to(device, non_blocking=True)
        # float64 [lam, centre_y, centre_x] for the compiled path: the same arithmetic as the host.
        self._params = torch.tensor([draw.lam, draw.center[0], draw.center[1]],
                                    dtype=torch.float64).to(device, non_blocking=True)
        self._fixed = draw.variant == "fixed_size"
        self._result = None
        self._armed = True

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not (self._armed and self.training):
            return x
        self._armed = False  # exactly one mix per forward pass, even if this module runs twice
        if x.dim() == 3:
            return self._mix_tokens(x)
        if x.dim() < 3:
            raise ValueError(f"FeatureCutMix needs a (B, C, H, W) map or (B, N, C) tokens; got shape "
                             f"{tuple(x.shape)}")
        hdim, wdim = (d % x.dim() for d in self.hw_dims)
        return self._mix_map(x, hdim, wdim)

    def _mix_map(self, x: Tensor, hdim: int, wdim: int) -> Tensor:
        h, w = x.shape[hdim], x.shape[wdim]
        if _is_compiling():
            box = F.box_tensor(self._params, h, w, fixed_size=self._fixed_size())
            self._result = (h, w, box)
            return F.paste_box_masked(x, self._perm, box, hdim, wdim)
        box = self._draw.box_on_grid(h, w)
        self._result = (h, w, box)
        return F.paste_box(x, self._perm, box, hdim, wdim, inv_perm=self._inv)

    def _mix_tokens(self, x: Tensor) -> Tensor:
        p = self.num_prefix_tokens
        gh, gw = self._token_grid(x.shape[1] - p)
        spatial = x[:, p:].unflatten(1, (gh, gw))          # (B, gh, gw, C) view
        if _is_compiling():
            box = F.box_tensor(self._params, gh, gw, fixed_size=self._fixed_size())
            self._result = (gh, gw, box)
            mixed = F.paste_box_masked(spatial, self._perm, box, 1, 2).flatten(1, 2)
            return torch.cat([x[:, :p], mixed], dim=1) if p else mixed
        box = self._draw.box_on_grid(gh, gw)
        self._result = (gh, gw, box)
        mixed = F.paste_box(spatial, self._perm, box, 1, 2, inv_perm=self._inv).flatten(1, 2)
        return torch.cat([x[:, :p], mixed], dim=1) if p else mixed

    def _token_grid(self, n: int) -> Tuple[int, int]:
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot lay {n} tokens (after {self.num_prefix_tokens} prefix tokens) on a "
                             f"grid: pass grid=(h, w) or num_prefix_tokens= to FeatureCutMix")
        return side, side

    def _fixed_size(self) -> bool:
        return self._fixed

    def extra_repr(self) -> str:
        parts = []
        if self.label is not None:
            parts.append(f"label={self.label!r}")
        if self.num_prefix_tokens:
            parts.append(f"num_prefix_tokens={self.num_prefix_tokens}")
        if self.grid is not None:
            parts.append(f"grid={self.grid}")
        return ", ".join(parts)


def find_sites(model: nn.Module) -> List[FeatureCutMix]:
    """The ``FeatureCutMix`` modules of ``model`` in registration order."""
    return [m for m in model.modules() if isinstance(m, FeatureCutMix)]


def arm(sites: Sequence[FeatureCutMix], draw: MixDraw, device: torch.device) -> Optional[FeatureCutMix]:
    """Disarm every site, then arm the one the draw chose (none when the batch is unmixed)."""
    for s in sites:
        s._disarm()
    if not draw.mixed:
        return None
    site = sites[draw.site]
    site._arm(draw, device)
    return site


def disarm(sites: Sequence[FeatureCutMix]) -> None:
    for s in sites:
        s._disarm()


def build_targets(labels: Tensor, num_classes: int, draw: MixDraw, site: Optional[FeatureCutMix],
                  smoothing: float = 0.0, dtype: torch.dtype = torch.float32
                  ) -> Tuple[Tensor, Optional[MixRecord]]:
    """Soft targets for what the network saw, and the record of the mix (None when unmixed).

    A chosen site that never ran (not on the forward path) means nothing was mixed: plain targets.
    """
    y = F.one_hot_targets(labels, num_classes, smoothing, dtype)
    result = site._result if site is not None else None
    if result is None:
        return y, None
    h, w, box = result
    if isinstance(box, Tensor):
        lam = 1.0 - F.box_area_fraction(box, h, w)
        if draw.variant == "one_hot":
            weight = (lam >= 0.5).to(torch.float64)
        elif draw.variant == "complete_label":
            weight = torch.full_like(lam, 0.5)
        else:
            weight = lam
    else:
        y1, y2, x1, x2 = box
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
        weight = draw.label_weight(box, h, w)
    return F.mix_targets(y, draw.perm, weight), MixRecord(site.label, (h, w), box, lam, weight)


class MixedBatch:
    """Yielded by ``mixing``: read ``targets`` (and ``record``) after the forward pass."""

    def __init__(self, labels: Tensor, num_classes: int, draw: MixDraw, site: Optional[FeatureCutMix],
                 smoothing: float) -> None:
        self._labels, self._num_classes, self._smoothing = labels, num_classes, smoothing
        self.draw, self._site = draw, site
        self._done: Optional[Tuple[Tensor, Optional[MixRecord]]] = None

    def _build(self) -> Tuple[Tensor, Optional[MixRecord]]:
        # Inside the block the forward pass may not have run yet: build afresh; after it, keep.
        if self._done is not None:
            return self._done
        return build_targets(self._labels, self._num_classes, self.draw, self._site, self._smoothing)

    def _close(self) -> None:
        self._done = self._build()

    @property
    def targets(self) -> Tensor:
        """(B, num_classes) float targets weighted by the area actually pasted."""
        return self._build()[0]

    @property
    def record(self) -> Optional[MixRecord]:
        """Where and how the batch was mixed; None when it was not."""
        return self._build()[1]


@contextmanager
def mixing(model: Union[nn.Module, Sequence[FeatureCutMix]], labels: Tensor, num_classes: int,
           sampler: Optional[MixSampler] = None, label_smoothing: float = 0.0) -> Iterator[MixedBatch]:
    """Arm the ``FeatureCutMix`` layers of ``model`` for one forward pass.

    >>> with featmix.mixing(net, labels, num_classes=10, sampler=sampler) as batch:
    ...     logits = net(images)
    >>> loss = F.cross_entropy(logits, batch.targets)

    One draw per batch: one of the model's ``FeatureCutMix`` layers is chosen to mix (uniformly) and
    the others stay the identity. Every layer is disarmed on exit, even after an exception.
    """
    from .validation import check_labels, check_num_classes  # local: validation imports nothing heavy

    sites = list(model) if not isinstance(model, nn.Module) else find_sites(model)
    if not sites:
        raise ValueError("model has no FeatureCutMix layer: insert featmix.FeatureCutMix() where the mix "
                         "should happen, or use featmix.CutMixAt(model, layer=...)")
    check_num_classes(num_classes)
    check_labels(labels, num_classes, None)
    sampler = sampler if sampler is not None else MixSampler()
    draw = sampler.draw(labels.shape[0], len(sites))
    site = arm(sites, draw, labels.device)
    try:
        batch = MixedBatch(labels, num_classes, draw, site, label_smoothing)
        yield batch
        batch._close()
    finally:
        disarm(sites)
