"""The CutMix paper's CIFAR model zoo, registered with timm: ``import models`` makes
``timm.create_model("pyramidnet200_a240")``, ``"resnet8_cifar"``, ... available."""
from .cifar_resnet import CifarBasicBlock, CifarResNet
from .pyramidnet import PyramidBasicBlock, PyramidBottleneck, PyramidNet, pad_channels

__all__ = ["CifarBasicBlock", "CifarResNet", "PyramidBasicBlock", "PyramidBottleneck", "PyramidNet", "pad_channels"]
