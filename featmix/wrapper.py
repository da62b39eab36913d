"""``CutMixAt``: wrap any model so training mixes at a chosen layer; evaluation is untouched.

The mixing layer is attached with a forward hook on the resolved module (nothing in the wrapped
model is replaced or renamed), so ``state_dict()`` has exactly the wrapped model's keys and loads
into the plain model and back. Attribute lookups that miss on the wrapper fall through to the model
(``wrapper.num_classes``, ``wrapper.feature_info``, ...).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .layer import FeatureCutMix, MixRecord, arm, build_targets, disarm, find_sites
from .resolve import LayerSpec, SiteSpec, infer_num_classes, resolve_layers
from .sampling import MixDraw, MixSampler, check_mix_args
from .validation import check_images, check_labels, check_num_classes

try:
    from torch.compiler import disable as _compiler_disable
except ImportError:  # pragma: no cover - torch < 2.1
    from torch._dynamo import disable as _compiler_disable

_MODEL = "model"


class CutMixAt(nn.Module):
    """``CutMixAt(model, layer)``: train with CutMix after ``layer``; eval is exactly ``model``.

    Train mode: ``logits, targets = wrapper(images, labels)``; eval mode: ``logits = wrapper(images)``.
    ``layer``: an int index (0 input, 1 after the stem, 2 after stage 1, ...), a module name, a list of
    them or ``"random"`` (one chosen per batch: Feature CutMix), or None to use the
    ``featmix.FeatureCutMix`` layers already inside ``model``. One draw per batch; the targets use the
    lam corrected to the box pasted on the chosen layer's own grid.

    ``sampler`` holds the draw state (the step of ``variant="scheduled"``: save
    ``wrapper.sampler.state_dict()`` beside the model's to resume a schedule). ``last_mix`` records
    the latest training batch's mix (None when unmixed).
    """

    def __init__(self, model: nn.Module, layer: LayerSpec = 0, alpha: float = 1.0, prob: float = 1.0,
                 variant: str = "cutmix", num_classes: Optional[int] = None, label_smoothing: float = 0.0,
                 generator: Optional[torch.Generator] = None, total_steps: Optional[int] = None,
                 center_std: float = 0.25) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_mix_args(alpha, prob, variant, total_steps, center_std, label_smoothing, generator)
        self.num_classes = check_num_classes(num_classes if num_classes is not None else infer_num_classes(model))
        self.add_module(_MODEL, model)
        self.sampler = MixSampler(alpha, prob, variant, total_steps=total_steps, center_std=center_std,
                                  generator=generator)
        self.label_smoothing = float(label_smoothing)
        self.layer = layer
        self.last_mix: Optional[MixRecord] = None
        self._input_site: Optional[FeatureCutMix] = None
        self._hooks = []
        if layer is None:
            sites = find_sites(model)
            if not sites:
                raise ValueError("layer=None uses the featmix.FeatureCutMix layers inside the model, but it has "
                                 "none: pass layer= (an index, a module name, a list or 'random')")
            self._sites: List[FeatureCutMix] = sites
        else:
            self._sites = [self._attach(spec) for spec in resolve_layers(model, layer)]
            self.mixers = nn.ModuleList(self._sites)  # follow .train()/.eval(); hold no state_dict entries
        self._draw: Optional[MixDraw] = None
        self._chosen: Optional[FeatureCutMix] = None
        self._register_state_dict_hook(_strip_model_prefix)
        self._register_load_state_dict_pre_hook(_add_model_prefix)

    def _attach(self, spec: SiteSpec) -> FeatureCutMix:
        site = FeatureCutMix(hw_dims=spec.hw_dims, num_prefix_tokens=spec.num_prefix_tokens, grid=spec.grid,
                             label=spec.label)
        if spec.module_name is None:
            self._input_site = site
        else:
            module = self.model.get_submodule(spec.module_name)
            self._hooks.append(module.register_forward_hook(_MixHook(site)))
        return site

    @property
    def sites(self) -> List[FeatureCutMix]:
        """The candidate mixing layers, in the order of ``layer=``."""
        return list(self._sites)

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if not self.training:
            return self.model(images)
        self._arm(images, labels)
        if self._input_site is not None:
            images = self._input_site(images)
        logits = self.model(images)
        targets = self._finish(labels, logits)
        return logits, targets

    @_compiler_disable
    def _arm(self, images: Tensor, labels: Optional[Tensor]) -> None:
        """Validate, draw once for the batch and arm the chosen site (outside any compiled graph)."""
        if labels is None:
            raise TypeError("CutMixAt in train mode needs labels: call wrapper(images, labels) and use the "
                            "returned targets; call wrapper.eval() for plain inference")
        if not isinstance(images, Tensor) or not images.is_floating_point():
            check_images(images)
        if self._input_site is not None:
            check_images(images)
        check_labels(labels, self.num_classes, images.shape[0])
        draw = self.sampler.draw(images.shape[0], len(self._sites))
        self._draw = draw
        self._chosen = arm(self._sites, draw, images.device)

    @_compiler_disable
    def _finish(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Targets from what the chosen site actually pasted; disarm everything."""
        # float32 targets (float64 for a float64 model): bf16 would round the label weights.
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        targets, record = build_targets(labels.to(logits.device), self.num_classes, self._draw, self._chosen,
                                        self.label_smoothing, dtype)
        self.last_mix = record
        disarm(self._sites)
        self._draw, self._chosen = None, None
        return targets

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
        return f"layer={self.layer!r}, alpha={s.alpha}, prob={s.prob}, variant={s.variant!r}, num_classes={self.num_classes}"


class _MixHook:
    """Forward hook that passes a module's output through its site (picklable, unlike a lambda)."""

    def __init__(self, site: FeatureCutMix) -> None:
        self.site = site

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return self.site(output)
        return output


def _strip_model_prefix(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: ``model.layer1.0.conv1.weight`` -> ``layer1.0.conv1.weight`` (and metadata)."""
    inner = prefix + _MODEL + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == prefix + _MODEL or k.startswith(inner)]:
            meta[prefix + key[len(inner):] if key != prefix + _MODEL else prefix.rstrip(".")] = meta.pop(key)


def _add_model_prefix(state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _MODEL + "." + key[len(prefix):]] = state_dict.pop(key)
