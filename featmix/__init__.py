"""featmix: CutMix as a layer, for input images and for the feature maps after any layer.

Entry points:
- ``CutMix``: input-level batch transform, ``images, targets = cutmix(images, labels)`` (also ``Mixup``,
  ``Cutout``, ``CutMixOrMixup``, and ``from_timm_args`` for timm's ``Mixup`` arguments);
- ``CutMixAt``: wrap a model, ``logits, targets = CutMixAt(model, layer=2)(images, labels)``;
- ``FeatureCutMix`` + ``mixing``: put the layer in your own network and arm it per batch;
- ``MixSampler``: the per-batch draw (gate, lam, box centre, permutation) from one generator;
- ``place`` / ``Placement``: where a draw lands on a grid (box, corrected lam, label weight);
- ``featmix.functional``: the pure kernels.
"""
from . import functional
from .arming import MixedBatch, MixRecord, mixing
from .kinds import KINDS, place
from .layer import FeatureCutMix, find_sites
from .placement import Placement, box_on_grid
from .resolve import infer_num_classes, resolve_layers, stage_names
from .sampling import MODES, VARIANTS, MixDraw, MixSampler
from .transforms import CutMix, CutMixOrMixup, Cutout, Mixup, from_timm_args
from .wrapper import CutMixAt

__version__ = "0.1.0"

__all__ = ["CutMix", "Mixup", "Cutout", "CutMixOrMixup", "from_timm_args", "CutMixAt", "FeatureCutMix", "MixSampler",
           "MixDraw", "MixRecord", "MixedBatch", "mixing", "find_sites", "Placement", "place", "box_on_grid",
           "resolve_layers", "stage_names", "infer_num_classes", "VARIANTS", "KINDS", "MODES", "functional"]
