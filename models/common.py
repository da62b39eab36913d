"""What the CIFAR models share: timm's pretrained-config dict for 32x32 inputs and the classifier head API."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from timm.layers import create_classifier
from torch import nn


def cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    """timm default_cfg for a 32x32 CIFAR classifier (no weights to download: url is empty)."""
    cfg = dict(
        url="", num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        interpolation="bilinear", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        first_conv="conv1", classifier="fc",
    )
    return {**cfg, **kwargs}


def init_weights(model: nn.Module) -> None:
    """The reference codes' init: convs N(0, sqrt(2 / fan_out)) (He, fan-out), BN weight 1 / bias 0,
    linear bias 0 (the linear weight keeps torch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class ClassifierHeadMixin:
    """timm's head interface shared by the CIFAR models: ``global_pool`` + ``fc`` over ``num_features``."""

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        pool = global_pool if global_pool is not None else self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool)
        if isinstance(self.fc, nn.Linear):
            nn.init.zeros_(self.fc.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
