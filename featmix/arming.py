"""One forward pass of a network with mixing sites: draw -> arm -> paste (at one site) -> targets.

``MixPass`` drives a fixed list of ``FeatureCutMix`` sites one forward at a time. ``begin`` hands the
draw to the chosen site and marks the pass live; ``finish`` closes it and returns the record of what
the site pasted (an error if the chosen site did not mix); ``abort`` releases every site after an
exception. ``mixing`` is the context manager that does this around a hand-written forward;
``CutMixAt`` uses the same object.

Checkpoint replay: after the forward, the chosen site keeps its record so a recomputed forward
replays the same mix. A recomputation that belongs to an older forward than the latest one (two
forwards, then one backward through both) cannot replay the replaced draw: when the pass knows
which forward a backward is for (``watch_backward``), that raises instead of mixing wrongly.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .layer import FeatureCutMix, find_sites
from .placement import record_box
from .sampling import MixDraw, MixSampler
from .transfer import unpack_draw
from .validation import check_label_smoothing, check_labels, check_num_classes


@dataclass(frozen=True)
class MixRecord:
    """What one batch's mixing did: where, on which grid, which box, and the corrected lam.

    ``lam`` is the weight of each sample's own image (``1 - box area / grid area``; Mixup's lam);
    ``weight`` is the weight its own label gets in the targets (``lam``, or the variant's rule; 1 for
    Cutout). ``box`` is None for Mixup. ``perm`` (host int64 (B,)): sample ``i`` took its partner's
    content from sample ``perm[i]``. ``is_cut`` (per-sample CutMix-or-Mixup only, bool (B,)): which
    samples got a box (the others were blended with their ``lam``). On the compiled path and for
    per-sample draws ``box``, ``lam`` and ``weight`` are tensors (per sample: ``box`` (B, 4),
    ``lam``/``weight`` (B,); no host sync).
    """

    layer: object
    grid: Tuple[int, int]
    box: object
    lam: object
    weight: object
    kind: str = "cutmix"
    perm: Optional[Tensor] = None
    is_cut: Optional[Tensor] = None


class MixPass:
    """Arms a fixed list of sites for one forward pass at a time (see the module docstring)."""

    def __init__(self, sites: Sequence[FeatureCutMix]) -> None:
        self.sites: List[FeatureCutMix] = list(sites)
        self.live = False
        self.gen = 0                       # forwards begun so far
        self.backward_gen: Optional[int] = None  # the forward whose backward ran last, when known
        self.image_hw: Optional[Tuple[int, int]] = None
        self.chosen: Optional[FeatureCutMix] = None

    def begin(self, draw: MixDraw, device: torch.device, image_hw: Optional[Tuple[int, int]] = None) -> None:
        """Arm the site the draw chose (none when the batch is unmixed) and go live."""
        self.gen += 1
        self.image_hw = image_hw
        self.chosen = self.sites[draw.site] if draw.mixed else None
        for site in self.sites:
            site._arm(self, draw if site is self.chosen else None, device)
        self.live = True

    def finish(self) -> Optional[MixRecord]:
        """End the forward: the record of the mix (None when unmixed); an error if the site did not mix."""
        self.live = False
        site = self.chosen
        if site is None:
            return None
        rec = site._record
        if rec is None:
            self.abort()
            raise RuntimeError(f"the mixing layer {site._name()} did not mix this batch: it did not run in the forward "
                               f"pass (it is not on the model's forward path), or the model was in eval mode (call "
                               f"model.train()); choose a module the forward calls{_compile_hint()}")
        # Tensor values may live in a CUDA graph's output pool, overwritten by the next replay: keep copies.
        values = (record_box(rec.box), rec.lam, rec.weight)
        box, lam, weight = (v.clone() if isinstance(v, Tensor) else v for v in values)
        return MixRecord(site.label, rec.grid, box, lam, weight, rec.kind, site._draw.perm,
                         None if rec.is_cut is None else rec.is_cut.clone())

    def abort(self) -> None:
        """Release every site this pass armed (after an exception): no draw outlives its forward."""
        self.live = False
        self.chosen = None
        for site in self.sites:
            if site._owner is self:
                site._release()

    def watch_backward(self, output: object) -> None:
        """Note, when the backward of this forward starts, that recomputations belong to it."""
        gen = self.gen
        if isinstance(output, Tensor) and output.grad_fn is not None:
            output.grad_fn.register_prehook(lambda grad_outputs: self._backward_of(gen))

    def _backward_of(self, gen: int) -> None:
        self.backward_gen = gen

    def check_replay(self) -> None:
        if self.backward_gen is not None and self.backward_gen != self.gen:
            raise RuntimeError(f"activation checkpointing recomputes the forward of batch {self.backward_gen} after "
                               f"batch {self.gen} replaced its mixing draw: run backward once per training forward "
                               f"(gradient accumulation included) before the next forward")

    def targets(self, labels: Tensor, num_classes: int, record: Optional[MixRecord], smoothing: float,
                dtype: torch.dtype) -> Tensor:
        """Soft targets for what the network saw, built from the record the site left."""
        y = F.one_hot_targets(labels, num_classes, smoothing, dtype)
        if record is None or record.kind == "cutout":  # Cutout keeps the labels
            return y
        perm, _, _ = unpack_draw(self.chosen.draw_buffer, labels.shape[0])
        return F.mix_targets(y, perm, record.weight)


def _compile_hint() -> str:
    """The torch.compile cause, named only when this process has compiled something."""
    try:
        from torch._dynamo.utils import counters
        compiled = sum(counters["stats"].values()) > 0
    except Exception:  # noqa: BLE001 - a private counter: no hint rather than a second error
        compiled = False
    if not compiled:
        return ""
    return ("; or torch.compile ran a graph of this model's class compiled before the mixing layer's hook was "
            "attached (Dynamo does not guard on forward hooks by default): compile after wrapping, set "
            "torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling, or call torch._dynamo.reset() "
            "after wrapping")


class MixedBatch:
    """Yielded by ``mixing``: read ``targets`` (and ``record``) after the forward pass."""

    def __init__(self) -> None:
        self._targets: Optional[Tensor] = None
        self._record: Optional[MixRecord] = None
        self._done = False

    @property
    def targets(self) -> Tensor:
        """(B, num_classes) float targets weighted by the area actually pasted."""
        self._require()
        return self._targets

    @property
    def record(self) -> Optional[MixRecord]:
        """Where and how the batch was mixed; None when it was not."""
        self._require()
        return self._record

    def _require(self) -> None:
        if not self._done:
            raise RuntimeError("batch.targets and batch.record are ready when the `with featmix.mixing(...)` block "
                               "has ended: read them after the block")


@contextmanager
def mixing(model: Union[nn.Module, Sequence[FeatureCutMix]], labels: Tensor, num_classes: int,
           sampler: Optional[MixSampler] = None, label_smoothing: float = 0.0) -> Iterator[MixedBatch]:
    """Arm the ``FeatureCutMix`` layers of ``model`` for one forward pass.

    >>> with featmix.mixing(net, labels, num_classes=10, sampler=sampler) as batch:
    ...     logits = net(images)
    >>> loss = F.cross_entropy(logits, batch.targets)

    One draw per batch: one of the model's ``FeatureCutMix`` layers is chosen to mix (uniformly) and
    the others stay the identity. Every layer is released after an exception; a chosen layer that did
    not mix (not on the forward path, or eval mode) is an error at the end of the block.
    """
    sites = list(model) if not isinstance(model, nn.Module) else find_sites(model)
    if not sites:
        raise ValueError("model has no FeatureCutMix layer: insert featmix.FeatureCutMix() where the mix "
                         "should happen, or use featmix.CutMixAt(model, layer=...)")
    num_classes = check_num_classes(num_classes)
    smoothing = check_label_smoothing(label_smoothing)
    check_labels(labels, num_classes, None)
    sampler = sampler if sampler is not None else MixSampler()
    mix = MixPass(sites)
    mix.begin(sampler.draw(labels.shape[0], len(sites)), labels.device)
    batch = MixedBatch()
    try:
        yield batch
        record = mix.finish()
    except BaseException:
        mix.abort()
        raise
    batch._record = record
    batch._targets = mix.targets(labels, num_classes, record, smoothing, torch.float32)
    batch._done = True
