"""ResNets for 32x32 inputs: He et al.'s CIFAR ResNet-8/20/56/110 and a ResNet-18 with a CIFAR stem.

He et al.'s CIFAR nets default to their option-A shortcut (stride-2 subsampling plus zero channels, no
parameters), so the parameter counts are the published ones (ResNet-110: 1.7M); ``shortcut="B"``
switches to a 1x1 conv + BN projection, which is what the ImageNet-style ``resnet18_cifar`` uses.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .common import ClassifierHeadMixin, cifar_cfg, init_weights
from .pyramidnet import pad_channels

__all__ = ["CifarResNet", "CifarBasicBlock"]


class _SubsamplePad(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel, then append zero channels."""

    def __init__(self, stride: int, out_chs: int) -> None:
        super().__init__()
        self.stride, self.out_chs = stride, out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_channels(x[:, :, :: self.stride, :: self.stride], self.out_chs)


class CifarBasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus shortcut, then ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        if stride == 1 and in_chs == out_chs:
            self.downsample: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.downsample = _SubsamplePad(stride, out_chs)
        else:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.downsample(x))


class CifarResNet(ClassifierHeadMixin, nn.Module):
    """ResNet of basic blocks with a 3x3 stride-1 stem and no max-pool, with the timm interface.

    ``layers[i]`` blocks of width ``widths[i]`` per stage; every stage after the first halves the
    resolution.  Children are registered in forward order for timm's ``features_only`` wrapper.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        shortcut: str = "A",
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers or min(layers) < 1:
            raise ValueError(f"layers and widths must be equally long with >= 1 block each, got {layers}, {widths}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-pad) or 'B' (1x1 conv), got {shortcut!r}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=widths[0], reduction=1, module="act1")]

        in_chs, reduction = widths[0], 1
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = [CifarBasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1, shortcut)
                      for j in range(n)]
            in_chs, reduction = width, reduction * stride
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layer{i + 1}"))
        self.num_stages = len(layers)

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x



default_cfgs = generate_default_cfgs({
    "resnet8_cifar": cifar_cfg(),
    "resnet20_cifar": cifar_cfg(),
    "resnet56_cifar": cifar_cfg(),
    "resnet110_cifar": cifar_cfg(),
    "resnet18_cifar": cifar_cfg(pool_size=(4, 4)),
})


def _create(variant: str, pretrained: bool, n: int, width: int, **kwargs: Any) -> CifarResNet:
    """He et al.'s 6n+2-layer CIFAR ResNet at widths (w, 2w, 4w)."""
    args = dict(layers=(n, n, n), widths=(width, 2 * width, 4 * width), shortcut="A")
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **{**args, **kwargs}
    )


@register_model
def resnet8_cifar(pretrained: bool = False, width: int = 16, **kwargs: Any) -> CifarResNet:
    """ResNet-8 (n=1): the cheapest model, used for quick Fashion-MNIST runs."""
    return _create("resnet8_cifar", pretrained, 1, width, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, width: int = 16, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (n=3)."""
    return _create("resnet20_cifar", pretrained, 3, width, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, width: int = 16, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (n=9)."""
    return _create("resnet56_cifar", pretrained, 9, width, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, width: int = 16, **kwargs: Any) -> CifarResNet:
    """ResNet-110 (n=18): the paper's ResNet-110 CIFAR row."""
    return _create("resnet110_cifar", pretrained, 18, width, **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, width: int = 64, **kwargs: Any) -> CifarResNet:
    """ResNet-18 (basic blocks [2, 2, 2, 2], widths 64..512, 1x1-conv shortcuts) with a CIFAR stem."""
    args = dict(layers=(2, 2, 2, 2), widths=tuple(width * m for m in (1, 2, 4, 8)), shortcut="B")
    return build_model_with_cfg(
        CifarResNet, "resnet18_cifar", pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
        **{**args, **kwargs},
    )
