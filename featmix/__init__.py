"""featmix: CutMix as a layer, for input images and for the feature maps after any layer.

Entry points:
- ``CutMix``: input-level batch transform, ``images, targets = cutmix(images, labels)``;
- ``CutMixAt``: wrap a model, ``logits, targets = CutMixAt(model, layer=2)(images, labels)``;
- ``FeatureCutMix`` + ``mixing``: put the layer in your own network and arm it per batch;
- ``MixSampler``: the per-batch draw (gate, lam, box centre, permutation) from one generator;
- ``featmix.functional``: the pure kernels.
"""
from . import functional
from .layer import FeatureCutMix, MixedBatch, MixRecord, find_sites, mixing
from .resolve import infer_num_classes, resolve_layers, stage_names
from .sampling import VARIANTS, MixDraw, MixSampler, box_on_grid
from .transforms import CutMix
from .wrapper import CutMixAt

__version__ = "0.1.0"

__all__ = ["CutMix", "CutMixAt", "FeatureCutMix", "MixSampler", "MixDraw", "MixRecord", "MixedBatch", "mixing",
           "find_sites", "box_on_grid", "resolve_layers", "stage_names", "infer_num_classes", "VARIANTS",
           "functional"]
