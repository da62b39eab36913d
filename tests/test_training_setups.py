"""The setups models are really trained in: activation checkpointing (timm's and torch's, both modes),
exceptions mid-forward, modules that cannot be mixed, eval with labels, in-place mixing of autograd
tensors, DataLoader workers, taking the wrapper off, timm's optimizer helpers, and clear errors.

Checkpointing tests compare the gradients of a checkpointed run with the unchecked run of the same
model, seed and batch; timm CNNs get random BatchNorm weights first (timm zero-initialises the last BN
of each block, which can hide a wrong mix).
"""
from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import featmix
from tests.conftest import TinyNet, gen


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def rel_diff(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def wrapped_step(model: nn.Module, layer, x, y, seed: int = 3, **kwargs):
    """One training step through CutMixAt: (parameter gradients, record)."""
    w = featmix.CutMixAt(model, layer=layer, generator=gen(seed), **kwargs).train()
    logits, targets = w(x, y)
    F.cross_entropy(logits, targets).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    record = w.last_mix
    w.remove()
    return grads, record


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, num_classes=5, **kwargs))


# -- 1, 2: activation checkpointing --------------------------------------------------------------------

@pytest.mark.parametrize("name,layer", [
    ("resnet18", 2), ("resnet18", 3), ("resnet18", 4),
    ("efficientnet_b0", 3), ("mobilenetv3_small_050", 3),
])
def test_timm_checkpointing_mixes_and_gives_the_unchecked_gradients(name, layer):
    x, y = torch.randn(4, 3, 64, 64, generator=gen(1)), torch.tensor([0, 1, 2, 3])
    plain = timm_model(name)
    ckpt = timm_model(name)
    ckpt.set_grad_checkpointing(True)
    g_plain, r_plain = wrapped_step(plain, layer, x, y, variant="fixed_size")
    g_ckpt, r_ckpt = wrapped_step(ckpt, layer, x, y, variant="fixed_size")
    assert r_ckpt is not None and r_ckpt.lam < 1, "the checkpointed model mixed"
    assert (r_ckpt.grid, r_ckpt.box) == (r_plain.grid, r_plain.box)
    assert rel_diff(g_ckpt, g_plain) < 1e-5


@pytest.mark.parametrize("reentrant", [False, True], ids=["timm_default_non_reentrant", "reentrant"])
def test_vit_checkpointing_replays_the_mix(reentrant, monkeypatch):
    import timm.layers.config as timm_config
    monkeypatch.setattr(timm_config, "_USE_REENTRANT_CKPT", reentrant)
    x, y = torch.randn(4, 3, 64, 64, generator=gen(1)), torch.tensor([0, 1, 2, 3])
    kw = dict(img_size=64, depth=3)
    plain = timm_model("vit_tiny_patch16_224", **kw)
    ckpt = timm_model("vit_tiny_patch16_224", **kw)
    ckpt.set_grad_checkpointing(True)
    g_plain, r_plain = wrapped_step(plain, 2, x, y, variant="fixed_size")
    g_ckpt, r_ckpt = wrapped_step(ckpt, 2, x, y, variant="fixed_size")
    assert r_ckpt.grid == (4, 4) and r_ckpt.box == r_plain.box
    assert rel_diff(g_ckpt, g_plain) < 1e-5


class CheckpointedNet(nn.Module):
    """A block holding a FeatureCutMix, run under torch.utils.checkpoint (or not)."""

    def __init__(self, mode) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                                   featmix.FeatureCutMix(label="mid"), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = self.block(x) if self.mode is None else checkpoint(self.block, x, use_reentrant=self.mode == "reentrant")
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_torch_checkpoint_around_a_feature_cutmix_block(mode):
    x, y = torch.randn(6, 3, 12, 12, generator=gen(2)), torch.tensor([0, 1, 2, 3, 0, 1])
    grads = []
    for m in (None, mode):
        net = CheckpointedNet(m).train()
        sampler = featmix.MixSampler(variant="fixed_size", generator=gen(4))
        with featmix.mixing(net, y, num_classes=4, sampler=sampler) as batch:
            logits = net(x)
        F.cross_entropy(logits, batch.targets).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        assert batch.record.box == (batch.record.box[0], batch.record.box[0] + 6, batch.record.box[2],
                                    batch.record.box[2] + 6)
    assert rel_diff(grads[1], grads[0]) < 1e-6


def test_two_forwards_then_one_backward_through_checkpoints_is_an_error():
    """A recomputation for an older forward would replay a replaced draw: loud, never a wrong gradient."""
    model = timm_model("resnet18")
    model.set_grad_checkpointing(True)
    w = featmix.CutMixAt(model, layer=3, variant="fixed_size", generator=gen(0)).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    first = F.cross_entropy(*w(x, y))
    second = F.cross_entropy(*w(x, y))
    with pytest.raises(RuntimeError, match="one backward that runs through several forwards of the same model"):
        (first + second).backward()
    # one backward per forward (gradient accumulation as timm's train.py does it) is exact
    for _ in range(2):
        F.cross_entropy(*w(x, y)).backward()


# -- 3: layout from the model ----------------------------------------------------------------------------

def test_nchw_token_maps_of_nest_mix_on_the_patch_grid():
    torch.manual_seed(0)
    model = timm.create_model("nest_tiny", img_size=64, num_classes=3)
    w = featmix.CutMixAt(model, layer=[1, 2], generator=gen(0)).train()
    grids = {}
    with torch.no_grad():
        for _ in range(12):
            w(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
            grids[w.last_mix.layer] = w.last_mix.grid
    assert grids == {1: (16, 16), 2: (16, 16)}


@pytest.mark.slow
def test_nhwc_stages_of_swin_mix_on_the_spatial_grid():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3)
    w = featmix.CutMixAt(model, layer=2, generator=gen(0)).train()
    with torch.no_grad():
        w(torch.randn(2, 3, 224, 224), torch.tensor([0, 2]))
    assert w.last_mix.grid == (56, 56)


def test_a_map_that_contradicts_the_declared_layout_is_an_error():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.stage = nn.Conv2d(8, 16, 3, padding=1)
            self.head = nn.Linear(16, 2)
            self.feature_info = [dict(module="stem", num_chs=8, reduction=1), dict(module="stage", num_chs=16,
                                                                                  reduction=1)]

        def forward(self, x):
            x = self.stage(self.stem(x)).permute(0, 2, 3, 1)  # NHWC, not what feature_info implies
            return self.head(x.mean((1, 2)))

    net = Net()
    net.stage.register_forward_hook(lambda m, i, o: o.permute(0, 2, 3, 1))  # the stage itself now gives NHWC
    w = featmix.CutMixAt(net, layer=2, generator=gen(0)).train()
    with pytest.raises(ValueError, match=r"expected 16 channels on dim 1 \(from the model's feature_info\), got 8"):
        w(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))


# -- 4: no stale draws after an exception ------------------------------------------------------------------

class Flaky(TinyNet):
    """Raises before any layer runs (``fail='before'``: a chosen site never fired) or after layer2."""

    fail = None

    def forward(self, x):
        if self.fail == "before":
            raise RuntimeError("boom")
        x = self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x)))))
        if self.fail == "after":
            raise RuntimeError("boom")
        return self.fc(self.pool(self.layer3(x)).flatten(1))


@pytest.mark.parametrize("fail", ["before", "after"])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_an_exception_mid_forward_leaves_no_draw_behind(layer, fail):
    torch.manual_seed(0)
    net = Flaky().train()
    twin = Flaky().train()
    twin.load_state_dict(net.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    w1 = featmix.CutMixAt(net, layer=layer, variant="fixed_size", generator=gen(0))
    net.fail = fail
    with pytest.raises(RuntimeError, match="boom"):
        w1(x, y)
    net.fail = None
    assert torch.equal(net(x), twin(x)), "the inner model alone is not mixed with the failed call's draw"
    w2 = featmix.CutMixAt(net, layer=3, generator=gen(5))
    w2_twin = featmix.CutMixAt(twin, layer=3, generator=gen(5))
    (a, ta), (b, tb) = w2(x, y), w2_twin(x, y)
    assert torch.equal(a, b) and torch.equal(ta, tb), "another wrapper mixes once, with its own draw"
    w1(x, y)  # the failed wrapper works again
    assert w1.last_mix is not None


# -- 5: a chosen site that cannot mix is an error ------------------------------------------------------------

class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TupleBlock()
        self.unused = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x, _ = self.block(x)
        return self.head(x.mean((2, 3)))


class TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


def test_tuple_output_and_off_path_layers_raise_instead_of_training_unmixed():
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    with pytest.raises(TypeError, match=r"layer 'block' \(TupleBlock\) returns a tuple, not a tensor.*children: conv"):
        featmix.CutMixAt(TupleNet(), layer="block", generator=gen(0)).train()(x, y)
    with pytest.raises(RuntimeError, match=r"layer='unused' did not mix this batch: it did not run in the forward"):
        featmix.CutMixAt(TupleNet(), layer="unused", generator=gen(0)).train()(x, y)
    w = featmix.CutMixAt(TupleNet(), layer="block.conv", generator=gen(0)).train()  # the advice works
    w(x, y)
    assert w.last_mix.grid == (8, 8)
    quiet = featmix.CutMixAt(TupleNet(), layer="unused", prob=0.0).train()  # an unmixed batch needs no site
    quiet(x, y)
    assert quiet.last_mix is None


def test_a_site_that_runs_twice_in_one_forward_is_an_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.conv(self.conv(x)).mean((2, 3)))

    w = featmix.CutMixAt(Twice(), layer="conv", generator=gen(0)).train()
    with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
        w(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))


# -- 6: labels in eval mode ----------------------------------------------------------------------------------

def test_eval_with_labels_returns_logits_and_one_hot_targets(tiny_net):
    w = featmix.CutMixAt(tiny_net, layer=2, label_smoothing=0.1, generator=gen(0)).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    logits, targets = w(x, y)
    assert torch.equal(logits, tiny_net.eval()(x)) and logits.shape == (2, 10)
    assert torch.equal(targets, F.one_hot(y, 10).float())
    assert torch.equal(w(x), logits)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        w(x, torch.tensor([3, 10]))


# -- 7: in place on tensors autograd tracks ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (4, 8, 160, 160)], ids=["small", "large"])
def test_in_place_on_a_non_leaf_gives_the_reference_gradient(shape):
    from tests.conftest import reference
    base = torch.randn(shape, generator=gen(1), requires_grad=True)
    grad_out = torch.randn(shape, generator=gen(2))
    cm = featmix.CutMix(4, variant="fixed_size", inplace=True, generator=gen(3))
    x = base * 2.0
    mixed, _ = cm(x, torch.arange(shape[0]) % 4)
    assert mixed is x
    (got,) = torch.autograd.grad(mixed, base, grad_out)
    perm = featmix.MixSampler(variant="fixed_size", generator=gen(3)).draw(shape[0]).perm
    ref = base.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference(ref * 2.0, perm, cm.last_mix.box), ref, grad_out)
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (4, 8, 160, 160)], ids=["small_box", "large_box"])
def test_in_place_on_a_leaf_or_expanded_tensor_is_one_clear_error_for_every_box(shape):
    cm = featmix.CutMix(4, inplace=True, generator=gen(0))
    labels = torch.arange(shape[0]) % 4
    with pytest.raises(ValueError, match="images is a leaf tensor that requires grad: .* use inplace=False"):
        cm(torch.randn(shape, requires_grad=True), labels)
    expanded = torch.randn(1, *shape[1:]).expand(shape)
    with pytest.raises(ValueError, match=r"images is an expanded tensor \(stride 0 on dim 0\)"):
        cm(expanded, labels)
    with torch.no_grad():  # without autograd a leaf is just a tensor
        cm(torch.randn(shape, requires_grad=True), labels)


# -- 8: DataLoader workers ---------------------------------------------------------------------------------

class Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(3, 16, 16), i % 4


class CollateCutMix:
    def __init__(self):
        self.cutmix = featmix.CutMix(4, generator=torch.Generator().manual_seed(0))

    def __call__(self, batch):
        images, labels = torch.utils.data.default_collate(batch)
        self.cutmix(images, labels)
        return torch.tensor(self.cutmix.last_mix.box)


def worker_boxes(seed: int):
    loader = torch.utils.data.DataLoader(Batches(), batch_size=2, num_workers=2, collate_fn=CollateCutMix(),
                                         generator=torch.Generator().manual_seed(seed))
    return [tuple(b.tolist()) for b in loader]


def test_seeded_generator_gives_each_worker_its_own_reproducible_stream():
    boxes = worker_boxes(0)  # batches alternate between the two workers: 0, 1, 0, 1
    assert (boxes[0], boxes[2]) != (boxes[1], boxes[3]), "workers draw different streams"
    assert worker_boxes(0) == boxes, "the same seeds give the same boxes run to run"
    assert worker_boxes(1) != boxes, "another epoch/loader seed gives other boxes"


# -- 9: taking the mixing off ------------------------------------------------------------------------------

def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_remove_and_dropped_wrappers_leave_no_hooks_and_the_model_scripts():
    net = TinyNet()
    for _ in range(100):
        featmix.CutMixAt(net, layer="random")
    gc.collect()
    assert hooks_on(net) == 0, "a dropped wrapper takes its hooks with it"
    w = featmix.CutMixAt(net, layer=[1, 2, 3])
    assert hooks_on(net) == 3
    assert w.remove() is net and hooks_on(net) == 0
    with pytest.raises(RuntimeError, match="was removed"):
        w.train()(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(torch.jit.script(net)(x), net(x))
    assert torch.equal(torch.jit.trace(net, x)(x), net(x))


# -- 10: timm's optimizer helpers --------------------------------------------------------------------------

def groups(optimizer: torch.optim.Optimizer, model: nn.Module):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return sorted((sorted(name_of[id(p)] for p in g["params"]), g["weight_decay"], g.get("lr_scale", 1.0))
                  for g in optimizer.param_groups)


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.05), dict(weight_decay=0.05, layer_decay=0.75)],
                         ids=["weight_decay", "layer_decay"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18", "resnet8_cifar"])
def test_timm_optimizer_groups_of_the_wrapper_equal_the_plain_model(name, kwargs, caplog):
    from timm.optim import create_optimizer_v2

    import models  # noqa: F401 - registers resnet8_cifar
    torch.manual_seed(0)
    extra = dict(img_size=32, depth=2) if name.startswith("vit") else {}
    model = timm.create_model(name, num_classes=5, **extra)
    plain = groups(create_optimizer_v2(model, "adamw", **kwargs), model)
    with caplog.at_level(logging.WARNING):
        wrapped = groups(create_optimizer_v2(featmix.CutMixAt(model, layer=2), "adamw", **kwargs), model)
    assert wrapped == plain
    if name.startswith("vit"):
        no_decay = next(names for names, wd, _ in plain if "cls_token" in names)
        assert "pos_embed" in no_decay and all(wd == 0 for names, wd, _ in plain if "cls_token" in names)
    if "layer_decay" in kwargs and name != "resnet8_cifar":
        assert "no effect" not in caplog.text and len({scale for *_, scale in plain}) > 2


# -- 11: errors that say what was expected ---------------------------------------------------------------

def test_numpy_scalars_are_numbers():
    cm = featmix.CutMix(num_classes=np.int64(4), alpha=np.float32(0.5), prob=np.float64(1.0),
                        label_smoothing=np.float32(0.1))
    assert cm.num_classes == 4 and cm.sampler.alpha == 0.5
    w = featmix.CutMixAt(TinyNet(num_classes=4), layer=np.int64(2), alpha=np.float32(2.0))
    assert w.sites[0].label == 2
    with pytest.raises(ValueError, match=r"alpha must be a number > 0 \(lam ~ Beta\(alpha, alpha\)\), got"):
        featmix.CutMix(4, alpha=np.float32(-1))


def test_sampler_attributes_are_validated_when_set():
    s = featmix.MixSampler()
    for attr, value, pattern in [("prob", 5.0, r"prob must be a number in \[0, 1\]"), ("alpha", 0, "alpha must be"),
                                 ("center_std", -1, "center_std must be"), ("variant", "mixup", "variant must be"),
                                 ("total_steps", 0, "total_steps must be an int >= 1")]:
        with pytest.raises(ValueError, match=pattern):
            setattr(s, attr, value)
    s.prob = np.float32(0.5)
    assert s.prob == 0.5


def test_wrapper_of_a_wrapper_is_refused():
    with pytest.raises(TypeError, match="model is already a featmix.CutMixAt: wrap the plain model once"):
        featmix.CutMixAt(featmix.CutMixAt(TinyNet(), layer=2), layer=1)


def test_model_returning_logits_and_aux_keeps_its_output():
    class Aux(TinyNet):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.detach() * 0
    w = featmix.CutMixAt(Aux(), layer=2, generator=gen(0)).train()
    (logits, aux), targets = w(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == aux.shape == targets.shape == (4, 10)

    class NoTensor(TinyNet):
        def forward(self, x):
            super().forward(x)
            return {"note": "nothing"}
    with pytest.raises(TypeError, match="returned a dict with no tensor in it"):
        featmix.CutMixAt(NoTensor(), layer=2, generator=gen(0)).train()(torch.randn(2, 3, 16, 16),
                                                                          torch.tensor([0, 1]))


def test_state_dict_errors_name_the_plain_keys():
    w = featmix.CutMixAt(TinyNet(), layer=2)
    state = TinyNet().state_dict()
    state.pop("fc.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as err:
        w.load_state_dict(state)
    assert '"fc.weight"' in str(err.value) and '"extra.weight"' in str(err.value) and "model." not in str(err.value)
    parent = nn.Sequential(featmix.CutMixAt(TinyNet(), layer=2))
    result = parent.load_state_dict({f"0.{k}": v for k, v in state.items()}, strict=False)
    assert result.missing_keys == ["0.fc.weight"] and result.unexpected_keys == ["0.extra.weight"]


def test_label_shape_messages():
    cm = featmix.CutMix(4)
    with pytest.raises(ValueError, match=r"labels of shape \(4, 1\) holds one class index per row: squeeze it"):
        cm(torch.randn(4, 3, 8, 8), torch.tensor([[0], [1], [2], [3]]))


def test_dynamic_size_vit_on_a_non_square_input_mixes_on_its_own_grid():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=3, dynamic_img_size=True)
    w = featmix.CutMixAt(vit, layer=2, generator=gen(0)).train()
    with torch.no_grad():
        w(torch.randn(2, 3, 48, 80), torch.tensor([0, 2]))
    assert w.last_mix.grid == (3, 5)


@pytest.mark.parametrize("hw", [6, 200], ids=["small_box", "large_box"])
def test_mixing_with_fewer_labels_than_images_is_one_error(hw):
    site = featmix.FeatureCutMix(label="x")
    sampler = featmix.MixSampler(variant="fixed_size", generator=gen(0))
    with pytest.raises(ValueError, match=r"the map at layer='x' has batch size 4, but the batch was drawn for 3"):
        with featmix.mixing([site], torch.tensor([0, 1, 1]), num_classes=2, sampler=sampler):
            site(torch.randn(4, 3, hw, hw))
