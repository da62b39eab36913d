"""From ``layer=`` to the modules whose output gets mixed, and the layout of that output.

Index convention (the paper's Figure 3, extended to any timm CNN): 0 = the input, 1 = after the stem
(first conv-BN[-act]), 2 = after stage 1, 3 = after stage 2, ... up to the last stage, in timm's
``feature_info`` order. Models without ``feature_info`` that follow torchvision's ResNet layout
(``relu``/``act1`` then ``layer1..layerN``) resolve the same way; any model accepts module names.

The layout of a site's output comes from the model, never from the tensor's shape alone: timm's
``output_fmt`` (on the patch embedding or the model: ``NHWC`` for Swin/MambaOut), token layouts of
ViT-style models (prefix tokens, patch grid, dynamic image size), and ``feature_info``'s channel
count, which the site checks on every mix.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

LayerSpec = Union[int, str, Sequence[Union[int, str]], None]

_STEM_NAMES = ("act1", "bn1", "stem", "patch_embed", "relu")


@dataclass(frozen=True)
class SiteSpec:
    """One place the mix may happen: ``module_name`` None is the input."""

    label: object                 # what the user asked for (an index or a name)
    module_name: Optional[str]    # the module whose output is mixed
    hook_name: Optional[str] = None  # where the hook goes: the module that really produces that output
    hw_dims: Tuple[int, int] = (-2, -1)
    num_prefix_tokens: int = 0
    grid: Optional[Tuple[int, int]] = None
    grid_fn: Optional[Callable[[Tuple[int, int]], Tuple[int, int]]] = None
    num_chs: Optional[int] = None


def _feature_dicts(model: nn.Module) -> List[Dict]:
    fi = getattr(model, "feature_info", None)
    if fi is None:
        return []
    if hasattr(fi, "get_dicts"):  # timm FeatureInfo object (features_only models)
        return list(fi.get_dicts())
    return [f for f in fi if isinstance(f, dict) and "module" in f]


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def stage_names(model: nn.Module) -> List[str]:
    """Module names for indices 1, 2, ...: the stem, then each stage."""
    names = [f["module"] for f in _feature_dicts(model)]
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


def _fmt(value: object) -> Optional[str]:
    value = getattr(value, "value", value)  # timm's Format is a str Enum
    return value if isinstance(value, str) else None


def _layout(model: nn.Module, name: str) -> dict:
    """hw_dims / token layout / channel count of ``name``'s output, from what the model declares."""
    module = model.get_submodule(name)
    entry = next((f for f in _feature_dicts(model) if f["module"] == name), None)
    layout: dict = {"num_chs": entry.get("num_chs")} if entry else {}
    pe = getattr(model, "patch_embed", None)
    if module is pe:
        fmt = "NLC" if getattr(pe, "flatten", False) else _fmt(getattr(pe, "output_fmt", None))
    else:
        fmt = _fmt(getattr(module, "output_fmt", None)) or (_fmt(getattr(model, "output_fmt", None)) if entry else None)
    if fmt == "NHWC":
        layout["hw_dims"] = (1, 2)
    grid = getattr(pe, "grid_size", None) if pe is not None else None
    if grid is not None:  # ViT-style: tokens on the patch grid, prefix tokens after the embedding
        layout["grid"] = tuple(int(g) for g in grid)
        if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            layout["grid_fn"] = pe.dynamic_feat_size
        layout["num_prefix_tokens"] = 0 if module is pe else int(getattr(model, "num_prefix_tokens", 0))
    return layout


def _producer(model: nn.Module, name: str) -> str:
    """The module that really produces ``name``'s output: the last child of a plain ``nn.Sequential``.

    timm's activation checkpointing (``checkpoint_seq``) calls a stage's blocks one by one and never
    the stage itself, so a hook on the stage would not fire; the last block's output is the stage's
    output and is computed on every path. A child also used elsewhere keeps the hook on the stage.
    """
    counts: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    module = model.get_submodule(name)
    while type(module).forward is nn.Sequential.forward and len(module) > 0:
        last_name, last = list(module.named_children())[-1]
        if counts.get(id(last), 0) != 1:
            break
        name, module = f"{name}.{last_name}", last
    return name


def _site_for_name(model: nn.Module, name: str, label: object) -> SiteSpec:
    if not _has(model, name):
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"layer={name!r} is not a module of {type(model).__name__}; pass an index or the name "
                         f"of a submodule (top-level names: {', '.join(top)}; see model.named_modules())")
    return SiteSpec(label=label, module_name=name, hook_name=_producer(model, name), **_layout(model, name))


def _site_for_index(model: nn.Module, index: int) -> SiteSpec:
    names = stage_names(model)
    if index < 0 or index > len(names):
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


def _is_index(layer: object) -> bool:
    return isinstance(layer, numbers.Integral) and not isinstance(layer, bool)


def resolve_layers(model: nn.Module, layer: LayerSpec) -> List[SiteSpec]:
    """Turn ``layer=`` into the list of candidate mixing sites (one is chosen per batch)."""
    if _is_index(layer):
        return [_site_for_index(model, int(layer))]
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
            if not (_is_index(item) or isinstance(item, str)) or item == "random":
                raise TypeError(f"layer list items must be ints or module names; got {item!r}")
            sites.extend(resolve_layers(model, item))
        if len({s.module_name for s in sites}) != len(sites):
            raise ValueError(f"layer lists the same place twice: {list(layer)!r}")
        return sites
    raise TypeError(f"layer must be an int index, a module name, a list of them or 'random'; got {layer!r} "
                    f"({type(layer).__name__})")


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
    heads += [getattr(model, a) for a in ("fc", "classifier", "head", "heads")
              if isinstance(getattr(model, a, None), nn.Module)]
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], nn.Linear):
        heads.append(model[-1])
    for head in heads:
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
        if linears:
            return linears[-1].out_features
    raise ValueError(f"cannot infer num_classes from {type(model).__name__} (no num_classes attribute and no Linear "
                     f"classifier in fc/classifier/head or at the end of a Sequential): pass num_classes= explicitly")
