"""One forward pass of a network with mixing sites: draw -> arm -> paste (at one site) -> targets.

Two objects own all the state, and nothing else writes it:

- ``MixPass`` drives a fixed list of ``FeatureCutMix`` sites, one forward at a time. It holds what a
  compiled graph may read while it traces (``live``, the chosen site, the draw's placement rule: a few
  Python values that stay the same from batch to batch), and it remembers the forwards that finished
  until their backward has run.
- ``MixForward`` is one training forward: its host draw, its chosen site, its own copy of the draw on
  the device, and the placement the site recorded.

A site asks its pass what to do (``MixPass.forward_for``): paste during the live forward (once), replay
the placement of the forward whose backward is running (activation checkpointing recomputes forwards
inside backward), or nothing. The backward a recomputation belongs to is known exactly: when the
backward of a forward's output starts, that forward is bound to the running autograd graph task, and
the binding ends with the task. So any order of forwards and backwards replays each forward's own mix;
a recomputation in an unrelated backward (another wrapper, the plain model, a later unarmed forward)
mixes nothing; and one backward through two checkpointed forwards of the same sites, which cannot be
told apart, is an error.

``mixing`` is the context manager that runs this around a hand-written forward; ``CutMixAt`` uses the
same objects.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .kinds import kind_of
from .layer import FeatureCutMix, find_sites
from .placement import Placement, Rule, record_box
from .sampling import MixDraw, MixSampler
from .transfer import Parts, load_draw, stage_draw, unpack_draw, write_params
from .validation import check_label_range, check_label_smoothing, check_labels, check_num_classes


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

    Example:
        >>> cutmix = featmix.CutMix(num_classes=2, variant="fixed_size", generator=torch.Generator().manual_seed(0))
        >>> _ = cutmix(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
        >>> record = cutmix.last_mix
        >>> record.grid, record.lam, record.perm.tolist()
        ((8, 8), 0.75, [1, 0])
    """

    layer: object
    grid: Tuple[int, int]
    box: object
    lam: object
    weight: object
    kind: str = "cutmix"
    perm: Optional[Tensor] = None
    is_cut: Optional[Tensor] = None

    @classmethod
    def of(cls, layer: object, where: Placement, perm: Tensor) -> "MixRecord":
        """The record of a placement, its tensor values copied: they may live in storage that a later
        batch overwrites (a device draw buffer, a CUDA graph's output pool).

        Args:
            layer: where the mix happened (the site's label; 0 for the input transforms).
            where: the placement the mix pasted.
            perm: the host permutation of the draw.

        Returns:
            The ``MixRecord``.
        """
        values = (record_box(where.box), where.lam, where.weight, where.is_cut)
        box, lam, weight, is_cut = (v.clone() if isinstance(v, Tensor) else v for v in values)
        return cls(layer, where.grid, box, lam, weight, where.kind, perm, is_cut)


def latest_record(state: Dict[str, Any]) -> Optional[MixRecord]:
    """The latest mix an owner keeps in ``state["_placed"]`` (its ``__dict__``): None when unmixed, else the
    arguments of ``MixRecord.of`` (layer, placement, perm), made into the record on the first read and kept.

    Args:
        state: the owner's ``__dict__`` (``CutMixAt``, the input transforms).

    Returns:
        The ``MixRecord``, or None.
    """
    placed = state["_placed"]
    if placed is None or isinstance(placed, MixRecord):
        return placed
    record = state["_placed"] = MixRecord.of(*placed)
    return record


class MixForward:
    """One training forward: the host draw, the chosen site, the draw on the device, the placement.

    On the CPU the draw's own host tensors serve (new per draw, never refilled: no copy). Elsewhere
    the device copy starts as the chosen site's reusable buffer (no extra op); it becomes the
    forward's own copy when autograd will save it or when a later forward refills the buffer, so
    nothing saved for backward aliases storage that the next forward overwrites.
    """

    __slots__ = ("draw", "chosen", "image_hw", "device", "_buf", "_version", "_own", "_parts", "_unpacked", "record",
                 "bound", "released_by", "replays", "watched", "recomputable")

    def __init__(self, draw: MixDraw, chosen: Optional[FeatureCutMix], image_hw: Optional[Tuple[int, int]],
                 device: torch.device, buf: Optional[Tensor], parts: Optional[Parts] = None) -> None:
        self.draw, self.chosen, self.image_hw, self.device = draw, chosen, image_hw, device
        self._buf = buf
        self._version = None if buf is None or buf.is_inference() else buf._version
        self._own: Optional[Tensor] = None
        # the draw's host tensors (perm, inverse or None, params): new for this draw and never refilled, so
        # on the CPU they are the forward's own copy as they stand (no clone, no views)
        self._parts = parts
        self._unpacked: Optional[Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]] = None
        self.record: Optional[Placement] = None
        self.bound = False                          # its backward has started at least once
        self.released_by: Set[int] = set()         # ids of sites an unarmed forward ran through since
        self.replays: Set[Tuple[int, int]] = set()  # (graph task, site id) where it was replayed
        self.watched = False                        # an output of it will bind its backward
        self.recomputable = False                   # its site pasted where checkpointing may run it again

    def tensors(self, device: torch.device, own: bool) -> Tensor:
        """The packed draw on ``device`` (``transfer.load_draw`` layout); a private copy when ``own``."""
        if self._own is not None and self._own.device == device:
            return self._own
        buf = self._buf
        fresh = buf is not None and buf.device == device and (self._version is None or buf._version == self._version)
        if fresh and not own:
            return buf
        self._own = buf.clone() if fresh else load_draw(None, self.draw, device)
        return self._own

    def unpack(self, batch: int, device: torch.device, own: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(perm, inverse perm, params) on ``device``: the host parts themselves on the CPU (the inverse may
        be None: the CPU paste gathers by perm), else views of ``tensors(device, own)`` (made once per tensor)."""
        if self._parts is not None and device.type == "cpu":
            return self._parts
        packed = self.tensors(device, own)
        if self._unpacked is None or self._unpacked[0] is not packed:
            self._unpacked = (packed, unpack_draw(packed, batch))
        return self._unpacked[1]


# graph task id -> (scope, forward) of every forward whose backward runs in that task, over all passes; the
# scope is the model the passes' sites hook into (two wrappers on one model share it)
_TASKS: Dict[int, List[Tuple[int, "MixForward"]]] = {}


class _BindBackward:
    """Pre-hook on a forward's output node: the running graph task is that forward's backward."""

    def __init__(self, driver: "MixPass", forward: MixForward) -> None:
        self.driver, self.forward = driver, forward

    def __call__(self, grad_outputs: Any) -> None:
        self.driver._bind(torch._C._current_graph_task_id(), self.forward)


class MixPass:
    """Arms a fixed list of sites for one forward pass at a time (see the module docstring)."""

    def __init__(self, sites: Sequence[FeatureCutMix]) -> None:
        self.sites: List[FeatureCutMix] = list(sites)
        self._reset()
        for site in self.sites:
            site._driver = self

    def _reset(self) -> None:
        # Read by compiled graphs: the same few Python values from batch to batch.
        self.live = False
        self.scope = id(self)                      # the model the sites hook into (set by ``begin``)
        self.chosen: Optional[FeatureCutMix] = None
        self.batch = 0
        self.image_hw: Optional[Tuple[int, int]] = None
        self.variant, self.rule, self.per_sample = "cutmix", Rule(), False
        self.record: Optional[Placement] = None   # what the chosen site placed in the live forward
        # Per forward: the live one and the latest finished one (running backwards are in ``_TASKS``).
        self.current: Optional[MixForward] = None
        self.last: Optional[MixForward] = None

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle, spawn, EMA) start with no forward in flight and share nothing."""
        return {"sites": self.sites}

    def __setstate__(self, state: dict) -> None:
        self.sites = state["sites"]
        self._reset()

    # -- one forward --------------------------------------------------------------------------------
    def begin(self, draw: MixDraw, device: torch.device, image_hw: Optional[Tuple[int, int]] = None,
              scope: Optional[object] = None) -> None:
        """Arm the site the draw chose (none when the batch is unmixed) and go live.

        ``scope``: the model the sites hook into; passes of one scope (two wrappers on one model) see each
        other's forwards when they tell recomputations apart.
        """
        self.scope = id(self) if scope is None else id(scope)
        chosen = self.sites[draw.site] if draw.mixed else None
        buf = parts = None
        if chosen is not None:  # plain attributes below: nn.Module.__setattr__ checks for parameters
            if device.type == "cpu":  # the host draw itself (a compiled graph reads it from the site)
                parts = draw.parts(inverse=False, params=draw.samples is not None)
                params = parts[2]
                if params is None:  # a whole-batch draw: its params only for a compiled graph, in the site's slot
                    slot = chosen.__dict__["_params_slot"] = write_params(chosen.__dict__.get("_params_slot"), draw)
                    params = slot[0]
                chosen.__dict__["_host_draw"] = (parts[0], params)
            else:
                buf, parts = stage_draw(chosen._buf, draw, device)
                chosen.__dict__["_buf"] = buf
        for site in self.sites:  # passes may share sites (two wrappers on one model): this one drives them now
            if site.__dict__.get("_driver") is not self:
                site.__dict__["_driver"] = self  # a plain attribute (nn.Module.__setattr__ checks for parameters)
        self.current = MixForward(draw, chosen, image_hw, device, buf, parts)
        self.chosen, self.record, self.image_hw = chosen, None, image_hw
        self.batch = draw.perm.numel()
        self.variant, self.rule, self.per_sample = draw.variant, draw.rule, draw.per_sample_kind
        self.live = True

    def finish(self) -> Optional[MixForward]:
        """End the forward: the forward, its placement recorded (None when unmixed); an error if the site did
        not mix."""
        fwd, site, placed = self.current, self.chosen, self.record
        self.live, self.current, self.chosen, self.record = False, None, None, None
        if fwd is None:
            raise RuntimeError("MixPass.finish without a live forward (begin was not called, or the pass was "
                               "aborted)")
        self.last = fwd
        if site is None:
            return None
        if placed is None:
            self.last = None
            raise RuntimeError(f"the mixing layer {site._name()} did not mix this batch: it did not run in the forward "
                               f"pass (it is not on the model's forward path), or the model was in eval mode (call "
                               f"model.train()); choose a module the forward calls{_compile_hint()}")
        fwd.record = placed
        return fwd

    def abort(self) -> None:
        """Forget the live forward (after an exception): no draw outlives its forward."""
        self.live, self.current, self.chosen, self.record = False, None, None, None

    def targets(self, labels: Tensor, num_classes: int, smoothing: float, dtype: torch.dtype) -> Tensor:
        """Soft targets for what the network saw, from the placement of the latest finished forward."""
        try:  # the one-hot lookup finds an index out of range; the range check then words the error
            y = F.one_hot_targets(labels, num_classes, smoothing, dtype)
        except (RuntimeError, IndexError):
            check_label_range(labels, num_classes)
            raise
        fwd = self.last
        placed = None if fwd is None else fwd.record
        if placed is None:
            return y
        kind = kind_of(placed.kind)
        if kind.keeps_labels:
            return y
        own = torch.is_grad_enabled() and labels.requires_grad
        perm, _, _ = fwd.unpack(labels.shape[0], labels.device, own)
        return kind.mix_targets(y, perm, placed)

    def watch_backward(self, outputs: Any) -> None:
        """Bind the latest finished forward to the backward of each of ``outputs`` (tensors in any nesting),
        when its site pasted inside an activation-checkpointed region: only there can a backward run the
        site again. (Elsewhere no pre-hook is registered: each costs ~15 us inside a CIFAR forward.)"""
        fwd = self.last
        if fwd is None or not fwd.recomputable:
            return
        fwd.watched = prehook_outputs(outputs, _BindBackward(self, fwd)) > 0

    def _bind(self, task: int, fwd: MixForward) -> None:
        entries = _TASKS.get(task)
        if entries is None:
            entries = _TASKS[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(lambda: _TASKS.pop(task, None))
        if all(f is not fwd for _, f in entries):
            entries.append((self.scope, fwd))
        fwd.bound = True

    # -- asked by the sites -------------------------------------------------------------------------
    def replay_for(self, site: FeatureCutMix) -> Optional[MixForward]:
        """During backward: the finished forward whose recomputation this is, if ``site`` mixed in it."""
        task = torch._C._current_graph_task_id()
        entries = _TASKS.get(task)
        if entries is None:
            # No watched output led here. The latest forward replays only when its output could not be watched
            # (``mixing`` over a list of sites, or a forward that never called the model) and nothing since ran
            # through the site; a watched forward's backward would have bound it.
            fwd = self.last
            if fwd is None or fwd.watched or fwd.bound or id(site) in fwd.released_by or fwd.chosen is not site:
                return None
            return fwd
        forwards = [f for scope, f in entries if scope == self.scope]  # those that ran through this model
        if all(f.chosen is not site for f in forwards):
            return None
        replayed = (task, id(site)) in forwards[0].replays  # a second graph through this site in this backward
        if len(forwards) > 1 or replayed:
            raise RuntimeError(f"activation checkpointing recomputes {site._name()} in one backward that runs through "
                               f"several forwards of the same model (training forwards of one wrapper or several, or "
                               f"a plain forward), and a recomputation cannot tell which forward's mix it replays: run "
                               f"backward once per checkpointed training forward (sum the losses of several forwards "
                               f"only without checkpointing)")
        forwards[0].replays.add((task, id(site)))
        return forwards[0]

    def release(self, site: FeatureCutMix) -> None:
        """An unarmed forward ran through ``site``: a later recomputation there is that forward's, not ours."""
        if self.last is not None:
            self.last.released_by.add(id(site))


def leaves(obj: Any) -> Iterator[Any]:
    """The leaves of nested mappings, tuples and lists (model outputs, batches), in order."""
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from leaves(v)
    else:
        yield obj


def prehook_outputs(outputs: Any, hook: Callable[[Any], None]) -> int:
    """Register ``hook`` once on the autograd node of every tensor in ``outputs``; the number of nodes."""
    if isinstance(outputs, Tensor):  # the common output, without the walk
        node = outputs.grad_fn
        if node is None:
            return 0
        node.register_prehook(hook)
        return 1
    seen: Set[int] = set()
    for t in leaves(outputs):
        node = t.grad_fn if isinstance(t, Tensor) else None
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            node.register_prehook(hook)
    return len(seen)


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
    """Yielded by ``mixing``: read ``targets`` (and ``record``) after the forward pass.

    Raises:
        RuntimeError: ``targets`` or ``record`` read inside the block (they are ready after it).

    Example:
        >>> net = torch.nn.Sequential(featmix.FeatureCutMix(), torch.nn.Flatten(), torch.nn.Linear(16, 2)).train()
        >>> with featmix.mixing(net, torch.tensor([0, 1]), num_classes=2) as batch:
        ...     _ = net(torch.randn(2, 1, 4, 4))
        >>> batch.targets.shape
        torch.Size([2, 2])
    """

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


def _pass_for(sites: List[FeatureCutMix]) -> MixPass:
    """The pass that drives exactly these sites (kept across blocks, so a backward after the block
    still finds its forward), or a new one."""
    driver = sites[0]._driver
    if isinstance(driver, MixPass) and driver.sites == sites and not driver.live:
        return driver
    return MixPass(sites)


@contextmanager
def mixing(model: Union[nn.Module, Sequence[FeatureCutMix]], labels: Tensor, num_classes: int,
           sampler: Optional[MixSampler] = None, label_smoothing: float = 0.0) -> Iterator[MixedBatch]:
    """Arm the ``FeatureCutMix`` layers of ``model`` for one forward pass.

    One draw per batch: one of the model's ``FeatureCutMix`` layers is chosen to mix (uniformly) and
    the others stay the identity. Every layer is released after an exception; a chosen layer that did
    not mix (not on the forward path, or eval mode) is an error at the end of the block.

    Args:
        model: the network (its ``FeatureCutMix`` layers, in registration order, are the candidates), or
            a list of ``FeatureCutMix`` layers.
        labels: class indices (B,) or soft targets (B, num_classes).
        num_classes: the number of classes of the targets.
        sampler: the draw (``featmix.MixSampler``); a default CutMix sampler when None.
        label_smoothing: applied to the one-hot labels before mixing.

    Yields:
        A ``MixedBatch``: ``batch.targets`` and ``batch.record`` are ready after the block.

    Raises:
        ValueError: ``model`` has no ``FeatureCutMix`` layer, or a bad argument.
        RuntimeError: the chosen layer did not run in the forward pass.

    Example:
        >>> net = torch.nn.Sequential(featmix.FeatureCutMix(), torch.nn.Flatten(), torch.nn.Linear(16, 3)).train()
        >>> with featmix.mixing(net, torch.tensor([0, 1]), num_classes=3) as batch:
        ...     logits = net(torch.randn(2, 1, 4, 4))
        >>> batch.targets.shape
        torch.Size([2, 3])

    With a module as ``model``, the block also binds the model's output to its backward, so activation
    checkpointing replays this block's mix even after later blocks.
    """
    sites = list(model) if not isinstance(model, nn.Module) else find_sites(model)
    if not sites:
        raise ValueError("model has no FeatureCutMix layer: insert featmix.FeatureCutMix() where the mix "
                         "should happen, or use featmix.CutMixAt(model, layer=...)")
    num_classes = check_num_classes(num_classes)
    smoothing = check_label_smoothing(label_smoothing)
    check_labels(labels, num_classes, None, check_range=False)  # the range: by the targets' lookup
    sampler = sampler if sampler is not None else MixSampler()
    mix = _pass_for(sites)
    mix.begin(sampler.draw(labels.shape[0], len(sites)), labels.device,
              scope=model if isinstance(model, nn.Module) else None)
    outputs: List[Any] = []
    handle = model.register_forward_hook(lambda m, i, o: outputs.append(o)) if isinstance(model, nn.Module) else None
    batch = MixedBatch()
    try:
        yield batch
        fwd = mix.finish()
    except BaseException:
        mix.abort()
        raise
    finally:
        if handle is not None:
            handle.remove()
    mix.watch_backward(outputs)
    batch._record = None if fwd is None else MixRecord.of(fwd.chosen.label, fwd.record, fwd.draw.perm)
    batch._targets = mix.targets(labels, num_classes, smoothing, torch.float32)
    batch._done = True
