"""CutMixAt: layer indices on timm/torchvision models, eval identity, state_dict, gradients, variants."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import featmix
from tests.conftest import TinyNet, constant_images, find_rectangle, gen


def train_step(wrapper, x, y):
    wrapper.train()
    logits, targets = wrapper(x, y)
    F.cross_entropy(logits, targets).backward()
    return logits, targets


@pytest.mark.parametrize("layer,grid", [(0, 16), (1, 16), (2, 16), (3, 8), (4, 4)])
def test_index_convention_on_resnet_layout(tiny_net, layer, grid):
    w = featmix.CutMixAt(tiny_net, layer=layer, generator=gen(0))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    grads = 0
    for _ in range(6):
        tiny_net.zero_grad()
        logits, targets = train_step(w, x, y)
        rec = w.last_mix
        assert rec is not None and rec.grid == (grid, grid) and rec.layer == layer
        area = (1 - rec.lam) * grid * grid
        assert area == pytest.approx(round(area), abs=1e-9), "1 - lam is a multiple of 1/(h*w)"
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        grads += sum(p.grad.abs().sum() for p in tiny_net.parameters())
    assert grads > 0


def test_mixing_happens_at_the_resolved_module_black_box():
    """Constant images through an identity 'stem' and an average pool: the mixed map names partners."""
    B = 6

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Identity()
            self.down = nn.AvgPool2d(4)
            self.seen = None
            self.fc = nn.Linear(3 * 16, B)

        def forward(self, x):
            x = self.down(self.stem(x))
            self.seen = x.detach().clone()
            return self.fc(x.flatten(1))

    net = Net()
    w = featmix.CutMixAt(net, layer="down", generator=gen(1))
    labels = torch.arange(B)
    for _ in range(10):
        logits, targets = train_step(w, constant_images(B, 16, 16), labels)
        rec = w.last_mix
        assert rec.grid == (4, 4)
        for i in range(B):
            diff = (net.seen[i] != i).any(0)
            box = find_rectangle(diff)
            assert box in {rec.box, (0, 0, 0, 0)}
            if box != (0, 0, 0, 0):
                j = int(net.seen[i, 0, box[0], box[2]])
                assert targets[i, i] == pytest.approx(rec.lam) and targets[i, j] == pytest.approx(1 - rec.lam)


def test_eval_is_exactly_the_wrapped_model(tiny_net):
    w = featmix.CutMixAt(tiny_net, layer=[0, 2, 3], generator=gen(0))
    x = torch.randn(4, 3, 16, 16)
    train_step(w, x, torch.randint(0, 10, (4,)))
    w.eval()
    tiny_net.eval()
    assert torch.equal(w(x), tiny_net(x))
    w.train()
    tiny_net.eval()  # a plain call of the inner model is never mixed, even in train mode
    tiny_net.train()
    reference = TinyNet()
    reference.load_state_dict(tiny_net.state_dict())
    reference.train()
    assert torch.equal(tiny_net(x), reference(x)), "the inner model called directly is never mixed"


def test_state_dict_round_trips_with_plain_model(tiny_net):
    w = featmix.CutMixAt(tiny_net, layer=2, generator=gen(0))
    plain = TinyNet()
    assert list(w.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(w.state_dict())  # strict
    for a, b in zip(plain.state_dict().values(), tiny_net.state_dict().values()):
        assert torch.equal(a, b)
    fresh = TinyNet()
    torch.nn.init.constant_(fresh.fc.weight, 3.0)
    w.load_state_dict(fresh.state_dict())  # strict, plain keys into the wrapper
    assert torch.all(tiny_net.fc.weight == 3.0)
    parent = nn.Sequential(w)  # nested: keys keep the parent's prefix only
    assert set(parent.state_dict()) == {f"0.{k}" for k in plain.state_dict()}
    parent.load_state_dict(parent.state_dict())


def test_attribute_fallthrough_and_num_classes_inference():
    m = timm.create_model("resnet18", num_classes=7)
    w = featmix.CutMixAt(m, layer=2)
    assert w.num_classes == 7 and w.feature_info is m.feature_info
    tv = torchvision.models.resnet18(num_classes=5)
    assert featmix.CutMixAt(tv, layer=1).num_classes == 5
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
    assert featmix.CutMixAt(seq, layer=0).num_classes == 6
    no_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="num_classes"):
        featmix.CutMixAt(no_head, layer=0)
    assert featmix.CutMixAt(no_head, layer=0, num_classes=4).num_classes == 4


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,expected", [
    ("resnet18", [64, 32, 16, 8, 4, 2]),       # act1, layer1 (after the maxpool), layer2..4
    pytest.param("resnet18d", [64, 32, 16, 8, 4, 2], marks=SLOW),
    pytest.param("seresnet18", [64, 32, 16, 8, 4, 2], marks=SLOW),
    pytest.param("regnetx_002", [64, 32, 16, 8, 4, 2], marks=SLOW),    # stem, s1..s4
    pytest.param("convnext_atto", [64, 16, 16, 8, 4, 2], marks=SLOW),  # patchify stem (stride 4), stages.0..3
    ("efficientnet_b0", [64, 32, 32, 16, 8, 4, 2]),  # conv_stem+bn1, blocks 0, 1, 2, 4, 6
    pytest.param("mobilenetv3_small_050", [64, 32, 16, 8, 4, 2], marks=SLOW),
])
def test_every_index_of_timm_families_mixes_on_expected_grid(name, expected):
    """expected[k] is the map side at index k for a 64 x 64 input (forward only: grids are the point)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4)
    names = featmix.stage_names(model)
    assert len(names) + 1 == len(expected), names
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    w = featmix.CutMixAt(model, layer=list(range(len(names) + 1)), generator=gen(0))
    w.train()
    seen = {}
    with torch.no_grad():
        for _ in range(12 * len(expected)):
            logits, targets = w(x, y)
            seen[w.last_mix.layer] = w.last_mix.grid
            if len(seen) == len(expected):
                break
    assert seen == {k: (g, g) for k, g in enumerate(expected)}


@pytest.mark.parametrize("name,first", [("resnet50d", "act1"), ("resnext50_32x4d", "act1"), ("seresnet50", "act1"),
                                        ("regnety_002", "stem"), ("convnext_atto", "stem"),
                                        ("mobilenetv3_small_050", "bn1"), ("efficientnet_b0", "bn1")])
def test_stem_and_stages_resolve_for_every_family(name, first):
    """Cheap (no forward): index 1 is the stem, then one index per feature_info stage."""
    model = timm.create_model(name, pretrained=False)
    names = featmix.stage_names(model)
    fi = [f["module"] for f in model.feature_info]
    assert names[0] == first and names[-len(fi[1:]):] == fi[1:] and len(names) in (len(fi), len(fi) + 1)


def test_resnet_index_matches_design_names():
    assert featmix.stage_names(timm.create_model("resnet18")) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert featmix.stage_names(torchvision.models.resnet18()) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert featmix.stage_names(timm.create_model("efficientnet_b0"))[:2] == ["bn1", "blocks.0"]


def test_torchvision_model_by_index_and_name():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=3)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    w = featmix.CutMixAt(tv, layer="layer2", generator=gen(0))
    train_step(w, x, y)
    assert w.last_mix.grid == (8, 8) and w.last_mix.layer == "layer2"
    assert w.remove() is tv
    w = featmix.CutMixAt(tv, layer=3, generator=gen(0))
    train_step(w, x, y)
    assert w.last_mix.grid == (8, 8)


def test_vit_tokens_prefix_untouched_and_patch_grid():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3, depth=2)
    raw, mixed_in = {}, {}
    vit.blocks[0].register_forward_hook(lambda m, i, o: raw.__setitem__("o", o.detach().clone()))
    w = featmix.CutMixAt(vit, layer=2, generator=gen(3))  # after blocks.0
    vit.blocks[1].register_forward_pre_hook(lambda m, i: mixed_in.__setitem__("i", i[0].detach().clone()))
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    for _ in range(5):
        train_step(w, x, y)
        rec = w.last_mix
        assert rec.grid == (4, 4)
        assert torch.equal(mixed_in["i"][:, :1], raw["o"][:, :1]), "class token untouched"
        a = mixed_in["i"][:, 1:].view(4, 4, 4, -1)
        b = raw["o"][:, 1:].view(4, 4, 4, -1)
        y1, y2, x1, x2 = rec.box
        outside = torch.ones(4, 4, dtype=torch.bool)
        outside[y1:y2, x1:x2] = False
        assert torch.equal(a[:, outside], b[:, outside])
    w1 = featmix.CutMixAt(timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3, depth=2), layer=1,
                          generator=gen(0))
    train_step(w1, x, y)
    assert w1.last_mix.grid == (4, 4) and w1.sites[0].num_prefix_tokens == 0


def test_random_layer_picks_one_site_per_batch(tiny_net):
    w = featmix.CutMixAt(tiny_net, layer="random", generator=gen(2))
    assert [s.label for s in w.sites] == [0, 1, 2, 3]  # input, stem, every stage but the last
    seen = set()
    for _ in range(40):
        train_step(w, torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
        seen.add(w.last_mix.layer)
    assert seen == {0, 1, 2, 3}
    w2 = featmix.CutMixAt(TinyNet(), layer=[1, "layer3"], generator=gen(2))
    assert [s.label for s in w2.sites] == [1, "layer3"]


def test_hand_built_net_with_layer_none():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), featmix.FeatureCutMix(label="a"), nn.ReLU(),
                        nn.MaxPool2d(2), featmix.FeatureCutMix(label="b"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5))
    w = featmix.CutMixAt(net, layer=None, generator=gen(0))
    grids = set()
    for _ in range(20):
        train_step(w, torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4]))
        grids.add((w.last_mix.layer, w.last_mix.grid))
    assert grids == {("a", (8, 8)), ("b", (4, 4))}
    assert set(w.state_dict()) == set(net.state_dict())


def test_determinism_with_seeded_generator(tiny_net):
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(0)
        w = featmix.CutMixAt(TinyNet(), layer="random", generator=gen(seed))
        w.train()
        runs.append([w(x, y) for _ in range(4)])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a[1], c[1]) for a, c in zip(runs[0], runs[2]))


def test_batch_of_one_and_prob_zero_train_unmixed(tiny_net):
    w = featmix.CutMixAt(tiny_net, layer=2, generator=gen(0))
    logits, targets = train_step(w, torch.randn(1, 3, 16, 16), torch.tensor([4]))
    assert w.last_mix is None and torch.equal(targets, F.one_hot(torch.tensor([4]), 10).float())
    w0 = featmix.CutMixAt(TinyNet(), layer=2, prob=0.0)
    train_step(w0, torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]))
    assert w0.last_mix is None


@pytest.mark.parametrize("variant", featmix.VARIANTS)
def test_every_variant_trains_at_a_feature_layer(tiny_net, variant):
    kw = {"total_steps": 4} if variant == "scheduled" else {}
    w = featmix.CutMixAt(tiny_net, layer=3, variant=variant, generator=gen(1), label_smoothing=0.1, **kw)
    weights = []
    for _ in range(12):
        _, targets = train_step(w, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        if w.last_mix is not None:
            weights.append((w.last_mix.lam, w.last_mix.weight, w.last_mix.box))
    assert weights
    for lam, weight, box in weights:
        if variant == "one_hot":
            assert weight == (1.0 if lam >= 0.5 else 0.0)
        elif variant == "complete_label":
            assert weight == 0.5
        elif variant == "fixed_size":
            assert (box[1] - box[0], box[3] - box[2]) == (4, 4) and lam == 0.75
        else:
            assert weight == lam
    if variant == "scheduled":
        assert w.sampler.step == 12 and w.sampler.state_dict()["step"] == 12


def test_channels_last_and_bf16_model(tiny_net):
    m = tiny_net.to(memory_format=torch.channels_last)
    seen = {}
    m.layer2.register_forward_hook(lambda mod, i, o: None)
    m.layer3.register_forward_pre_hook(lambda mod, i: seen.__setitem__("x", i[0]))
    w = featmix.CutMixAt(m, layer=3, generator=gen(0))
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    train_step(w, x, torch.tensor([0, 1, 2, 3]))
    assert w.last_mix is not None and seen["x"].is_contiguous(memory_format=torch.channels_last)
    mb = TinyNet().to(torch.bfloat16)
    wb = featmix.CutMixAt(mb, layer=2, generator=gen(0))
    logits, targets = train_step(wb, torch.randn(4, 3, 16, 16, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3]))
    assert logits.dtype == torch.bfloat16 and targets.dtype == torch.float32
