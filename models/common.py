"""What the CIFAR models share: timm's pretrained-config dict for 32x32 inputs."""
from __future__ import annotations

from typing import Any, Dict


def cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    """timm default_cfg for a 32x32 CIFAR classifier (no weights to download: url is empty)."""
    cfg = dict(
        url="", num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        interpolation="bilinear", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        first_conv="conv1", classifier="fc",
    )
    return {**cfg, **kwargs}
