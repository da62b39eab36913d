"""``CutMixAt``: wrap any model so training mixes at a chosen layer; evaluation is untouched.

The mixing layer is attached with a forward hook on the module that really produces the chosen
layer's output (nothing in the wrapped model is replaced or renamed), so ``state_dict()`` has exactly
the wrapped model's keys and loads into the plain model and back. ``remove()`` takes the hooks off
(and a wrapper that is garbage-collected takes them off too). Attribute lookups that miss on the
wrapper fall through to the model (``wrapper.num_classes``, ``wrapper.feature_info``, ...); timm's
optimizer helpers see the same parameter groups as for the plain model.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .arming import MixPass, MixRecord
from .layer import FeatureCutMix, find_sites
from .resolve import LayerSpec, SiteSpec, infer_num_classes, resolve_layers
from .sampling import MixSampler
from .validation import check_images, check_label_smoothing, check_labels, check_num_classes

try:
    from torch.compiler import disable as _compiler_disable
except ImportError:  # pragma: no cover - torch < 2.1
    from torch._dynamo import disable as _compiler_disable

_MODEL = "model"


class CutMixAt(nn.Module):
    """``CutMixAt(model, layer)``: train with CutMix after ``layer``; eval is exactly ``model``.

    Train mode: ``output, targets = wrapper(images, labels)``. Eval mode: ``output = wrapper(images)``,
    or ``output, targets = wrapper(images, labels)`` with unmixed one-hot targets (no smoothing).
    ``layer``: an int index (0 input, 1 after the stem, 2 after stage 1, ...), a module name, a list of
    them or ``"random"`` (one chosen per batch: Feature CutMix), or None to use the
    ``featmix.FeatureCutMix`` layers already inside ``model``. One draw per batch; the targets use the
    lam corrected to the box pasted on the chosen layer's own grid. ``kind`` chooses what the layer
    does (``"mixup"`` at ``layer="random"`` is Manifold Mixup; ``"cutout"``, ``"cutmix_or_mixup"``), and
    ``mode="elem"``/``"pair"`` draws per sample; see ``featmix.MixSampler``.

    ``sampler`` holds the draw state (the step of ``variant="scheduled"``: save
    ``wrapper.sampler.state_dict()`` beside the model's to resume a schedule). ``last_mix`` records
    the latest training batch's mix (None when unmixed).
    """

    def __init__(self, model: nn.Module, layer: LayerSpec = 0, alpha: float = 1.0, prob: float = 1.0,
                 variant: str = "cutmix", num_classes: Optional[int] = None, label_smoothing: float = 0.0,
                 generator: Optional[torch.Generator] = None, total_steps: Optional[int] = None,
                 center_std: float = 0.25, *, kind: str = "cutmix", mode: str = "batch", mixup_alpha: float = 1.0,
                 switch_prob: float = 0.5, cutout_size: float = 0.5, correct_lam: bool = True,
                 cutmix_minmax: Optional[Tuple[float, float]] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, CutMixAt):
            raise TypeError("model is already a featmix.CutMixAt: wrap the plain model once (several candidate layers "
                            "go in one wrapper: layer=[1, 3] or layer='random')")
        self.sampler = MixSampler(alpha, prob, variant, kind=kind, mode=mode, mixup_alpha=mixup_alpha,
                                  switch_prob=switch_prob, cutout_size=cutout_size, correct_lam=correct_lam,
                                  cutmix_minmax=cutmix_minmax, total_steps=total_steps, center_std=center_std,
                                  generator=generator)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.num_classes = check_num_classes(num_classes if num_classes is not None else infer_num_classes(model))
        self.add_module(_MODEL, model)
        self.layer = layer
        self.last_mix: Optional[MixRecord] = None
        self._input_site: Optional[FeatureCutMix] = None
        handles: List[Any] = []
        if layer is None:
            sites = find_sites(model)
            if not sites:
                raise ValueError("layer=None uses the featmix.FeatureCutMix layers inside the model, but it has "
                                 "none: pass layer= (an index, a module name, a list or 'random')")
        else:
            sites = [self._attach(spec, handles) for spec in resolve_layers(model, layer)]
            self.mixers = nn.ModuleList(sites)  # follow .train()/.eval(); hold no state_dict entries
        self._pass = MixPass(sites)
        self._remove_hooks = weakref.finalize(self, _remove_handles, handles)
        self._register_state_dict_hook(_strip_model_prefix)
        self._register_load_state_dict_pre_hook(_add_model_prefix, with_module=True)
        self.register_load_state_dict_post_hook(_plain_incompatible_keys)

    def _attach(self, spec: SiteSpec, handles: List[Any]) -> FeatureCutMix:
        site = FeatureCutMix(hw_dims=spec.hw_dims, num_prefix_tokens=spec.num_prefix_tokens, grid=spec.grid,
                             label=spec.label)
        site.num_chs, site.grid_fn = spec.num_chs, spec.grid_fn
        if spec.module_name is None:
            self._input_site = site
        else:
            module = self.model.get_submodule(spec.hook_name)
            handles.append(module.register_forward_hook(_MixHook(site, spec.module_name)))
        return site

    @property
    def sites(self) -> List[FeatureCutMix]:
        """The candidate mixing layers, in the order of ``layer=``."""
        return list(self._pass.sites)

    def remove(self) -> nn.Module:
        """Take every hook off the wrapped model and return it; the wrapper cannot be used after this."""
        self._remove_hooks()
        self._pass.abort()
        self._pass = MixPass([])
        return self.model

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, images: Any, labels: Optional[Tensor] = None) -> Union[Any, Tuple[Any, Tensor]]:
        if not self.training:
            output = self.model(images)
            return output if labels is None else (output, self._eval_targets(labels, output))
        self._begin(images, labels)
        try:
            if self._input_site is not None:
                images = self._input_site(images)
            output = self.model(images)
        except BaseException:
            self._pass.abort()
            raise
        return output, self._finish(labels, output)

    @_compiler_disable
    def _begin(self, images: Any, labels: Optional[Tensor]) -> None:
        """Validate, draw once for the batch and arm the chosen site (outside any compiled graph)."""
        if not self._remove_hooks.alive:
            raise RuntimeError("this CutMixAt was removed (wrapper.remove()): call the model it returned")
        if labels is None:
            raise TypeError("CutMixAt in train mode needs labels: call wrapper(images, labels) and use the "
                            "returned targets; call wrapper.eval() for plain inference")
        if self._input_site is not None or not isinstance(images, Tensor) or not images.is_floating_point():
            check_images(images)
        check_labels(labels, self.num_classes, images.shape[0])
        draw = self.sampler.draw(labels.shape[0], len(self._pass.sites))
        self._pass.begin(draw, images.device, tuple(images.shape[-2:]) if images.dim() == 4 else None)

    @_compiler_disable
    def _finish(self, labels: Tensor, output: Any) -> Tensor:
        """Targets from what the chosen site actually pasted (an error if it did not mix)."""
        logits = _first_tensor(output)
        record = self._pass.finish()
        targets = self._pass.targets(labels.to(logits.device), self.num_classes, record, self.label_smoothing,
                                     _target_dtype(logits))
        self._pass.watch_backward(logits)
        self.last_mix = record
        return targets

    @_compiler_disable
    def _eval_targets(self, labels: Tensor, output: Any) -> Tensor:
        logits = _first_tensor(output)
        check_labels(labels, self.num_classes, None)
        return F.one_hot_targets(labels.to(logits.device), self.num_classes, 0.0, _target_dtype(logits))

    # -- timm integration -------------------------------------------------------------------------
    def no_weight_decay(self) -> Set[str]:
        """The wrapped model's ``no_weight_decay()`` names, as this wrapper's parameters are named."""
        inner = getattr(self.model, "no_weight_decay", None)
        return {f"{_MODEL}.{n}" for n in (inner() if callable(inner) else ())}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], float]:
        """timm's layer grouping of the wrapped model, for this wrapper's parameter names."""
        from timm.models import group_parameters  # only reached from timm's own helpers
        from timm.optim import auto_group_layers

        inner = getattr(self.model, "group_matcher", None)
        if callable(inner):
            layer_of = group_parameters(self.model, inner(coarse=coarse), reverse=True)
        else:
            layer_of = auto_group_layers(self.model)
        prefix = _MODEL + "."
        return lambda name: layer_of.get(name[len(prefix):] if name.startswith(prefix) else name, math.inf)

    # -- state and attributes ---------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load the wrapped model's keys (no ``model.`` prefix); errors name the plain keys."""
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if _MODEL in modules and not name.startswith("_"):
                return getattr(modules[_MODEL], name)
            raise

    def extra_repr(self) -> str:
        s = self.sampler
        return (f"layer={self.layer!r}, kind={s.kind!r}, alpha={s.alpha}, prob={s.prob}, variant={s.variant!r}, "
                f"num_classes={self.num_classes}")


class _MixHook:
    """Forward hook that passes a module's output through its site (picklable, unlike a lambda)."""

    def __init__(self, site: FeatureCutMix, module_name: str) -> None:
        self.site, self.module_name = site, module_name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return self.site(output)
        site = self.site
        if site.training and site._draw is not None and getattr(site._owner, "live", False):
            children = [n for n, _ in module.named_children()]
            hint = f" (its children: {', '.join(children)})" if children else ""
            raise TypeError(f"layer {self.module_name!r} ({type(module).__name__}) returns a {type(output).__name__}, "
                            f"not a tensor, so it cannot be mixed: choose a module inside it that returns the feature "
                            f"map{hint}")
        return output


def _remove_handles(handles: List[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _first_tensor(output: Any) -> Tensor:
    """The logits: the output itself, or the first tensor of a tuple/list/dict output."""
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else [output]
    for item in items:
        if isinstance(item, Tensor):
            return item
    raise TypeError(f"the wrapped model returned a {type(output).__name__} with no tensor in it: CutMixAt needs the "
                    f"logits as a tensor (or a tuple/list/dict whose first tensor is the logits)")


def _target_dtype(logits: Tensor) -> torch.dtype:
    # float32 targets (float64 for a float64 model): bf16 would round the label weights.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _strip_model_prefix(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: ``model.layer1.0.conv1.weight`` -> ``layer1.0.conv1.weight`` (and metadata)."""
    inner = prefix + _MODEL + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == prefix + _MODEL or k.startswith(inner)]:
            meta[prefix + key[len(inner):] if key != prefix + _MODEL else prefix.rstrip(".")] = meta.pop(key)


def _add_model_prefix(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """load hook (the wrapper nested in a parent): plain keys -> ``model.`` keys."""
    module.__dict__["_load_prefix"] = prefix
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _MODEL + "." + key[len(prefix):]] = state_dict.pop(key)


def _plain_incompatible_keys(module: nn.Module, incompatible: Any) -> None:
    """Name missing/unexpected keys as the state_dict names them (without the ``model.`` prefix)."""
    prefix = module.__dict__.get("_load_prefix", "")
    inner = prefix + _MODEL + "."
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [prefix + k[len(inner):] if k.startswith(inner) else k for k in keys]
