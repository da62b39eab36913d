"""FeatureCutMix and the ``mixing`` context: placement, one mix per batch, gradients, tokens, no stale state."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featmix
from featmix import functional as FM
from tests.conftest import constant_images, find_rectangle, gen


class Probe(nn.Module):
    """Identity that remembers what passed through it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return x


def test_feature_cutmix_identity_unless_armed():
    layer = featmix.FeatureCutMix()
    x = torch.randn(4, 3, 8, 8)
    assert layer(x) is x
    layer.eval()
    assert layer(x) is x


def test_mixing_context_mixes_one_layer_on_its_own_grid():
    B = 8
    pool = nn.AvgPool2d(4)
    probes = [Probe(), Probe()]
    net = nn.Sequential(featmix.FeatureCutMix(label="input"), probes[0], pool, featmix.FeatureCutMix(label="pooled"),
                        probes[1], nn.Flatten(), nn.Linear(3 * 4 * 4, B))
    sampler = featmix.MixSampler(generator=gen(0))
    labels = torch.arange(B)
    chosen = set()
    for _ in range(40):
        x = constant_images(B, 16, 16)
        with featmix.mixing(net, labels, num_classes=B, sampler=sampler) as batch:
            net(x)
        rec = batch.record
        if rec is None:
            continue
        chosen.add(rec.layer)
        # exactly one layer changed the map
        before_pool_changed = not torch.equal(probes[0].seen, x)
        if rec.layer == "input":
            assert rec.grid == (16, 16)
            seen = probes[0].seen
        else:
            assert rec.grid == (4, 4) and not before_pool_changed
            seen = probes[1].seen
        h, w = rec.grid
        assert ((1 - rec.lam) * h * w) == pytest.approx(round((1 - rec.lam) * h * w))
        for i in range(B):
            box = find_rectangle((seen[i] != i).any(0))
            assert box is not None and box in {rec.box, (0, 0, 0, 0)}
        torch.testing.assert_close(batch.targets.sum(1), torch.ones(B))
    assert chosen == {"input", "pooled"}
    x = constant_images(B, 16, 16)
    assert torch.equal(net[:2](x), x), "after the block the layers are the identity: no draw outlives its forward"


def test_mixing_disarms_after_exception_and_outside_the_block():
    site = featmix.FeatureCutMix()
    net = nn.Sequential(site, nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with featmix.mixing(net, torch.tensor([0, 1]), num_classes=2, sampler=featmix.MixSampler(generator=gen(0))):
            raise RuntimeError("boom")
    x = torch.randn(2, 3, 2, 2)
    assert site(x) is x  # no stale draw


def test_mixing_requires_a_site():
    with pytest.raises(ValueError, match="FeatureCutMix"):
        with featmix.mixing(nn.Linear(2, 2), torch.tensor([0]), num_classes=2):
            pass


def test_unreached_site_is_an_error_not_an_unmixed_batch():
    site = featmix.FeatureCutMix(label="side")  # registered but never called in forward
    net = nn.Module()
    net.site = site
    y = torch.tensor([0, 1, 1])
    with pytest.raises(RuntimeError, match=r"layer='side' did not mix this batch: it did not run in the forward"):
        with featmix.mixing(net, y, num_classes=2, sampler=featmix.MixSampler(generator=gen(0))):
            pass
    # an unmixed draw (gate closed) needs no site to run: plain targets
    with featmix.mixing(net, y, num_classes=2, sampler=featmix.MixSampler(prob=0.0)) as batch:
        pass
    assert batch.record is None and torch.equal(batch.targets, F.one_hot(y, 2).float())


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_reach_both_partners_and_match_reference(channels_last):
    x = torch.randn(6, 4, 10, 12, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    perm = torch.tensor([3, 0, 1, 5, 2, 4])
    box = (2, 7, 3, 11)
    out = FM.paste_box(x, perm, box)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    # reference: masked select, differentiated by autograd
    x2 = x.detach().clone().requires_grad_(True)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:7, 3:11] = True
    ref = torch.where(mask, x2[perm], x2)
    (gref,) = torch.autograd.grad(ref, x2, g)
    assert torch.equal(out.detach(), ref.detach())
    torch.testing.assert_close(gx, gref, rtol=0, atol=0)
    # sample perm[0] = 3 receives gradient inside the box from sample 0
    assert torch.equal(gx[3, :, 2:7, 3:11], g[0, :, 2:7, 3:11])
    small = x[:, :1, :, :4].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: FM.paste_box(t, perm, box), (small,))


def test_safe_after_inplace_relu_and_gradients_flow():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), featmix.FeatureCutMix(),
                        nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    # fixed_size: a 4 x 4 box whatever the stream draws, so the test never rests on a lucky seed
    sampler = featmix.MixSampler(variant="fixed_size", generator=gen(4))
    with featmix.mixing(net, y, num_classes=3, sampler=sampler) as batch:
        logits = net(x)
    assert batch.record is not None and batch.record.lam == 0.75
    F.cross_entropy(logits, batch.targets).backward()
    assert x.grad is not None and torch.all(x.grad.abs().sum((1, 2, 3)) > 0)


def test_token_maps_leave_prefix_tokens_alone():
    B, p, gh, gw, C = 4, 2, 3, 5, 6
    site = featmix.FeatureCutMix(num_prefix_tokens=p, grid=(gh, gw))
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1).expand(B, p + gh * gw, C).contiguous()
    x[:, :p] = -1.0 - torch.arange(p).view(1, p, 1)
    x.requires_grad_(True)
    net = nn.Sequential(site)
    for seed in range(10):
        with featmix.mixing(net, torch.arange(B), num_classes=B, sampler=featmix.MixSampler(generator=gen(seed))) as b:
            out = net(x)
        assert torch.equal(out[:, :p], x[:, :p])
        grid = out[:, p:].detach().view(B, gh, gw, C)
        for i in range(B):
            box = find_rectangle((grid[i] != i).any(-1))
            assert box in {b.record.box, (0, 0, 0, 0)}
        assert b.record.grid == (gh, gw)
        out.sum().backward()
    assert torch.all(x.grad[:, :p] == 10)


def test_token_grid_inferred_as_square_or_clear_error():
    site = featmix.FeatureCutMix(num_prefix_tokens=1)
    net = nn.Sequential(site)
    with featmix.mixing(net, torch.arange(2), num_classes=2, sampler=featmix.MixSampler(generator=gen(0))) as b:
        net(torch.randn(2, 1 + 16, 3))
    assert b.record.grid == (4, 4)
    with pytest.raises(ValueError, match="grid"):
        with featmix.mixing(net, torch.arange(2), num_classes=2, sampler=featmix.MixSampler(generator=gen(0))):
            net(torch.randn(2, 1 + 15, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_mix_preserves_dtype_and_autocast_step(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), featmix.FeatureCutMix(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with featmix.mixing(net, y, num_classes=3, sampler=featmix.MixSampler(generator=gen(1))) as b:
            logits = net(x)
        loss = F.cross_entropy(logits, b.targets)
    loss.backward()
    assert b.targets.dtype == torch.float32 and torch.isfinite(loss)
    site = featmix.FeatureCutMix()
    with featmix.mixing([site], torch.arange(4), num_classes=4, sampler=featmix.MixSampler(generator=gen(2))):
        out = site(torch.randn(4, 2, 6, 6, dtype=dtype))
    assert out.dtype == dtype
