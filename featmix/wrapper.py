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
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.compiler import disable as _compiler_disable

try:  # torch >= 2.6; before it, is_fx_tracing meant the same
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # pragma: no cover
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

from . import functional as F
from .arming import MixPass, MixRecord, latest_record, prehook_outputs
from .layer import FeatureCutMix, find_sites
from .resolve import LayerSpec, SiteSpec, infer_num_classes, resolve_layers
from .sampling import MixSampler
from .validation import check_images, check_int, check_label_smoothing, check_labels, check_num_classes

_MODEL = "model"
_LAYOUTS = {"NCHW": (-2, -1), "NHWC": (1, 2), "NLC": (-2, -1)}


class CutMixAt(nn.Module):
    """``CutMixAt(model, layer)``: train with CutMix after ``layer``; eval is exactly ``model``.

    Train mode: ``output, targets = wrapper(images, labels)`` (or ``pixel_values=images`` for Hugging
    Face models; other keyword arguments go to the model, and the output comes back as the model
    returned it). Eval mode: ``output = wrapper(images)``, or ``output, targets = wrapper(images, labels)``
    with unmixed one-hot targets (no smoothing). A train-mode call without labels runs the plain model
    unmixed (BatchNorm recalibration such as ``torch.optim.swa_utils.update_bn``, model summaries); its
    output cannot be trained on: a backward through it raises.

    One draw per batch; the targets use the lam corrected to the box pasted on the chosen layer's own
    grid. Copies (``copy.deepcopy``, pickle, ``torch.save``, spawn workers, ``AveragedModel``/EMA) train
    exactly as the original would from the same generator state and share no state with it.

    Args:
        model: the network to wrap (timm, torchvision, Hugging Face, or any ``nn.Module``).
        layer: an int index (0 input, 1 after the stem, 2 after stage 1, ...), a module name, a list of
            them or ``"random"`` (one chosen per batch: Feature CutMix), or None to use the
            ``featmix.FeatureCutMix`` layers already inside ``model``.
        alpha: lam ~ Beta(alpha, alpha).
        prob: the chance a batch is mixed.
        variant: the paper's Table 8 variant (``featmix.VARIANTS``).
        num_classes: the class count; inferred from the model when None.
        label_smoothing: applied to the one-hot labels before mixing.
        generator: a CPU ``torch.Generator``; all randomness comes from it.
        total_steps: the schedule's length for ``variant="scheduled"``.
        center_std: the box centre's std (fraction of the side) for ``variant="center_gaussian"``.
        kind: ``"cutmix"``, ``"mixup"`` (at ``layer="random"``: Manifold Mixup), ``"cutout"`` or
            ``"cutmix_or_mixup"``.
        mode: ``"batch"`` (the paper's), ``"elem"`` or ``"pair"`` (per-sample draws, timm's modes).
        mixup_alpha: Mixup's Beta parameter (``kind="cutmix_or_mixup"``).
        switch_prob: the chance of CutMix over Mixup (``kind="cutmix_or_mixup"``).
        cutout_size: Cutout's box side as a fraction of each side.
        correct_lam: CutMix's label weight is the pasted area (True) or the drawn lam.
        cutmix_minmax: timm's box-side range as fractions of each side (replaces the Beta draw).
        layout: the layout of the chosen layers' outputs when the model does not declare it: ``"NCHW"``,
            ``"NHWC"`` or ``"NLC"`` (tokens).
        grid: (h, w) of the patch tokens of an ``"NLC"`` output.
        num_prefix_tokens: class/register tokens before the patch tokens, left unmixed.

    Raises:
        TypeError: ``model`` is not a module, or is already a ``CutMixAt``.
        ValueError: a bad argument, an unknown layer, or a class count that cannot be inferred.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64, 5))
        >>> wrapper = featmix.CutMixAt(net, layer="0", generator=torch.Generator().manual_seed(0)).train()
        >>> logits, targets = wrapper(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 3]))
        >>> targets.shape
        torch.Size([4, 5])

    ``sampler`` holds the draw state (``wrapper.sampler.state_dict()`` resumes the draw stream);
    ``last_mix`` records the latest training batch's mix (None when unmixed).
    """

    def __init__(self, model: nn.Module, layer: LayerSpec = 0, alpha: float = 1.0, prob: float = 1.0,
                 variant: str = "cutmix", num_classes: Optional[int] = None, label_smoothing: float = 0.0,
                 generator: Optional[torch.Generator] = None, total_steps: Optional[int] = None,
                 center_std: float = 0.25, *, kind: str = "cutmix", mode: str = "batch", mixup_alpha: float = 1.0,
                 switch_prob: float = 0.5, cutout_size: float = 0.5, correct_lam: bool = True,
                 cutmix_minmax: Optional[Tuple[float, float]] = None, layout: Optional[str] = None,
                 grid: Optional[Tuple[int, int]] = None, num_prefix_tokens: Optional[int] = None) -> None:
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
        self._placed: Any = None  # the latest mix: (site label, placement, perm) until ``last_mix`` makes its record
        self._input_site: Optional[FeatureCutMix] = None
        self._hooks: List[_MixHook] = []
        if layer is None:
            sites = find_sites(model)
            if not sites:
                raise ValueError("layer=None uses the featmix.FeatureCutMix layers inside the model, but it has "
                                 "none: pass layer= (an index, a module name, a list or 'random')")
        else:
            overrides = _layout_overrides(layout, grid, num_prefix_tokens)
            sites = [self._attach(replace(spec, **overrides) if spec.module_name else spec)
                     for spec in resolve_layers(model, layer)]
            self.mixers = nn.ModuleList(sites)  # follow .train()/.eval(); hold no state_dict entries
        self._pass = MixPass(sites)
        self._removed = False
        self._watch_hooks()
        self._register_state_dict_hook(_strip_model_prefix)
        self._register_load_state_dict_pre_hook(_add_model_prefix, with_module=True)
        self.register_load_state_dict_post_hook(_plain_incompatible_keys)

    def _attach(self, spec: SiteSpec) -> FeatureCutMix:
        site = FeatureCutMix(hw_dims=spec.hw_dims, num_prefix_tokens=spec.num_prefix_tokens, grid=spec.grid,
                             label=spec.label)
        site.num_chs, site.grid_fn = spec.num_chs, spec.grid_fn
        site.square_tokens = False  # a resolved layer's token grid comes from the model or layout=/grid=, never a guess
        if spec.module_name is None:
            self._input_site = site
        else:
            hook = _MixHook(site, spec.module_name, spec.hook_name, spec.output_index)
            hook.attach(self.model)
            self._hooks.append(hook)
        return site

    def _watch_hooks(self) -> None:
        """When the wrapper is garbage-collected, its hooks leave the model (a copy watches its own)."""
        self._finalizer = weakref.finalize(self, _detach, self.model, list(self._hooks)) if self._hooks else None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_finalizer", None)  # a copy takes its own hooks off, not the original's
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._watch_hooks()

    @classmethod
    def from_timm_args(cls, model: nn.Module, layer: LayerSpec = 2, **timm_mixup_args: Any) -> "CutMixAt":
        """``CutMixAt(model, layer)`` from timm ``Mixup``'s arguments, with timm's defaults (label smoothing 0.1).

        Args:
            model: the model to wrap.
            layer: where to mix (``layer=`` of ``CutMixAt``).
            **timm_mixup_args: ``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``prob``, ``switch_prob``,
                ``mode``, ``correct_lam``, ``label_smoothing``, ``num_classes``, ``generator``.

        Returns:
            The wrapper (``featmix.integrations.timm.cutmix_at_from_timm_args`` documents the mapping).
        """
        from .integrations.timm import cutmix_at_from_timm_args  # needs timm, as its caller does
        return cutmix_at_from_timm_args(model, layer=layer, **timm_mixup_args)

    @property
    def sites(self) -> List[FeatureCutMix]:
        """The candidate mixing layers, in the order of ``layer=``."""
        return list(self._pass.sites)

    def remove(self) -> nn.Module:
        """Take every hook of this wrapper off the wrapped model and return it.

        Returns:
            The wrapped model, exactly as it was before wrapping. The wrapper cannot be used after this.
        """
        _detach(self.model, self._hooks)
        if self._finalizer is not None:
            self._finalizer.detach()
        self._pass.abort()
        self._removed = True
        return self.model

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """The wrapped model's ``reset_classifier`` (timm); the targets follow the new class count."""
        self.model.reset_classifier(num_classes, *args, **kwargs)
        self.num_classes = check_num_classes(getattr(self.model, "num_classes", num_classes))

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, images: Any = None, labels: Optional[Tensor] = None, **model_kwargs: Any
                ) -> Union[Any, Tuple[Any, Tensor]]:
        """Train mode: ``(output, targets)``; eval mode: ``output`` (with labels: ``(output, one-hot targets)``).

        Args:
            images: the input batch (B, C, H, W); or pass it as ``pixel_values=`` (Hugging Face models).
            labels: class indices (B,) or soft targets (B, num_classes).
            **model_kwargs: passed to the model unchanged; ``pixel_values=`` is the input batch (Hugging Face
                models), given to the model by that name.

        Returns:
            The model's output as it returned it, and in train mode the (B, num_classes) float targets.

        Raises:
            TypeError, ValueError: bad images or labels, or a chosen layer whose output is not a map.
            RuntimeError: the chosen layer did not run, or the logits do not have num_classes columns.
        """
        if self._removed:
            raise RuntimeError("this CutMixAt was removed (wrapper.remove()): call the model it returned")
        if is_fx_symbolic_tracing():  # a symbolic trace (fx, feature extraction) records the plain model
            return self.model(images)
        images, keyword = _the_input(images, model_kwargs.pop("pixel_values", None))
        if not self.training:
            output = self._call_model(images, keyword, model_kwargs)
            return output if labels is None else (output, self._eval_targets(labels, output))
        if labels is None:
            return _untrainable(self._call_model(images, keyword, model_kwargs))
        self._begin(images, labels)
        try:
            if self._input_site is not None:
                images = self._input_site.mix(images)
            output = self._call_model(images, keyword, model_kwargs)
        except BaseException:
            self._pass.abort()
            raise
        return output, self._finish(labels, output)

    def _call_model(self, images: Any, keyword: bool, model_kwargs: Dict[str, Any]) -> Any:
        model = self._modules[_MODEL]  # not self.model: nn.Module.__getattr__ and ours cost ~1 us a batch
        return model(pixel_values=images, **model_kwargs) if keyword else model(images, **model_kwargs)

    @_compiler_disable
    def _begin(self, images: Any, labels: Tensor) -> None:
        """Validate, draw once for the batch and arm the chosen site (outside any compiled graph)."""
        if self._input_site is not None or not isinstance(images, Tensor) or not images.is_floating_point():
            check_images(images)
        check_labels(labels, self.num_classes, images.shape[0], check_range=False)  # the range: by the targets
        draw = self.sampler.draw(labels.shape[0], len(self._pass.sites))
        model = self._modules[_MODEL]
        if draw.mixed and self._hooks:
            self._hooks[draw.site if self._input_site is None else draw.site - 1].ensure_attached(model)
        self._pass.begin(draw, images.device, tuple(images.shape[-2:]) if images.dim() == 4 else None, model)

    @_compiler_disable
    def _finish(self, labels: Tensor, output: Any) -> Tensor:
        """Targets from what the chosen site actually pasted (an error if it did not mix)."""
        logits = _first_tensor(output)
        fwd = self._pass.finish()
        if logits.dim() == 2 and logits.shape[1] != self.num_classes:
            raise RuntimeError(f"the model returned logits of shape {tuple(logits.shape)}, but the wrapper builds "
                               f"targets for num_classes={self.num_classes}: call wrapper.reset_classifier(n) (not the "
                               f"inner model's) after changing the classifier, or pass num_classes=")
        if labels.device != logits.device:
            labels = labels.to(logits.device)
        targets = self._pass.targets(labels, self.num_classes, self.label_smoothing, _target_dtype(logits))
        self._pass.watch_backward(output)
        # what ``last_mix`` is made of when read; a plain attribute, without nn.Module.__setattr__'s bookkeeping
        self.__dict__["_placed"] = None if fwd is None else (fwd.chosen.label, fwd.record, fwd.draw.perm)
        return targets

    @property
    def last_mix(self) -> Optional[MixRecord]:
        """The ``MixRecord`` of the latest training batch (None when it was not mixed), made when first read."""
        return latest_record(self.__dict__)

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
    """Forward hook that passes a module's output through its site (picklable, unlike a lambda).

    It calls the site's ``mix`` directly, not the site module, so module hooks and summaries
    (torchinfo) never see the site as a layer of the model.
    """

    def __init__(self, site: FeatureCutMix, module_name: str, hook_name: str, output_index: Optional[int]) -> None:
        self.site, self.module_name, self.hook_name, self.output_index = site, module_name, hook_name, output_index
        self.hook_path = tuple(hook_name.split(".")) if hook_name else ()
        self.module: Optional[nn.Module] = None

    def attach(self, model: nn.Module) -> None:
        self.module = model.get_submodule(self.hook_name)
        self.module.register_forward_hook(self)

    def ensure_attached(self, model: nn.Module) -> None:
        """Re-attach when the hooked module was replaced after wrapping (``convert_sync_batchnorm``, ...)."""
        module: Optional[nn.Module] = model
        for name in self.hook_path:  # get_submodule's walk, its plain case first (this runs every batch)
            child = module._modules.get(name)
            module = child if child is not None else getattr(module, name, None)  # e.g. a compiled model's
            if not isinstance(module, nn.Module):
                module = None
                break
        if module is not self.module:
            self.attach(model)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return self.site.mix(output)
        index = self.output_index
        if index is not None and isinstance(output, tuple) and isinstance(output[index], Tensor):
            return output[:index] + (self.site.mix(output[index]),) + output[index + 1:]
        site = self.site
        if site.training and getattr(site._driver, "chosen", None) is site and site._driver.live:
            children = [n for n, _ in module.named_children()]
            hint = f" (its children: {', '.join(children)})" if children else ""
            raise TypeError(f"layer {self.module_name!r} ({type(module).__name__}) returns a {type(output).__name__}, "
                            f"not a tensor, so it cannot be mixed: choose a module inside it that returns the feature "
                            f"map{hint}")
        return output


def _detach(model: nn.Module, hooks: List[_MixHook]) -> None:
    """Take ``hooks`` off every module of ``model`` (whichever copy of the model they were attached to)."""
    ours = {id(h) for h in hooks}
    for module in model.modules():
        for key in [k for k, h in module._forward_hooks.items() if id(h) in ours]:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def _layout_overrides(layout: Optional[str], grid: Optional[Tuple[int, int]],
                      num_prefix_tokens: Optional[int]) -> Dict[str, Any]:
    """SiteSpec fields for the ``layout=``/``grid=``/``num_prefix_tokens=`` arguments of ``CutMixAt``."""
    out: Dict[str, Any] = {}
    if layout is not None:
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(repr(k) for k in _LAYOUTS)} or None (read from the "
                             f"model); got {layout!r}")
        out["hw_dims"] = _LAYOUTS[layout]
    if grid is not None:
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
            raise ValueError(f"grid must be (h, w), two ints > 0: the patch grid of a token layout; got {grid!r}")
        out["grid"], out["grid_fn"] = tuple(grid), None
    if num_prefix_tokens is not None:
        out["num_prefix_tokens"] = check_int(num_prefix_tokens, "num_prefix_tokens", 0,
                                             "class/register tokens before the patch tokens")
    return out


def _the_input(images: Any, pixel_values: Any) -> Tuple[Any, bool]:
    """The input batch, and whether the model takes it as ``pixel_values=``."""
    if pixel_values is None:
        if images is None:
            raise TypeError("CutMixAt needs the input batch: wrapper(images, labels) or "
                            "wrapper(pixel_values=images, labels=labels)")
        return images, False
    if images is not None:
        raise TypeError("pass the input batch once: as images or as pixel_values=, not both")
    return pixel_values, True


class _Untrainable:
    def __call__(self, grad_outputs: Any) -> None:
        raise RuntimeError("backward through a train-mode CutMixAt forward called without labels: that forward was "
                           "not mixed (it serves BatchNorm recalibration and summaries); train with "
                           "wrapper(images, labels) and the targets it returns")


def _untrainable(output: Any) -> Any:
    """The plain output of a label-less train-mode forward, with a backward that raises."""
    prehook_outputs(output, _Untrainable())
    return output


def _first_tensor(output: Any) -> Tensor:
    """The logits: the output itself, its ``logits`` (Hugging Face outputs), or the first tensor of a
    tuple/list/dict output."""
    if type(output) is Tensor:  # the common output, without the lookups below
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
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
