"""The CIFAR model zoo: timm registration, shapes, parameter counts, feature_info, and the
properties featmix relies on (layer indices -> feature-map grids, dtype/device/format agnosticism)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import models  # noqa: F401  (registers the zoo with timm)
from models import CifarResNet, PyramidNet, pad_channels

PYRAMIDNETS = ["pyramidnet200_a240", "pyramidnet110_a64", "pyramidnet272_a200"]
RESNETS = ["resnet8_cifar", "resnet20_cifar", "resnet56_cifar", "resnet110_cifar", "resnet18_cifar"]

# Exact counts with num_classes=100 pin the architecture (widths, rounding, shortcut type).
EXACT_PARAMS = {
    "pyramidnet200_a240": 26_844_952,
    "pyramidnet110_a64": 1_725_300,
    "pyramidnet272_a200": 26_288_692,
    "resnet8_cifar": 81_140,
    "resnet20_cifar": 275_572,
    "resnet56_cifar": 858_868,
    "resnet110_cifar": 1_733_812,
    "resnet18_cifar": 11_220_132,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    """Build on the meta device: shapes and counts without allocating or initialising weights."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def cheap(name: str, **kwargs) -> nn.Module:
    """PyramidNets at depth 11 (one bottleneck block per stage): the code paths of the 26.8M model
    (widening, pooled and zero-padded shortcuts) at a CPU-friendly cost; other models as registered."""
    if name.startswith("pyramidnet"):
        kwargs.setdefault("depth", 11)
    return timm.create_model(name, **kwargs)


def grids_of(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int, int]]:
    """(channels, h, w) of each feature_info module's output, captured with forward hooks."""
    seen: list[tuple[int, int, int]] = []
    handles = [
        model.get_submodule(info["module"]).register_forward_hook(
            lambda _m, _i, out: seen.append(tuple(out.shape[1:]))
        )
        for info in model.feature_info
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", PYRAMIDNETS + RESNETS)
def test_registered_and_param_count_and_output_shape(name):
    assert name in timm.list_models("*")
    model = meta_model(name, num_classes=100)
    assert n_params(model) == EXACT_PARAMS[name]
    assert model.num_classes == 100
    assert model(torch.empty(3, 3, 32, 32, device="meta")).shape == (3, 100)


def test_param_counts_match_the_papers():
    count = {name: n_params(meta_model(name, num_classes=100)) for name in ("pyramidnet200_a240", "pyramidnet110_a64")}
    assert abs(count["pyramidnet200_a240"] - 26.8e6) <= 0.005 * 26.8e6
    # The paper quotes 1.7M to two significant digits; the bottleneck net has 1.7253M (basic: 2.6M).
    assert round(count["pyramidnet110_a64"] / 1e6, 1) == 1.7
    assert round(n_params(meta_model("pyramidnet110_a64", num_classes=100, bottleneck=False)) / 1e6, 1) == 2.6
    # He et al.'s CIFAR-10 table: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M (option-A shortcuts).
    he = {name: n_params(meta_model(name, num_classes=10)) / 1e6 for name in RESNETS[1:4]}
    assert [round(he["resnet20_cifar"], 2), round(he["resnet56_cifar"], 2), round(he["resnet110_cifar"], 1)] == [
        0.27, 0.85, 1.7
    ]


@pytest.mark.parametrize("name", ["pyramidnet110_a64", "resnet8_cifar", "resnet20_cifar", "resnet18_cifar"])
def test_real_forward_shapes(name):
    model = cheap(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
    side = 4 if name == "resnet18_cifar" else 8
    assert feats.shape == (2, model.num_features, side, side)
    assert pooled.shape == (2, model.num_features)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(model(x), logits)


def test_pyramidnet_forward_features_ends_with_bn_relu():
    model = cheap("pyramidnet110_a64", num_classes=10).eval()
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.min() >= 0  # the final BN-ReLU is included
    assert model.feature_info[-1]["num_chs"] == model.num_features == feats.shape[1]


def test_resnet8_fashion_mnist_shape():
    """The experiments' configuration: one channel, 28x28, ten classes."""
    model = timm.create_model("resnet8_cifar", num_classes=10, in_chans=1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert [g[1] for g in grids_of(model.eval(), torch.randn(1, 1, 28, 28))] == [28, 28, 14, 7]


def test_pyramidnet_feature_info_and_grids():
    model = meta_model("pyramidnet110_a64", num_classes=10)
    info = model.feature_info
    assert [f["module"] for f in info] == ["bn1", "layer1", "layer2", "layer3"]
    assert [f["reduction"] for f in info] == [1, 1, 2, 4]
    # alpha 64 over 36 bottleneck blocks: widths 16+64*k/36 rounded, times 4 at the block output.
    assert [f["num_chs"] for f in info] == [16, 4 * round(16 + 64 / 3), 4 * round(16 + 128 / 3), 4 * 80]
    seen = grids_of(model, torch.empty(1, 3, 32, 32, device="meta"))
    assert [c for c, _, _ in seen] == [f["num_chs"] for f in info]
    # featmix index k>=1 is feature_info[k-1]: indices 1..4 mix on 32, 32, 16, 8 pixel grids (Figure 3).
    assert [(h, w) for _, h, w in seen] == [(32, 32), (32, 32), (16, 16), (8, 8)]


def test_pyramidnet200_feature_info():
    info = meta_model("pyramidnet200_a240").feature_info
    assert [(f["module"], f["num_chs"], f["reduction"]) for f in info] == [
        ("bn1", 16, 1), ("layer1", 384, 1), ("layer2", 704, 2), ("layer3", 1024, 4)
    ]


@pytest.mark.parametrize(
    "name, chs", [("resnet20_cifar", [16, 16, 32, 64]), ("resnet18_cifar", [64, 64, 128, 256, 512])]
)
def test_resnet_feature_info_and_grids(name, chs):
    model = meta_model(name)
    info = model.feature_info
    assert [f["module"] for f in info] == ["act1"] + [f"layer{i}" for i in range(1, len(chs))]
    assert [f["num_chs"] for f in info] == chs
    assert [f["reduction"] for f in info] == [1, 1, 2, 4, 8][: len(chs)]
    seen = grids_of(model, torch.empty(1, 3, 32, 32, device="meta"))
    assert seen == [(c, 32 // f["reduction"], 32 // f["reduction"]) for c, f in zip(chs, info)]


def test_width_kwarg():
    model = timm.create_model("resnet8_cifar", width=8)
    assert [f["num_chs"] for f in model.feature_info] == [8, 8, 16, 32]
    assert model.fc.in_features == 32


def test_shortcut_b_adds_projections():
    a = meta_model("resnet20_cifar")
    b = meta_model("resnet20_cifar", shortcut="B")
    # Two 1x1 projections (16->32, 32->64) with their BNs.
    assert n_params(b) - n_params(a) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="depth"):
        PyramidNet(depth=100, alpha=48, bottleneck=True)
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(shortcut="C")


@pytest.mark.parametrize("name", ["pyramidnet110_a64", "resnet8_cifar", "resnet18_cifar"])
def test_features_only(name):
    full = cheap(name)
    feat = cheap(name, features_only=True)
    maps = feat(torch.randn(1, 3, 16, 16))
    assert len(maps) == len(full.feature_info)
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in full.feature_info] == feat.feature_info.channels()
    assert [16 // m.shape[-1] for m in maps] == [f["reduction"] for f in full.feature_info]


@pytest.mark.parametrize("name", ["pyramidnet110_a64", "resnet8_cifar"])
def test_checkpoint_path_round_trip(name, tmp_path):
    torch.manual_seed(1)
    src = cheap(name, num_classes=7)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))  # so equality cannot come from a shared init
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)
    dst = cheap(name, num_classes=7, checkpoint_path=str(path))
    fresh = cheap(name, num_classes=7)
    ref = src.state_dict()
    assert ref.keys() == dst.state_dict().keys()
    for key, value in dst.state_dict().items():
        torch.testing.assert_close(value, ref[key], msg=key)
    assert not torch.equal(fresh.conv1.weight, ref["conv1.weight"])


@pytest.mark.parametrize("name", ["pyramidnet110_a64", "resnet8_cifar"])
def test_reset_classifier(name):
    model = cheap(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    assert model(x).shape == (2, 5)
    assert torch.count_nonzero(model.get_classifier().bias) == 0
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3, global_pool="catavgmax")
    assert model.get_classifier().in_features == 2 * model.num_features
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", ["pyramidnet110_a64", "resnet8_cifar", "resnet18_cifar"])
def test_channels_last_matches_contiguous(name):
    model = cheap(name, num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_pad_channels_keeps_dtype_device_format():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    y = pad_channels(x, 7)
    assert y.shape == (2, 7, 4, 5) and y.dtype == torch.float64
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[:, :3], x) and torch.count_nonzero(y[:, 3:]) == 0
    assert pad_channels(x, 3) is x
    meta = pad_channels(torch.empty(2, 3, 4, 4, device="meta", dtype=torch.bfloat16), 5)
    assert meta.device.type == "meta" and meta.dtype == torch.bfloat16 and meta.shape == (2, 5, 4, 4)
    with pytest.raises(ValueError):
        pad_channels(x, 2)


@pytest.mark.parametrize("name", ["pyramidnet110_a64", "resnet8_cifar"])
def test_zero_padded_shortcuts_float64_and_meta(name):
    model = cheap(name, num_classes=10).double()
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (2, 10)
    out.sum().backward()  # the padding is differentiable through the shortcut
    assert model.conv1.weight.grad is not None
    model = model.to("meta")
    assert model(torch.empty(2, 3, 32, 32, device="meta", dtype=torch.float64)).device.type == "meta"


@pytest.mark.parametrize("name", ["pyramidnet110_a64", "resnet20_cifar"])
def test_init_statistics(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    assert torch.all(model.fc.bias == 0)
    # He init with fan-out: std sqrt(2 / (k*k*out)); check the largest conv, where the estimate is tight.
    conv = max((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    k, out = conv.kernel_size[0], conv.out_channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (k * k * out)), rel=0.05)
    assert abs(conv.weight.mean().item()) < 0.1 * conv.weight.std().item()


def test_compile_resnet8_matches_eager():
    model = timm.create_model("resnet8_cifar", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_featmix_cutmixat_all_layers():
    featmix = pytest.importorskip("featmix")
    if not hasattr(featmix, "CutMixAt"):
        pytest.skip("featmix.CutMixAt is not implemented yet")
    torch.manual_seed(0)
    model = cheap("pyramidnet110_a64", num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for layer, grid in enumerate([32, 32, 32, 16, 8]):
        w = featmix.CutMixAt(model, layer=layer, generator=torch.Generator().manual_seed(0))
        w.train()
        model.zero_grad(set_to_none=True)
        logits, targets = w(x, y)
        assert logits.shape == targets.shape == (4, 10)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f"layer {layer}: no gradient for {missing}"
        mix = w.last_mix
        assert mix is not None and mix.layer == layer
        assert tuple(mix.grid) == (grid, grid)
        y1, y2, x1, x2 = mix.box
        assert 0 <= y1 <= y2 <= grid and 0 <= x1 <= x2 <= grid
        assert mix.lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / grid**2)
