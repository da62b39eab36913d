"""From ``layer=`` to the modules whose output gets mixed, and the layout of that output.

Index convention (the paper's Figure 3, extended): 0 = the input, 1 = after the stem (first
conv-BN[-act], or the patch embedding), 2 = after stage 1, 3 = after stage 2, ... up to the last stage.
Where the indices come from, by family (the first that recognises the model):

- Hugging Face transformers vision models: the stem (``embedder``/``embeddings``) then the stages
  (``encoder.stages.k``, ``encoder.layers.k``, ``layers.k``), declared per ``config.model_type`` in
  ``HF_FAMILIES`` and checked against the config (``stage_names``, ``depths``, ``num_hidden_layers``);
- torchvision: Swin (``features.0`` then the block stages, NHWC), ViT (``conv_proj`` then
  ``encoder.layers.*``, one class token on ``image_size // patch_size``), ConvNeXt, RegNet and the
  ``features.k`` families (EfficientNet, MobileNetV2/V3);
- timm: ``feature_info`` order (features-only wrappers included, whose modules are renamed
  ``stages.1`` -> ``stages_1``), the stem put in front when ``feature_info`` starts after it;
- anything with torchvision's ResNet layout (``relu``/``act1`` then ``layer1..layerN``).

Any model accepts module names. The layout of a site's output comes from the model, never from the
tensor's shape alone: timm's ``output_fmt`` and patch embedding (``grid_size``, wherever it lives:
``patch_embed`` or ``stem``), the prefix tokens the model declares, torchvision's Swin/ViT structure, the
Hugging Face config. Where it cannot be read, resolution raises a ``ValueError`` that names the
overrides (``layout=``, ``grid=``, ``num_prefix_tokens=``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

LayerSpec = Union[int, str, Sequence[Union[int, str]], None]

_STEM_NAMES = ("act1", "bn1", "stem", "patch_embed", "relu")
_OVERRIDES = "give the layout yourself (layout=, grid=, num_prefix_tokens=)"


@dataclass(frozen=True)
class SiteSpec:
    """One place the mix may happen: ``module_name`` None is the input.

    A 4-D output is mixed on ``hw_dims`` (``(1, 2)`` is NHWC); a 3-D output (B, N, C) is tokens: the
    first ``num_prefix_tokens`` are left alone, the rest lie on ``grid`` (or ``grid_fn(image_hw)``
    for models that take several image sizes). ``output_index``: the module returns a tuple and
    element ``output_index`` holds the map (the rest passes through).
    """

    label: object                 # what the user asked for (an index or a name)
    module_name: Optional[str]    # the module whose output is mixed
    hook_name: Optional[str] = None  # where the hook goes: the module that really produces that output
    hw_dims: Tuple[int, int] = (-2, -1)
    num_prefix_tokens: int = 0
    grid: Optional[Tuple[int, int]] = None
    grid_fn: Optional[Callable[[Tuple[int, int]], Tuple[int, int]]] = None
    num_chs: Optional[int] = None
    output_index: Optional[int] = None


class PatchGrid:
    """A picklable ``grid_fn``: the token grid of an image of ``(H, W)`` pixels.

    Each side is divided by ``patch`` (rounded down, or up for models that pad the image to whole
    patches), then halved ``halvings`` times, rounding up (patch merging that pads odd sides).
    """

    def __init__(self, patch: Tuple[int, int], ceil: bool = False, halvings: int = 0) -> None:
        self.patch, self.ceil, self.halvings = (int(patch[0]), int(patch[1])), bool(ceil), int(halvings)

    def __call__(self, image_hw: Tuple[int, int]) -> Tuple[int, int]:
        sides = []
        for side, p in zip(image_hw, self.patch):
            n = -(-int(side) // p) if self.ceil else int(side) // p
            for _ in range(self.halvings):
                n = -(-n // 2)
            sides.append(n)
        return sides[0], sides[1]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatchGrid) and (self.patch, self.ceil, self.halvings) == (
            other.patch, other.ceil, other.halvings)

    def __hash__(self) -> int:
        return hash((self.patch, self.ceil, self.halvings))

    def __repr__(self) -> str:
        return f"PatchGrid(patch={self.patch}, ceil={self.ceil}, halvings={self.halvings})"


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _fmt(value: object) -> Optional[str]:
    value = getattr(value, "value", value)  # timm's Format is a str Enum
    return value if isinstance(value, str) else None


def _pair(value: object) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class _Family:
    """How one kind of model names its index sites and lays out its modules' outputs."""

    what = "model"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def names(self) -> List[str]:
        """Module names for indices 1, 2, ...: the stem, then each stage."""
        return []

    def layout(self, name: str) -> dict:
        """SiteSpec fields (hw_dims, grid, ...) for ``name``'s output."""
        return {}


# -- timm (and plain models with a ResNet layout) -------------------------------------------------

def _feature_dicts(model: nn.Module) -> List[Dict]:
    fi = getattr(model, "feature_info", None)
    if fi is None:
        return []
    if hasattr(fi, "get_dicts"):  # timm FeatureInfo object (features_only models)
        return list(fi.get_dicts())
    return [f for f in fi if isinstance(f, dict) and "module" in f]


def _patch_embed(model: nn.Module) -> Optional[nn.Module]:
    """timm's patch embedding wherever the model keeps it (``patch_embed``; ``stem`` in MLP-Mixer/ResMLP):
    the top-level module that declares a ``grid_size`` and an ``output_fmt``."""
    for name in ("patch_embed", "stem"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and hasattr(module, "grid_size") and hasattr(module, "output_fmt"):
            return module
    found = [m for _, m in model.named_children() if hasattr(m, "grid_size") and hasattr(m, "output_fmt")]
    return found[0] if len(found) == 1 else None


class _Timm(_Family):
    what = "timm model"

    def names(self) -> List[str]:
        names = [f["module"] for f in _feature_dicts(self.model)]
        if names:
            first = names[0]
            if first in _STEM_NAMES or first.startswith("stem"):
                return names
            stem = next((n for n in _STEM_NAMES if _has(self.model, n)), None)
            return ([stem] if stem else []) + names
        # torchvision-style ResNet: conv1, bn1, relu, maxpool, layer1..layerN
        stages, k = [], 1
        while _has(self.model, f"layer{k}"):
            stages.append(f"layer{k}")
            k += 1
        stem = next((n for n in ("act1", "relu", "bn1") if _has(self.model, n)), None)
        if stages and stem:
            return [stem] + stages
        return []

    def entry(self, name: str) -> Optional[Dict]:
        return next((f for f in _feature_dicts(self.model) if f["module"] == name), None)

    def layout(self, name: str) -> dict:
        model = self.model
        module = model.get_submodule(name)
        entry = self.entry(name)
        layout: dict = {"num_chs": entry.get("num_chs")} if entry else {}
        pe = _patch_embed(model)
        if pe is not None and module is pe:
            fmt = "NLC" if getattr(pe, "flatten", False) else _fmt(getattr(pe, "output_fmt", None))
        else:
            # the model's output_fmt covers its index sites (the stem included: MambaOut's permutes to NHWC)
            site = entry is not None or name in self.names()
            fmt = _fmt(getattr(module, "output_fmt", None)) or (
                _fmt(getattr(model, "output_fmt", None)) if site else None)
        if fmt == "NHWC":
            layout["hw_dims"] = (1, 2)
        if pe is not None and getattr(pe, "grid_size", None) is not None and fmt != "NHWC":
            # ViT-style: tokens on the patch grid, prefix tokens after the embedding
            layout["grid"] = tuple(int(g) for g in pe.grid_size)
            if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
                layout["grid_fn"] = pe.dynamic_feat_size
            layout["num_prefix_tokens"] = 0 if module is pe else int(getattr(model, "num_prefix_tokens", 0) or 0)
        return layout


class _TimmFeatures(_Timm):
    """timm ``features_only`` wrappers: ``FeatureListNet``/``FeatureDictNet`` (modules copied to the top level,
    ``stages.1`` renamed ``stages_1``, a ``Sequential`` stem flattened into ``stem_0, stem_1``, nothing after
    the last requested feature) and ``FeatureGetterNet`` (the model kept whole as ``model``)."""

    what = "timm features-only model"

    @staticmethod
    def applies(model: nn.Module) -> bool:
        fi = getattr(model, "feature_info", None)
        return isinstance(getattr(fi, "info", None), list) and (
            isinstance(getattr(model, "return_layers", None), dict) or type(model).__name__ == "FeatureGetterNet")

    def _local(self, original: str) -> Optional[str]:
        for name in (original.replace(".", "_", 1), original, "model." + original):
            if _has(self.model, name):
                return name
        return None

    def _entries(self) -> List[Tuple[str, Dict]]:
        pairs = [(self._local(f["module"]), f) for f in self.model.feature_info.info]
        return [(n, f) for n, f in pairs if n is not None]

    def names(self) -> List[str]:
        entries = self._entries()
        names = [n for n, _ in entries]
        if not entries:
            return []
        original = entries[0][1]["module"]
        if original in _STEM_NAMES or original.startswith("stem"):
            return names
        keys = list(self.model._modules)
        if names[0] in keys:  # the stem is what runs before the first stage: its last (flattened) module
            before = keys[:keys.index(names[0])]
            stems = [k for k in before if k in _STEM_NAMES or any(k.startswith(s + "_") for s in _STEM_NAMES)]
            return stems[-1:] + names
        inner = self.model.get_submodule("model")
        stem = next((n for n in _STEM_NAMES if _has(inner, n)), None)
        return ([f"model.{stem}"] if stem else []) + names

    def entry(self, name: str) -> Optional[Dict]:
        return next((f for n, f in self._entries() if n == name), None)

    def layout(self, name: str) -> dict:
        if name.startswith("model.") and type(self.model).__name__ == "FeatureGetterNet":
            return _Timm(self.model.get_submodule("model")).layout(name[len("model."):])
        return super().layout(name)


# -- torchvision ------------------------------------------------------------------------------------

def _tv_class(model: nn.Module) -> Optional[str]:
    """The torchvision image classifier class the model is (or subclasses), by name."""
    for cls in type(model).__mro__:
        mod = cls.__module__
        if mod.startswith("torchvision.models.") and ".video." not in mod and cls.__name__ in _TV_FAMILIES:
            return cls.__name__
    return None


class _TvSwin(_Family):
    """torchvision Swin (v1 and v2): ``features.0`` (patch conv, then a permute to NHWC), then stages of blocks
    separated by patch merging; every output under ``features`` but the patch conv is NHWC."""

    what = "torchvision Swin"

    def names(self) -> List[str]:
        children = list(self.model.features.named_children())
        stages = [f"features.{n}" for n, m in children[1:] if not type(m).__name__.startswith("PatchMerging")]
        return ["features.0"] + stages

    def layout(self, name: str) -> dict:
        if name == "features.0.0":
            return {}
        if _within(name, "features") or _within(name, "norm"):
            return {"hw_dims": (1, 2)}
        return {}


class _TvViT(_Family):
    """torchvision ViT: ``conv_proj`` (NCHW patch grid), then ``encoder.layers.*`` on tokens with one class token;
    the image size is fixed (the model asserts it), so the grid is ``image_size // patch_size``."""

    what = "torchvision ViT"

    def names(self) -> List[str]:
        return ["conv_proj"] + [f"encoder.layers.{n}" for n, _ in self.model.encoder.layers.named_children()]

    def layout(self, name: str) -> dict:
        if _within(name, "encoder"):
            side = int(self.model.image_size) // int(self.model.patch_size)
            prefix = 1 if getattr(self.model, "class_token", None) is not None else 0
            return {"grid": (side, side), "num_prefix_tokens": prefix}
        return {}


class _TvFeatures(_Family):
    """torchvision ``features.k`` families: ``features.0`` is the stem; ConvNeXt's stages are its block
    sequences (the downsampling layers between them are not indexed); EfficientNet/MobileNet index every
    child of ``features``."""

    what = "torchvision model"

    def names(self) -> List[str]:
        children = list(self.model.features.named_children())
        if type(self.model).__name__ == "ConvNeXt":
            stages = [f"features.{n}" for n, m in children[1:]
                      if isinstance(m, nn.Sequential) and len(m) and type(m[0]).__name__ == "CNBlock"]
        else:
            stages = [f"features.{n}" for n, _ in children[1:]]
        return ["features.0"] + stages


class _TvRegNet(_Family):
    what = "torchvision RegNet"

    def names(self) -> List[str]:
        return ["stem"] + [f"trunk_output.{n}" for n, _ in self.model.trunk_output.named_children()]


_TV_FAMILIES = {"SwinTransformer": _TvSwin, "VisionTransformer": _TvViT, "ConvNeXt": _TvFeatures,
                "EfficientNet": _TvFeatures, "MobileNetV2": _TvFeatures, "MobileNetV3": _TvFeatures,
                "RegNet": _TvRegNet}


# -- Hugging Face transformers ----------------------------------------------------------------------

@dataclass(frozen=True)
class HFFamily:
    """How a Hugging Face vision family lays out its index sites (one row of ``HF_FAMILIES``).

    ``stem``: the embedding module under the base model; ``stages``: candidate paths of the stage
    container (transformers renamed them across versions; the first present is used); ``tokens``: the
    stages output (B, N, C) tokens on the patch grid (else NCHW maps); ``prefix_params``: the
    embedding's parameters that each prepend one token per entry of their dim 1 (class, distillation,
    register tokens); ``output_index``: the stem/stages return tuples whose element 0 holds the tokens;
    ``pad``: the image is padded to whole patches (grid sides rounded up); ``merging``: each stage but
    the last ends with patch merging that halves the grid (rounding up); ``inner_nchw``: every module
    of the model outputs NCHW maps (plain convolution nets), so any module name resolves; otherwise only
    the stem and the stages do (ConvNeXt's layers, for one, permute to NHWC inside).
    """

    stem: str
    stages: Tuple[str, ...]
    tokens: bool = False
    prefix_params: Tuple[str, ...] = ()
    output_index: Optional[int] = None
    pad: bool = False
    merging: bool = False
    inner_nchw: bool = False


_TOKEN_PREFIX = ("cls_token", "distillation_token", "register_tokens")
HF_FAMILIES: Dict[str, HFFamily] = {
    "resnet": HFFamily("embedder", ("encoder.stages",), inner_nchw=True),
    "regnet": HFFamily("embedder", ("encoder.stages",), inner_nchw=True),
    "convnext": HFFamily("embeddings", ("encoder.stages",)),
    "convnextv2": HFFamily("embeddings", ("encoder.stages",)),
    "vit": HFFamily("embeddings", ("layers", "encoder.layer", "encoder.layers"), tokens=True,
                    prefix_params=_TOKEN_PREFIX),
    "deit": HFFamily("embeddings", ("layers", "encoder.layer", "encoder.layers"), tokens=True,
                     prefix_params=_TOKEN_PREFIX),
    "dinov2": HFFamily("embeddings", ("encoder.layer", "encoder.layers", "layers"), tokens=True,
                       prefix_params=_TOKEN_PREFIX),
    "dinov2_with_registers": HFFamily("embeddings", ("encoder.layer", "encoder.layers", "layers"), tokens=True,
                                      prefix_params=_TOKEN_PREFIX),
    "swin": HFFamily("embeddings", ("encoder.layers",), tokens=True, output_index=0, pad=True, merging=True),
}


def _is_hf(model: nn.Module) -> bool:
    """A Hugging Face transformers model (or a subclass of one) with a config that names its family."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__) and isinstance(
        getattr(getattr(model, "config", None), "model_type", None), str)


class _HF(_Family):
    what = "Hugging Face model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.model_type = config.model_type
        self.family = HF_FAMILIES.get(self.model_type)
        prefix = getattr(model, "base_model_prefix", "")
        self.base = f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""
        self.config = config

    def _unknown(self) -> ValueError:
        return ValueError(f"layer indices of Hugging Face {type(self.model).__name__} (model_type="
                          f"{self.model_type!r}) are not declared in featmix.resolve.HF_FAMILIES (declared: "
                          f"{', '.join(sorted(HF_FAMILIES))}): pass a module name and {_OVERRIDES}")

    def _stage_container(self) -> str:
        fam = self.family
        for path in fam.stages:
            if _has(self.model, self.base + path):
                return self.base + path
        raise ValueError(f"Hugging Face {type(self.model).__name__}: none of the declared stage containers "
                         f"{', '.join(self.base + p for p in fam.stages)} exists in this transformers version; "
                         f"pass a module name and {_OVERRIDES}")

    def names(self) -> List[str]:
        if self.family is None:
            raise self._unknown()
        container = self._stage_container()
        stages = [f"{container}.{n}" for n, _ in self.model.get_submodule(container).named_children()]
        expected = self._expected_stages()
        if expected is not None and expected != len(stages):
            raise ValueError(f"Hugging Face {type(self.model).__name__}: {container} holds {len(stages)} stages but "
                             f"the config declares {expected}; {_OVERRIDES}")
        return [self.base + self.family.stem] + stages

    def _expected_stages(self) -> Optional[int]:
        c = self.config
        names = getattr(c, "stage_names", None)
        if isinstance(names, (list, tuple)) and names:
            return len(names) - 1  # "stem", "stage1", ...
        if self.family.tokens and not self.family.merging:
            return int(c.num_hidden_layers)
        depths = getattr(c, "depths", None)
        return len(depths) if isinstance(depths, (list, tuple)) else None

    def _prefix_tokens(self) -> int:
        emb = self.model.get_submodule(self.base + self.family.stem)
        count = 0
        for pname in self.family.prefix_params:
            param = getattr(emb, pname, None)
            if param is not None:
                count += int(param.shape[1])
        return count

    def layout(self, name: str) -> dict:
        fam = self.family
        if fam is None:
            raise self._unknown()
        names = self.names()
        if name not in names:
            if fam.inner_nchw:
                return {}  # convolution nets: every output is (B, C, H, W)
            raise ValueError(f"layer={name!r}: the layout of this module of Hugging Face {type(self.model).__name__} "
                             f"is not declared (declared: {', '.join(names)}); use one of those or {_OVERRIDES}")
        if not fam.tokens:
            return {}
        c = self.config
        patch = _pair(c.patch_size)
        image = _pair(c.image_size)
        k = names.index(name)  # 0 = stem, i = stage i
        halvings = 0
        if fam.merging and k > 0:
            halvings = min(k, len(names) - 2)  # stage i ends with merging unless it is the last
        grid_fn = PatchGrid(patch, ceil=fam.pad, halvings=halvings)
        layout = {"grid": grid_fn(image), "grid_fn": grid_fn, "output_index": fam.output_index}
        if fam.prefix_params:
            layout["num_prefix_tokens"] = self._prefix_tokens()
        return layout


def _family(model: nn.Module) -> _Family:
    if _is_hf(model):
        return _HF(model)
    tv = _tv_class(model)
    if tv is not None:
        return _TV_FAMILIES[tv](model)
    if _TimmFeatures.applies(model):
        return _TimmFeatures(model)
    return _Timm(model)


def stage_names(model: nn.Module) -> List[str]:
    """Module names for indices 1, 2, ...: the stem, then each stage.

    Args:
        model: a timm, torchvision or Hugging Face model, or anything with torchvision's ResNet layout.

    Returns:
        The module names, in index order (index 0, the input, is not a module); empty when the model's
        family declares none.

    Example:
        >>> import torchvision
        >>> featmix.stage_names(torchvision.models.resnet18())
        ['relu', 'layer1', 'layer2', 'layer3', 'layer4']
    """
    return _family(model).names()


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
    layout = _family(model).layout(name)
    return SiteSpec(label=label, module_name=name, hook_name=_producer(model, name), **layout)


def _site_for_index(model: nn.Module, index: int) -> SiteSpec:
    names = stage_names(model)
    if index < 0 or index > len(names):
        if not names:
            raise ValueError(f"layer={index!r}: {type(model).__name__} has no timm feature_info, no ResNet-style "
                             f"layer1..N and is not a torchvision or Hugging Face family featmix knows, so only "
                             f"layer=0 (the input) or a module name can be used")
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
    """Turn ``layer=`` into the list of candidate mixing sites (one is chosen per batch).

    Args:
        model: the model the sites hook into.
        layer: an index, a module name, a list of them, ``"random"`` or ``"input"`` (as ``CutMixAt``'s).

    Returns:
        One ``SiteSpec`` per candidate: the module whose output is mixed, where the hook goes, and the
        layout of that output as the model declares it.

    Raises:
        ValueError: an index out of range, an unknown name, a layout the model does not declare.
        TypeError: a ``layer`` of another type.

    Example:
        >>> import torchvision
        >>> spec, = featmix.resolve_layers(torchvision.models.resnet18(), 2)
        >>> spec.module_name, spec.hook_name
        ('layer1', 'layer1.1')
    """
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
    """The class count from timm's ``num_classes``, a Hugging Face config, or the classifier's ``out_features``.

    Args:
        model: the model.

    Returns:
        The class count.

    Raises:
        ValueError: no class count can be read (pass ``num_classes=``).

    Example:
        >>> featmix.infer_num_classes(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 7)))
        7
    """
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    if _is_hf(model):  # Hugging Face: the config's label count (several heads may share it: DeiT with teacher)
        n = getattr(model.config, "num_labels", None)
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
