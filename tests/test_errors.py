"""Bad input: a ValueError/TypeError that names the argument and the accepted values."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import featmix
from tests.conftest import TinyNet

IMAGES = torch.randn(4, 3, 8, 8)
LABELS = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"alpha": 0.0}, ValueError, r"alpha must be .*> 0"),
    ({"alpha": -1}, ValueError, r"alpha must be"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be"),
    ({"alpha": "1"}, ValueError, r"alpha must be"),
    ({"prob": 1.5}, ValueError, r"prob must be a number in \[0, 1\]"),
    ({"prob": -0.1}, ValueError, r"prob must be"),
    ({"variant": "mixup"}, ValueError, r"variant must be one of 'cutmix', 'center_gaussian'"),
    ({"variant": "scheduled"}, ValueError, r"total_steps"),
    ({"variant": "scheduled", "total_steps": 0}, ValueError, r"total_steps must be an int >= 1"),
    ({"label_smoothing": 1.0}, ValueError, r"label_smoothing must be a number in \[0, 1\)"),
    ({"center_std": 0}, ValueError, r"center_std"),
    ({"generator": 5}, TypeError, r"generator must be a torch.Generator"),
])
def test_bad_mix_arguments_for_every_entry_point(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        featmix.CutMix(num_classes=4, **kwargs)
    with pytest.raises(exc, match=pattern):
        featmix.CutMixAt(TinyNet(num_classes=4), layer=1, **kwargs)
    sampler_kwargs = {k: v for k, v in kwargs.items() if k != "label_smoothing"}
    if sampler_kwargs:
        with pytest.raises(exc, match=pattern):
            featmix.MixSampler(**sampler_kwargs)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        featmix.CutMix(num_classes=num_classes)


def test_num_classes_none_needs_two_dimensional_labels():
    c = featmix.CutMix(generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"num_classes must be passed when labels are class indices \(shape \(4,\)\)"):
        c(IMAGES, LABELS)
    _, targets = c(IMAGES, torch.eye(4))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_bad_images():
    c = featmix.CutMix(num_classes=4)
    with pytest.raises(ValueError, match=r"images must have 4 dimensions \(B, C, H, W\)"):
        c(torch.randn(3, 8, 8), LABELS[:3])
    with pytest.raises(TypeError, match="images must be a floating-point tensor for Mixup"):
        featmix.Mixup(4)(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), LABELS)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        c([[1.0]], LABELS)


def test_bad_labels():
    c = featmix.CutMix(num_classes=4)
    with pytest.raises(ValueError, match=r"labels must have one entry per image: batch size 4, got 3"):
        c(IMAGES, LABELS[:3])
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\).*\[0, 4\]"):
        c(IMAGES, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        c(IMAGES, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(TypeError, match="integer class indices"):
        c(IMAGES, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"K = num_classes = 4"):
        c(IMAGES, torch.rand(4, 5))
    with pytest.raises(TypeError, match="floating-point tensor of soft"):
        c(IMAGES, torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\)"):
        c(IMAGES, torch.zeros(4, 4, 1))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        c(IMAGES, [0, 1, 2, 3])


def test_wrapper_label_and_image_errors():
    w = featmix.CutMixAt(TinyNet(num_classes=4), layer=2)
    w.train()
    with pytest.raises(RuntimeError, match=r"called without labels: that forward was not mixed"):
        w(IMAGES).sum().backward()  # a label-less train forward serves BN recalibration, never training
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        w(IMAGES, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="one entry per image"):
        w(IMAGES, LABELS[:2])
    with pytest.raises(TypeError, match="floating-point"):
        w(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), LABELS)
    w0 = featmix.CutMixAt(TinyNet(num_classes=4), layer=0)
    w0.train()
    with pytest.raises(ValueError, match="4 dimensions"):
        w0(torch.randn(4, 3, 8), LABELS)
    net = TinyNet(num_classes=4).train()
    w1 = featmix.CutMixAt(net, layer=2)
    with pytest.raises(ValueError, match="one entry per image"):
        w1(IMAGES, LABELS[:2])
    torch.manual_seed(0)
    plain = net(IMAGES)
    torch.manual_seed(0)
    net.zero_grad()
    assert torch.equal(net(IMAGES), plain), "a failed call leaves nothing armed: the inner model runs unmixed"


def test_layer_errors():
    net = TinyNet(num_classes=4)
    with pytest.raises(ValueError, match=r"layer=5 is out of range for TinyNet: valid indices are 0 \(input\) to 4 "
                                         r"\(1=act1, 2=layer1, 3=layer2, 4=layer3\)"):
        featmix.CutMixAt(net, layer=5)
    with pytest.raises(ValueError, match="layer=-1 is out of range"):
        featmix.CutMixAt(net, layer=-1)
    with pytest.raises(ValueError, match=r"layer='layer9' is not a module of TinyNet.*top-level names: conv1"):
        featmix.CutMixAt(net, layer="layer9")
    with pytest.raises(TypeError, match="layer must be an int index, a module name"):
        featmix.CutMixAt(net, layer=2.0)
    with pytest.raises(TypeError, match="layer must be an int index"):
        featmix.CutMixAt(net, layer=True)
    with pytest.raises(ValueError, match="empty list"):
        featmix.CutMixAt(net, layer=[])
    with pytest.raises(ValueError, match="same place twice"):
        featmix.CutMixAt(net, layer=[2, "layer1"])
    with pytest.raises(ValueError, match="has none"):
        featmix.CutMixAt(net, layer=None)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"no timm feature_info.*only layer=0"):
        featmix.CutMixAt(plain, layer=1, num_classes=4)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        featmix.CutMixAt("resnet18", layer=1)


def test_feature_cutmix_bad_shapes():
    site = featmix.FeatureCutMix()
    with pytest.raises(ValueError, match=r"needs a \(B, C, H, W\) map or \(B, N, C\) tokens"):
        with featmix.mixing([site], LABELS, num_classes=4, sampler=featmix.MixSampler()):
            site(torch.randn(4, 5))
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int >= 0"):
        featmix.FeatureCutMix(num_prefix_tokens=-1)
