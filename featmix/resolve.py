"""From ``layer=`` to the modules whose output gets mixed.

Index convention (the paper's Figure 3, extended to any timm CNN): 0 = the input, 1 = after the stem
(first conv-BN[-act]), 2 = after stage 1, 3 = after stage 2, ... up to the last stage, in timm's
``feature_info`` order. Models without ``feature_info`` that follow torchvision's ResNet layout
(``relu``/``act1`` then ``layer1..layerN``) resolve the same way; any model accepts module names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from torch import nn

LayerSpec = Union[int, str, Sequence[Union[int, str]], None]

_STEM_NAMES = ("act1", "bn1", "stem", "patch_embed", "relu")


@dataclass(frozen=True)
class SiteSpec:
    """One place the mix may happen: ``module_name`` None is the input."""

    label: object                 # what the user asked for (an index or a name)
    module_name: Optional[str]
    hw_dims: Tuple[int, int] = (-2, -1)
    num_prefix_tokens: int = 0
    grid: Optional[Tuple[int, int]] = None


def _feature_modules(model: nn.Module) -> List[str]:
    fi = getattr(model, "feature_info", None)
    if fi is None:
        return []
    if hasattr(fi, "module_name"):  # timm FeatureInfo object (features_only models)
        return list(fi.module_name())
    return [f["module"] for f in fi if isinstance(f, dict) and "module" in f]


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def stage_names(model: nn.Module) -> List[str]:
    """Module names for indices 1, 2, ...: the stem, then each stage."""
    names = _feature_modules(model)
    if names:
        first = names[0]
        if first in _STEM_NAMES or first.startswith("stem"):
            return names
        stem = next((n for n in _STEM_NAMES if _has(model, n)), None)
        return ([stem] if stem else []) + names
    # torchvision-style ResNet: conv1, bn1, relu, maxpool, layer1..layerN
    stages, k = [], 1
    while _has(model, f"layer{k}"):
        stages.append(f"layer{k}")
        k += 1
    stem = next((n for n in ("act1", "relu", "bn1") if _has(model, n)), None)
    if stages and stem:
        return [stem] + stages
    return []


def _token_layout(model: nn.Module, module_name: str) -> dict:
    """Prefix tokens and patch grid for ViT-style models (timm VisionTransformer and kin)."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if pe is None or grid is None:
        return {}
    layout = {"grid": tuple(int(g) for g in grid)}
    if getattr(pe, "flatten", True) is False:  # NHWC token maps
        layout["hw_dims"] = (1, 2)
    is_stem = module_name == "patch_embed"
    layout["num_prefix_tokens"] = 0 if is_stem else int(getattr(model, "num_prefix_tokens", 0))
    return layout


def _site_for_name(model: nn.Module, name: str, label: object) -> SiteSpec:
    if not _has(model, name):
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"layer={name!r} is not a module of {type(model).__name__}; pass an index or the name "
                         f"of a submodule (top-level names: {', '.join(top)}; see model.named_modules())")
    return SiteSpec(label=label, module_name=name, **_token_layout(model, name))


def num_indices(model: nn.Module) -> int:
    return 1 + len(stage_names(model))


def _site_for_index(model: nn.Module, index: int) -> SiteSpec:
    names = stage_names(model)
    if isinstance(index, bool) or index < 0 or index > len(names):
        if not names:
            raise ValueError(f"layer={index!r}: {type(model).__name__} has no timm feature_info and no ResNet-style "
                             f"layer1..N, so only layer=0 (the input) or a module name can be used")
        raise ValueError(f"layer={index!r} is out of range for {type(model).__name__}: valid indices are 0 (input) "
                         f"to {len(names)} ({', '.join(f'{i + 1}={n}' for i, n in enumerate(names))})")
    if index == 0:
        return SiteSpec(label=0, module_name=None)
    return _site_for_name(model, names[index - 1], index)


def random_indices(model: nn.Module) -> List[int]:
    """``layer="random"``: the input, the stem and every stage but the last (Manifold Mixup's choice:
    the last stage feeds the pooled classifier directly)."""
    n = len(stage_names(model))
    return list(range(max(n, 1)))


def resolve_layers(model: nn.Module, layer: LayerSpec) -> List[SiteSpec]:
    """Turn ``layer=`` into the list of candidate mixing sites (one is chosen per batch)."""
    if isinstance(layer, bool):
        raise TypeError(f"layer must be an int index, a module name, a list of them or 'random'; got {layer!r}")
    if isinstance(layer, int):
        return [_site_for_index(model, layer)]
    if isinstance(layer, str):
        if layer == "random":
            return [_site_for_index(model, i) for i in random_indices(model)]
        if layer == "input":
            return [SiteSpec(label="input", module_name=None)]
        return [_site_for_name(model, layer, layer)]
    if isinstance(layer, (list, tuple)):
        if not layer:
            raise ValueError("layer must not be an empty list")
        sites = []
        for item in layer:
            if isinstance(item, (list, tuple)) or item == "random":
                raise TypeError(f"layer list items must be ints or module names; got {item!r}")
            sites.extend(resolve_layers(model, item))
        if len({s.module_name for s in sites}) != len(sites):
            raise ValueError(f"layer lists the same place twice: {list(layer)!r}")
        return sites
    raise TypeError(f"layer must be an int index, a module name, a list of them or 'random'; got "
                    f"{type(layer).__name__}")


def infer_num_classes(model: nn.Module) -> int:
    """The class count from timm's ``num_classes`` or the classifier's ``out_features``."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    heads = []
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            heads.append(get())
        except Exception:  # noqa: BLE001 - a model's own accessor may not apply; fall through
            pass
    heads += [getattr(model, a) for a in ("fc", "classifier", "head", "heads") if isinstance(getattr(model, a, None), nn.Module)]
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], nn.Linear):
        heads.append(model[-1])
    for head in heads:
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
        if linears:
            return linears[-1].out_features
    raise ValueError(f"cannot infer num_classes from {type(model).__name__} (no num_classes attribute and no Linear "
                     f"classifier in fc/classifier/head or at the end of a Sequential): pass num_classes= explicitly")
