"""PyramidNet for 32x32 inputs (Han et al., CVPR 2017), as trained in the CutMix paper's CIFAR runs.

The width grows additively by ``alpha / (3 n)`` per block; the running width is kept as a float and
each block's width is ``int(round(running))``, so the channel counts (and hence the parameter counts,
26.8M for PyramidNet-200 alpha 240) match the reference implementation.  Shortcuts carry no parameters:
identity, 2x2 average pooling on stride-2 blocks, and zero channels appended when the block widens.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .common import ClassifierHeadMixin, cifar_cfg, init_weights

__all__ = ["PyramidNet", "PyramidBasicBlock", "PyramidBottleneck", "pad_channels"]


def pad_channels(x: torch.Tensor, out_chs: int) -> torch.Tensor:
    """Append zero channels to an NCHW tensor up to ``out_chs``.

    ``F.pad`` keeps dtype, device (``meta`` included) and memory format (channels_last stays
    channels_last) and traces cleanly under ``torch.compile``.
    """
    extra = out_chs - x.shape[1]
    if extra == 0:
        return x
    if extra < 0:
        raise ValueError(f"cannot pad {x.shape[1]} channels down to {out_chs}")
    return F.pad(x, (0, 0, 0, 0, 0, extra))


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class _PyramidBlock(nn.Module):
    """Shared shortcut of both block types: optional 2x2 average pool, then zero channel padding."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int) -> None:
        super().__init__()
        self.out_chs = planes * self.expansion
        # ceil_mode keeps odd sizes working (28x28 -> 14 -> 7, as for Fashion-MNIST).
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + pad_channels(self.downsample(x), self.out_chs)


class PyramidBasicBlock(_PyramidBlock):
    """BN - conv3x3(stride) - BN - ReLU - conv3x3 - BN (no ReLU after the addition)."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_chs, planes, stride)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = _conv3x3(in_chs, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn3 = nn.BatchNorm2d(planes)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(out)))
        return self.bn3(out)


class PyramidBottleneck(_PyramidBlock):
    """BN - conv1x1 - BN - ReLU - conv3x3(stride) - BN - ReLU - conv1x1(4 planes) - BN."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_chs, planes, stride)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.act3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.expansion)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(out)))
        out = self.conv3(self.act3(self.bn3(out)))
        return self.bn4(out)


class PyramidNet(ClassifierHeadMixin, nn.Module):
    """PyramidNet classifier with the timm interface (``feature_info``, ``forward_features``, ...).

    Children are registered in forward order so timm's ``features_only`` wrapper can run them in turn.
    """

    def __init__(
        self,
        depth: int = 200,
        alpha: float = 240,
        bottleneck: bool = True,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        stem_chs: int = 16,
    ) -> None:
        super().__init__()
        block = PyramidBottleneck if bottleneck else PyramidBasicBlock
        per_block = 9 if bottleneck else 6  # weighted layers a block adds over the three stages
        n, rest = divmod(depth - 2, per_block)
        if n < 1 or rest:
            kind = "bottleneck" if bottleneck else "basic"
            raise ValueError(f"depth must be {per_block}*n+2 with n >= 1 for {kind} blocks, got {depth}")
        self.num_classes = num_classes
        self.depth, self.alpha, self.bottleneck = depth, alpha, bottleneck

        self.conv1 = nn.Conv2d(in_chans, stem_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=stem_chs, reduction=1, module="bn1")]

        add_rate = alpha / (3 * n)
        width = float(stem_chs)  # running (float) width, rounded per block as the reference does
        in_chs = stem_chs
        reduction = 1
        for stage, stride in enumerate((1, 2, 2), start=1):
            blocks = []
            for i in range(n):
                width += add_rate
                blocks.append(block(in_chs, int(round(width)), stride if i == 0 else 1))
                in_chs = blocks[-1].out_chs
            reduction *= stride
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{stage}"))

        self.num_features = self.head_hidden_size = in_chs
        self.bn_final = nn.BatchNorm2d(in_chs)
        self.act_final = nn.ReLU(inplace=True)
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.act_final(self.bn_final(x))



default_cfgs = generate_default_cfgs({
    "pyramidnet200_a240": cifar_cfg(),
    "pyramidnet110_a64": cifar_cfg(),
    "pyramidnet272_a200": cifar_cfg(),
})


def _create(variant: str, pretrained: bool, defaults: Dict[str, Any], **kwargs: Any) -> PyramidNet:
    # One feature map per feature_info entry (stem + 3 stages); timm's default asks for 5.
    return build_model_with_cfg(
        PyramidNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **{**defaults, **kwargs},
    )


@register_model
def pyramidnet200_a240(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PyramidNet-200, alpha 240, bottleneck: the paper's main CIFAR model (26.8M params)."""
    return _create("pyramidnet200_a240", pretrained, dict(depth=200, alpha=240, bottleneck=True), **kwargs)


@register_model
def pyramidnet110_a64(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PyramidNet-110, alpha 64: the paper's light CIFAR model (1.7M params).

    Bottleneck blocks, as the reference training script builds every PyramidNet by default: only they
    give 1.7M (1.73M with 100 classes); basic blocks (``bottleneck=False``) give 2.6M.
    """
    return _create("pyramidnet110_a64", pretrained, dict(depth=110, alpha=64, bottleneck=True), **kwargs)


@register_model
def pyramidnet272_a200(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PyramidNet-272, alpha 200, bottleneck (26.0M params)."""
    return _create("pyramidnet272_a200", pretrained, dict(depth=272, alpha=200, bottleneck=True), **kwargs)
