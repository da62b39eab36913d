"""Mix kinds (Mixup, Manifold Mixup, Cutout, the CutMix-or-Mixup switch) and per-sample draws, black box:
constant images name the image every output pixel came from."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import featmix
from tests.conftest import TinyNet, constant_images, find_rectangle, gen

B, H, W = 6, 12, 16


def batch():
    return constant_images(B, H, W), torch.arange(B)


# -- Mixup ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True])
def test_mixup_is_lam_a_plus_one_minus_lam_b_everywhere(inplace):
    mixup = featmix.Mixup(B, alpha=0.4, inplace=inplace, generator=gen(0))
    for _ in range(5):
        x, y = batch()
        out, targets = mixup(x, y)
        assert (out is x) == inplace
        rec = mixup.last_mix
        assert rec.kind == "mixup" and rec.box is None and rec.lam == rec.weight and rec.lam < 1
        partners = []
        for i in range(B):
            others = targets[i].clone()
            others[i] -= rec.lam
            j = int(others.argmax())  # the partner's label carries 1 - lam (itself when perm[i] = i)
            partners.append(j)
            want = torch.zeros(B)
            want[i] += rec.lam
            want[j] += 1 - rec.lam
            torch.testing.assert_close(targets[i], want)
            assert torch.allclose(out[i], torch.full_like(out[i], rec.lam * i + (1 - rec.lam) * j), atol=1e-5)
        assert sorted(partners) == list(range(B)), "the partners form a permutation"


def test_mixup_lam_follows_beta_alpha():
    from scipy.stats import beta as beta_dist
    s = featmix.MixSampler(alpha=0.2, kind="mixup", generator=gen(1))
    lams = torch.tensor([s.draw(4).lam for _ in range(3000)])
    inner = float(((lams > 0.1) & (lams < 0.9)).float().mean())
    p = beta_dist(0.2, 0.2).cdf(0.9) - beta_dist(0.2, 0.2).cdf(0.1)
    assert abs(inner - p) < 4 * math.sqrt(p * (1 - p) / 3000)


def test_manifold_mixup_mixes_at_one_drawn_layer_per_batch():
    torch.manual_seed(0)
    net = TinyNet()
    w = featmix.CutMixAt(net, layer=[0, 1, 2], kind="mixup", generator=gen(2)).train()
    seen = set()
    for _ in range(20):
        logits, targets = w(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        F.cross_entropy(logits, targets).backward()
        rec = w.last_mix
        seen.add(rec.layer)
        assert rec.kind == "mixup" and rec.grid == (16, 16) and rec.weight == rec.lam
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert seen == {0, 1, 2}
    assert all(p.grad is not None for p in net.parameters())


# -- Cutout --------------------------------------------------------------------------------------------

def test_cutout_zeroes_one_box_of_the_set_size_and_keeps_the_labels():
    cutout = featmix.Cutout(size=0.5, num_classes=B, generator=gen(3))
    sizes = set()
    for _ in range(30):
        x, y = batch()
        x += 1  # no image is zero before the cut
        out, targets = cutout(x, y)
        box = cutout.last_mix.box
        for i in range(B):
            assert find_rectangle((out[i] == 0).any(0)) == box  # exactly one box, the same in every sample
            assert torch.equal(out[i][out[i] != 0], x[i][out[i] != 0])
        assert torch.equal(targets, F.one_hot(y, B).float())
        y1, y2, x1, x2 = box
        assert y2 - y1 <= H // 2 and x2 - x1 <= W // 2
        sizes.add((y2 - y1, x2 - x1))
    assert (H // 2, W // 2) in sizes, "an unclipped box has half of each side"
    plain = featmix.Cutout(size=0.5, generator=gen(3))  # without num_classes: the labels as they came
    _, labels = plain(*batch())
    assert torch.equal(labels, torch.arange(B))


# -- the CutMix-or-Mixup switch ------------------------------------------------------------------------

def test_switch_chooses_cutmix_with_switch_prob_each_batch():
    t = featmix.CutMixOrMixup(B, cutmix_alpha=1.0, mixup_alpha=0.5, switch_prob=0.3, generator=gen(4))
    n = 600
    kinds = []
    for _ in range(n):
        t(*batch())
        kinds.append(t.last_mix.kind)
    share = kinds.count("cutmix") / n
    assert set(kinds) == {"cutmix", "mixup"} and abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)


# -- per-sample draws ----------------------------------------------------------------------------------

def test_elem_mode_gives_each_sample_its_own_box_and_weight():
    t = featmix.CutMix(B, mode="elem", generator=gen(5))
    distinct = set()
    for _ in range(10):
        x, y = batch()
        out, targets = t(x, y)
        rec = t.last_mix
        assert rec.box.shape == (B, 4) and rec.weight.shape == (B,)
        for i in range(B):
            diff = (out[i] != i).any(0)
            found = find_rectangle(diff)
            box = tuple(rec.box[i].tolist())
            area = (box[1] - box[0]) * (box[3] - box[2])
            assert found in {box, (0, 0, 0, 0)}
            assert float(rec.weight[i]) == pytest.approx(1 - area / (H * W))
            if found != (0, 0, 0, 0):
                j = int(out[i, 0, box[0], box[2]])
                assert targets[i, i] == pytest.approx(1 - area / (H * W))
                assert targets[i, j] == pytest.approx(area / (H * W))
            distinct.add(box)
    assert len(distinct) > B, "boxes differ between samples"


def test_pair_mode_swaps_one_box_between_partners():
    t = featmix.CutMix(B, mode="pair", generator=gen(6))
    x, y = batch()
    out, _ = t(x, y)
    rec = t.last_mix
    partner = {i: int(out[i][(out[i] != i)].flatten()[0]) for i in range(B) if (out[i] != i).any()}
    assert partner, "something was mixed"
    for i, j in partner.items():
        assert partner.get(j) == i and torch.equal(rec.box[i], rec.box[j])


def test_elem_switch_blends_some_samples_and_boxes_others():
    t = featmix.CutMixOrMixup(B, switch_prob=0.5, mode="elem", generator=gen(7))
    boxed = blended = 0
    for _ in range(20):
        x, y = batch()
        out, _ = t(x, y)
        for i in range(B):
            values = set(out[i].unique().tolist())
            if len(values) > 2 or (len(values) == 1 and values != {float(i)}):
                blended += 1
            elif len(values) == 2:
                boxed += 1
    assert boxed > 0 and blended > 0


@pytest.mark.parametrize("kind", ["cutmix", "mixup", "cutout", "cutmix_or_mixup"])
@pytest.mark.parametrize("mode", ["batch", "elem", "pair"])
def test_every_kind_and_mode_at_a_feature_layer_is_deterministic_and_differentiable(kind, mode):
    def run(seed):
        torch.manual_seed(0)
        net = TinyNet()
        w = featmix.CutMixAt(net, layer=2, kind=kind, mode=mode, generator=gen(seed)).train()
        logits, targets = w(torch.randn(4, 3, 16, 16, generator=gen(1)), torch.tensor([0, 1, 2, 3]))
        F.cross_entropy(logits, targets).backward()
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        return logits.detach(), targets, net.conv1.weight.grad.clone()

    a, b, c = run(8), run(8), run(9)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kind,mode", [("mixup", "batch"), ("cutmix", "elem"), ("cutmix_or_mixup", "elem")])
def test_checkpointed_timm_model_replays_every_kind(kind, mode):
    from tests.test_training_setups import rel_diff, timm_model, wrapped_step
    x, y = torch.randn(4, 3, 32, 32, generator=gen(1)), torch.tensor([0, 1, 2, 3])
    plain = timm_model("resnet18")
    ckpt = timm_model("resnet18")
    ckpt.set_grad_checkpointing(True)
    g_plain, _ = wrapped_step(plain, 3, x, y, kind=kind, mode=mode)
    g_ckpt, rec = wrapped_step(ckpt, 3, x, y, kind=kind, mode=mode)
    assert rec is not None and rec.kind in (kind, "cutmix_or_mixup")
    assert rel_diff(g_ckpt, g_plain) < 1e-5


@pytest.mark.parametrize("kind,mode,states", [("cutmix_or_mixup", "elem", 2), ("cutmix_or_mixup", "batch", 3),
                                              ("cutout", "batch", 2)])
def test_compiled_kinds_keep_one_graph_per_state_and_equal_eager(kind, mode, states):
    """States: unmixed, and one per kind a batch can get (per-sample switches live in tensors)."""
    from tests.test_compile_ddp import CountingBackend

    def run(compile_: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = TinyNet()
        w = featmix.CutMixAt(net, layer=2, kind=kind, mode=mode, prob=0.7, generator=gen(10)).train()
        backend = CountingBackend()
        call = torch.compile(w, backend=backend) if compile_ else w
        out = []
        for i in range(20):
            logits, targets = call(torch.randn(4, 3, 16, 16, generator=gen(i)), torch.tensor([0, 1, 2, 3]))
            F.cross_entropy(logits, targets).backward()
            out.append((logits.detach(), targets))
        return out, backend.graphs, net.conv1.weight.grad

    (compiled, graphs, g_c), (eager, _, g_e) = run(True), run(False)
    assert graphs <= states, graphs
    for (lc, tc), (le, te) in zip(compiled, eager):
        torch.testing.assert_close(tc, te, rtol=0, atol=1e-6)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)


# -- timm's box options --------------------------------------------------------------------------------

def test_cutmix_minmax_box_sides_lie_in_range_and_inside_the_image():
    t = featmix.CutMix(B, cutmix_minmax=(0.25, 0.75), generator=gen(11))
    hs, ws = set(), set()
    for _ in range(200):
        t(*batch())
        y1, y2, x1, x2 = t.last_mix.box
        assert 0 <= y1 < y2 <= H and 0 <= x1 < x2 <= W
        hs.add(y2 - y1)
        ws.add(x2 - x1)
    assert hs == set(range(int(H * 0.25), int(H * 0.75))) and ws == set(range(int(W * 0.25), int(W * 0.75)))


def test_correct_lam_false_keeps_the_drawn_lam_as_label_weight():
    t = featmix.CutMix(B, correct_lam=False, generator=gen(12))
    s = featmix.MixSampler(generator=gen(12))
    for _ in range(20):
        t(*batch())
        assert t.last_mix.weight == s.draw(B).lam


# -- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,pattern", [
    ({"kind": "mixin"}, r"kind must be one of 'cutmix', 'mixup', 'cutout', 'cutmix_or_mixup'; got 'mixin'"),
    ({"mode": "each"}, r"mode must be one of 'batch', 'elem', 'pair'"),
    ({"kind": "mixup", "variant": "fixed_size"}, r"variant='fixed_size' places a box, and kind='mixup' has none"),
    ({"kind": "cutout", "variant": "one_hot"}, r"kind='cutout' has a fixed box"),
    ({"switch_prob": 1.5}, r"switch_prob must be a number in \[0, 1\]"),
    ({"cutout_size": 0}, r"cutout_size must be a number in \(0, 1\]"),
    ({"mixup_alpha": -1}, r"mixup_alpha must be a number > 0"),
    ({"cutmix_minmax": (0.8, 0.2)}, r"cutmix_minmax must be None or \(min, max\)"),
    ({"correct_lam": 1}, r"correct_lam must be a bool"),
])
def test_bad_kind_arguments(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        featmix.MixSampler(**kwargs)
    with pytest.raises((ValueError, TypeError), match=pattern):
        featmix.CutMixAt(TinyNet(), layer=1, **kwargs)
