"""Input-level CutMix, checked black-box: constant images make every output pixel name its source."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import featmix
from tests.conftest import constant_images, find_rectangle, gen


def check_mixed_batch(out: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor):
    """Assert the CutMix invariants on constant images; return the shared box and the partners."""
    B, _, H, W = out.shape
    boxes, partners = set(), []
    for i in range(B):
        diff = (out[i] != i).any(0)
        box = find_rectangle(diff)
        assert box is not None, f"sample {i}: pasted region is not one rectangle"
        y1, y2, x1, x2 = box
        inside = out[i, :, y1:y2, x1:x2]
        j = int(inside.flatten()[0]) if inside.numel() else i
        assert torch.all(inside == j), "the box must come from one partner"
        partners.append(j)
        if box != (0, 0, 0, 0):
            boxes.add(box)
    assert len(boxes) <= 1, f"one box per batch, got {boxes}"
    assert sorted(partners) == list(range(B)) or len(boxes) == 0, "partners form a permutation"
    if boxes:
        (y1, y2, x1, x2), = boxes
        lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)
        for i, j in enumerate(partners):
            expect = torch.zeros(targets.shape[1])
            expect[labels[i]] += lam if j != i else 1.0
            if j != i:
                expect[labels[j]] += 1 - lam
            torch.testing.assert_close(targets[i], expect, atol=1e-6, rtol=0)
        return (y1, y2, x1, x2), partners
    return None, partners


@pytest.mark.parametrize("inplace", [False, True])
def test_cutmix_semantics_black_box(inplace):
    B, H, W = 8, 24, 20
    cutmix = featmix.CutMix(num_classes=B, generator=gen(0), inplace=inplace)
    labels = torch.arange(B)
    seen_boxes = set()
    for _ in range(30):
        images = constant_images(B, H, W)
        original = images.clone()
        out, targets = cutmix(images, labels)
        assert targets.shape == (B, B) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(B))
        box, _ = check_mixed_batch(out, targets, labels)
        rec = cutmix.last_mix
        assert rec is not None and rec.grid == (H, W)
        if box is not None:
            assert rec.box == box
            seen_boxes.add(box)
        if inplace:
            assert out.data_ptr() == images.data_ptr()
        else:
            assert torch.equal(images, original), "out-of-place CutMix must not touch the caller's tensor"
    assert len(seen_boxes) > 20  # boxes vary between batches


def test_prob_zero_leaves_batch_and_gives_one_hot():
    cutmix = featmix.CutMix(num_classes=5, prob=0.0, generator=gen(0))
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 4, 2])
    out, t = cutmix(x, y)
    assert torch.equal(out, x) and torch.equal(t, F.one_hot(y, 5).float())
    assert cutmix.last_mix is None


def test_batch_of_one_trains_unmixed():
    cutmix = featmix.CutMix(num_classes=3, generator=gen(0))
    x = torch.randn(1, 3, 8, 8)
    out, t = cutmix(x, torch.tensor([2]))
    assert torch.equal(out, x) and torch.equal(t, torch.tensor([[0.0, 0.0, 1.0]]))


def test_soft_and_multi_hot_labels_mix_linearly():
    B, K = 6, 4
    cutmix = featmix.CutMix(num_classes=K, generator=gen(1))
    soft = torch.softmax(torch.randn(B, K), 1)
    for _ in range(5):
        out, t = cutmix(constant_images(B, 16, 16), soft)
        rec = cutmix.last_mix
        partners = [int(out[i, :, rec.box[0], rec.box[2]][0]) if rec.lam < 1 else i for i in range(B)]
        expect = rec.weight * soft + (1 - rec.weight) * soft[partners]
        torch.testing.assert_close(t, expect)


def test_label_smoothing_applied_before_mixing():
    K, eps = 10, 0.1
    cutmix = featmix.CutMix(num_classes=K, label_smoothing=eps, prob=0.0)
    _, t = cutmix(torch.randn(2, 3, 8, 8), torch.tensor([3, 7]))
    assert t[0, 3] == pytest.approx(1 - eps + eps / K) and t[0, 0] == pytest.approx(eps / K)
    cutmix = featmix.CutMix(num_classes=K, label_smoothing=eps, generator=gen(2))
    _, t = cutmix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert t.min() >= eps / K - 1e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_channels_last_preserved(dtype):
    cutmix = featmix.CutMix(num_classes=4, generator=gen(3))
    x = torch.randn(4, 3, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    out, t = cutmix(x, torch.arange(4))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    rec = cutmix.last_mix
    assert rec is not None
    y1, y2, x1, x2 = rec.box
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[y1:y2, x1:x2] = False
    assert torch.equal(out[..., outside], x[..., outside])
    assert not torch.equal(out[..., ~outside], x[..., ~outside]) or rec.lam == 1.0


def test_seeded_generator_is_deterministic():
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    a = featmix.CutMix(10, generator=gen(5))
    b = featmix.CutMix(10, generator=gen(5))
    c = featmix.CutMix(10, generator=gen(6))
    outs = [(a(x, y), b(x, y), c(x, y)) for _ in range(3)]
    assert all(torch.equal(oa[0], ob[0]) and torch.equal(oa[1], ob[1]) for oa, ob, _ in outs)
    assert not all(torch.equal(oa[0], oc[0]) for oa, _, oc in outs)


def test_scheduled_step_is_in_state_dict():
    c = featmix.CutMix(4, variant="scheduled", total_steps=10, generator=gen(0))
    for _ in range(7):
        c(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    sd = c.state_dict()
    c2 = featmix.CutMix(4, variant="scheduled", total_steps=10, generator=gen(5))
    assert c2.sampler.step == 0
    c2.load_state_dict(sd)
    assert c2.sampler.step == 7 and c2.sampler.current_prob() == pytest.approx(0.7)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    assert torch.equal(c(x.clone(), y)[0], c2(x.clone(), y)[0])  # the generator's stream continues too


def test_variants_at_input_level():
    B = 6
    labels = torch.arange(B)
    for variant in featmix.VARIANTS:
        kw = {"total_steps": 1} if variant == "scheduled" else {}
        c = featmix.CutMix(B, variant=variant, generator=gen(8), **kw)
        for _ in range(10):
            out, t = c(constant_images(B, 32, 32), labels)
            rec = c.last_mix
            if rec is None:
                continue
            own = t[labels, labels]
            moved = [i for i in range(B) if not torch.all(out[i] == i)]
            if variant == "one_hot":
                assert set(t.unique().tolist()) <= {0.0, 1.0}
                assert rec.weight == (1.0 if rec.lam >= 0.5 else 0.0)
            elif variant == "complete_label":
                assert all(own[i] == 0.5 for i in moved)
            elif variant == "fixed_size":
                y1, y2, x1, x2 = rec.box
                assert (y2 - y1, x2 - x1) == (16, 16) and rec.lam == 0.75
                assert all(own[i] == 0.75 for i in moved)
            else:
                assert all(abs(own[i] - rec.lam) < 1e-6 for i in moved)
