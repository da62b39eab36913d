"""experiments.evaluation: every measurement against a hand-computed case, the batched settings against
one-at-a-time scoring, then the command end to end on checkpoints the tests write themselves (CPU only,
a few seconds each)."""
from __future__ import annotations

import csv
import itertools
import json
import math
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import models  # noqa: F401  (registers resnet8_cifar)
from experiments.data import TensorData, make_synthetic
from experiments.evaluation import calibration as cal
from experiments.evaluation import fgsm as attack
from experiments.evaluation import inbetween as inb
from experiments.evaluation import localization as loc
from experiments.evaluation import occlusion as occ
from experiments.evaluation import ood
from experiments.evaluation.base import EvalOptions
from experiments.evaluation.command import main as evaluate_main
from experiments.evaluation.runner import evaluate_model
from experiments.evaluation.synthetic_loc import TEXTURES, load_synthetic_loc, make_localization_set

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MeanPixel(nn.Module):
    """Two classes from the mean pixel: class 1 iff mean > 0.5 (a tie at exactly 0.5 goes to class 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([torch.zeros_like(m), 100 * (m - 0.5)], 1)


def tensor_data(x_pix: torch.Tensor, y: torch.Tensor, num_classes: int = 2) -> TensorData:
    """A TensorData holding `x_pix` (exact multiples of 1/255) as its test set, identity normalisation."""
    xu8 = (x_pix * 255).round().to(torch.uint8)
    c = xu8.shape[1]
    return TensorData("handmade", xu8, y, xu8, y, num_classes, (0.0,) * c, (1.0,) * c, pad=0)


def black_white(n: int = 8, size: int = 8) -> TensorData:
    """Half the images white (label 1), half black (label 0), interleaved."""
    y = torch.arange(n) % 2
    x = y.float().view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return tensor_data(x, y)


# ---------------------------------------------------------------------------------------------- FGSM
@pytest.mark.parametrize("label", [0, 1])
def test_fgsm_linear_model_exact_sign_and_clipping(label):
    # logits = [a.z, -a.z] with z = (x - 0.5) / 0.25: d CE / d x has the sign of -a for label 0, +a for label 1
    torch.manual_seed(0)
    a = torch.randn(1, 3, 4, 4)
    a[a.abs() < 0.1] = 0.5  # no zero weights: every pixel moves
    lin = nn.Linear(48, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([a.flatten()[None], -a.flatten()[None]]))
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0]).repeat(10)[:48].view(1, 3, 4, 4)
    eps = 8 / 255
    adv = attack.fgsm(model, x, torch.tensor([label]), eps, lambda v: (v - 0.5) / 0.25)
    direction = -a.sign() if label == 0 else a.sign()
    expected = (x + eps * direction).clamp(0, 1)
    assert torch.equal(adv, expected)
    assert ((adv == 0) & (x == 0)).any() and ((adv == 1) & (x == 1)).any()  # clipping happened
    assert not x.requires_grad and adv.grad_fn is None


def test_fgsm_accuracy_through_evaluate_model():
    # images of 0.6 (label 1) / 0.4 (label 0); FGSM moves every pixel by eps toward 0.5:
    # 8/255 leaves them on their side (all correct), 30/255 pushes them across (all wrong)
    y = torch.tensor([1, 0, 1, 0])
    x = torch.where(y.bool(), 153 / 255, 102 / 255).view(4, 1, 1, 1).expand(4, 1, 6, 6).contiguous()
    data = tensor_data(x, y)
    for eps, acc in ((8.0, 100.0), (30.0, 0.0)):
        rep = evaluate_model(MeanPixel(), data, identity, EvalOptions(metrics=("fgsm",), epsilon=eps))
        assert rep["clean_acc"] == 100.0 and rep["fgsm"]["acc"] == acc


# ------------------------------------------------------------------------------------------ occlusion
def test_occlusion_masks_pixel_counts_and_placement():
    m = occ.occlusion_mask(10, 10, 4, "center")
    assert m.sum() == 100 - 16 and torch.equal(m[3:7, 3:7], torch.zeros(4, 4))
    b = occ.occlusion_mask(10, 10, 4, "boundary")
    assert b.sum() == 16 and torch.equal(b, 1 - m)
    odd = occ.occlusion_mask(7, 7, 3, "boundary")
    assert odd.sum() == 9 and torch.equal(odd[2:5, 2:5], torch.ones(3, 3))
    even_in_odd = occ.occlusion_mask(7, 7, 2, "boundary")  # no exact centre: the hole starts at (7 - 2) // 2
    assert even_in_odd.sum() == 4 and torch.equal(even_in_odd[2:4, 2:4], torch.ones(2, 2))
    rect = occ.occlusion_mask(6, 8, 4, "boundary")
    assert rect.sum() == 16 and torch.equal(rect[1:5, 2:6], torch.ones(4, 4))
    assert occ.occlusion_mask(5, 5, 0, "center").sum() == 25 and occ.occlusion_mask(5, 5, 0, "boundary").sum() == 0
    assert occ.occlusion_mask(5, 5, 5, "center").sum() == 0 and occ.occlusion_mask(5, 5, 9, "boundary").sum() == 25
    x = torch.rand(2, 3, 10, 10) + 0.1
    holed = occ.occlude(x, 4, "center")
    assert (holed == 0).sum() == 2 * 3 * 16 and torch.equal(holed * m, x * m)
    sizes = occ.occlusion_sizes(28, 8)
    assert sizes[0] == 0 and sizes[-1] == 28 and len(sizes) == 9 and sizes == sorted(sizes)
    with pytest.raises(ValueError, match="mode"):
        occ.occlusion_mask(4, 4, 2, "middle")


def test_occlusion_curve_of_mean_pixel_model():
    # white images (label 1) stay class 1 while more than half the pixels are white: center hole
    # s^2 < 32 of 64, boundary s^2 > 32; black images (label 0) are correct whatever is zeroed
    rep = evaluate_model(MeanPixel(), black_white(8, 8), identity, EvalOptions(metrics=("occlusion",)))
    o = rep["occlusion"]
    assert o["sizes"] == list(range(9))
    assert o["center"] == [100.0 if s * s < 32 else 50.0 for s in range(9)]
    assert o["boundary"] == [100.0 if s * s > 32 else 50.0 for s in range(9)]
    assert o["center_mean"] == pytest.approx(sum(o["center"]) / 9)


# --------------------------------------------------------------------------------- in-between samples
def test_cutmix_center_box_and_share():
    a, b = torch.zeros(1, 1, 10, 10), torch.ones(1, 1, 10, 10)
    mixed, share = inb.cutmix_center(a, b, 0.75)  # cut = int(10 * 0.5) = 5, centred at 2..7
    assert share == 0.75 and mixed.sum() == 25 and torch.equal(mixed[0, 0, 2:7, 2:7], torch.ones(5, 5))
    mixed, share = inb.cutmix_center(a, b, 0.5)  # cut = int(10 * 0.7071) = 7
    assert share == pytest.approx(0.51) and mixed.sum() == 49
    assert inb.cutmix_center(a, b, 0.0)[1] == 0.0 and torch.equal(inb.cutmix_center(a, b, 0.0)[0], b)
    assert torch.equal(inb.cutmix_center(a, b, 1.0)[0], a)
    assert torch.allclose(inb.mixup(a, b, 0.3)[0], torch.full_like(a, 0.7))


def test_partner_indices_pick_other_classes_deterministically():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 0, 0])
    p = inb.partner_indices(y, torch.Generator().manual_seed(3))
    assert (y[p] != y).all()
    assert torch.equal(p, inb.partner_indices(y, torch.Generator().manual_seed(3)))
    same = inb.partner_indices(torch.zeros(5, dtype=torch.long), torch.Generator().manual_seed(0))
    assert sorted(same.tolist()) == list(range(5))  # one class only: still a partner each, no error


def test_inbetween_scores_of_mean_pixel_model():
    # each pair is one white (1) and one black (0) image. Mixup: mean pixel = share of the white one,
    # so the larger part wins except at lam = 0.5, where the mean is 0.5 -> class 0: right only for the
    # pairs whose A is black (half). CutMix's centred box shares are never exactly 0.5: always right.
    lams = (0.0, 0.3, 0.5, 0.7, 1.0)
    rep = evaluate_model(MeanPixel(), black_white(8, 8), identity, EvalOptions(metrics=("inbetween",), lams=lams))
    ib = rep["inbetween"]
    assert ib["mixup"]["major"] == [100.0, 100.0, 50.0, 100.0, 100.0]
    assert ib["mixup"]["either"] == [100.0] * 5
    assert ib["cutmix"]["major"] == [100.0] * 5
    assert ib["cutmix"]["share_a"] == [0.0, 1 - 36 / 64, 1 - 25 / 64, 1 - 16 / 64, 1.0]
    pred = torch.tensor([0, 1, 2])
    major, either = inb.inbetween_correct(pred, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), 0.4)
    assert major.tolist() == [False, True, False] and either.tolist() == [True, True, False]
    major, _ = inb.inbetween_correct(pred, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), 0.5)
    assert major.tolist() == [True, False, False]  # a tie goes to A


# ------------------------------------------------------------------------------------------ localisation
def test_label_components_connectivity_and_order():
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours
    m[3, 3:5] = True
    lab8, n8 = loc.label_components(m, 8)
    lab4, n4 = loc.label_components(m, 4)
    assert n8 == 2 and lab8[0, 0] == lab8[1, 1] == 1 and lab8[3, 4] == 2
    assert n4 == 3 and lab4[0, 0] == 1 and lab4[1, 1] == 2 and lab4[3, 3] == lab4[3, 4] == 3
    assert loc.label_components(torch.zeros(3, 3), 8)[1] == 0
    # a U shape whose two arms join only at the bottom: one component
    u = torch.zeros(6, 5, dtype=torch.bool)
    u[:, 0] = u[:, 4] = u[5, :] = True
    assert loc.label_components(u, 4)[1] == 1


def _flood_fill_labels(mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Reference labelling: a breadth-first flood fill from each unlabelled pixel in raster order."""
    H, W = mask.shape
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
             and (connectivity == 8 or dy == 0 or dx == 0)]
    labels = torch.zeros(H, W, dtype=torch.long)
    n = 0
    for y0 in range(H):
        for x0 in range(W):
            if not mask[y0, x0] or labels[y0, x0]:
                continue
            n += 1
            labels[y0, x0] = n
            todo = [(y0, x0)]
            while todo:
                y, x = todo.pop()
                for dy, dx in steps:
                    v, u = y + dy, x + dx
                    if 0 <= v < H and 0 <= u < W and mask[v, u] and not labels[v, u]:
                        labels[v, u] = n
                        todo.append((v, u))
    return labels


def test_label_components_matches_a_flood_fill():
    g = torch.Generator().manual_seed(0)
    for conn in (4, 8):
        for _ in range(10):
            m = torch.rand(13, 17, generator=g) < 0.45
            lab, n = loc.label_components(m, conn)
            ref = _flood_fill_labels(m, conn)
            assert n == int(ref.max()) and torch.equal(lab, ref)
    with pytest.raises(ValueError, match="connectivity"):
        loc.label_components(m, 6)


def test_label_components_without_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    with pytest.raises(ImportError, match=r"scipy.*\[dev\]"):
        loc.label_components(torch.ones(3, 3, dtype=torch.bool))


def test_box_iou_elementwise_across_chunks():
    g = torch.Generator().manual_seed(0)
    n = loc.IOU_CHUNK * 2 + 7  # several calls of the pairwise kernel
    xy = torch.randint(0, 20, (2, n, 2), generator=g)
    wh = torch.randint(1, 12, (2, n, 2), generator=g)
    a, b = torch.cat([xy[0], xy[0] + wh[0]], 1), torch.cat([xy[1], xy[1] + wh[1]], 1)
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
    expected = (iw * ih).double() / (area(a) + area(b) - iw * ih).double()
    assert torch.allclose(loc.box_iou(a, b), expected, rtol=0, atol=1e-12)
    assert loc.box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).tolist() == [0.0]  # both empty: 0, not nan
    with pytest.raises(ValueError, match="one length"):
        loc.box_iou(a[:3], b[:2])


def test_cam_box_picks_largest_region_above_threshold():
    cam = torch.zeros(20, 30)
    cam[2:6, 3:10] = 1.0       # the maximum, but only 4 x 7 = 28 pixels
    cam[10:18, 15:28] = 0.9    # 8 x 13 = 104 pixels: the largest region
    cam[6:10, 5:20] = 0.1      # below 0.15 x max: must not join the two
    boxes = loc.cam_boxes(torch.stack([cam, cam + 5.0, cam * 0.5]), threshold=0.15)
    assert boxes.tolist() == [[15, 10, 28, 18]] * 3  # min-max normalised: offset and scale do not matter
    low = loc.cam_boxes(cam[None], threshold=0.05)  # now the faint bridge counts: one region around everything
    assert low.tolist() == [[3, 2, 28, 18]]
    assert loc.cam_boxes(torch.zeros(1, 4, 6)).tolist() == [[0, 0, 6, 4]]  # flat map: whole image


def test_box_iou_hand_cases():
    a = torch.tensor([[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 1], [0, 0, 1, 4]])
    b = torch.tensor([[1, 1, 3, 3], [1, 1, 3, 3], [2, 0, 4, 2], [0, 0, 2, 2], [1, 1, 1, 3], [3, 3, 4, 4], [3, 0, 4, 4]])
    iou = loc.box_iou(a, b)
    assert iou.tolist() == pytest.approx([1 / 7, 4 / 16, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_cam_decomposes_logits_and_unsupported_heads_are_reported():
    torch.manual_seed(0)
    net = timm.create_model("resnet8_cifar", num_classes=3, in_chans=1, width=4).eval()
    x = torch.randn(2, 1, 16, 16)
    assert loc.cam_supported(net, x) is None
    k = torch.tensor([2, 0])
    logits, (cam,) = loc.class_activation_maps(net, x, [k])
    assert cam.shape == (2, 16, 16)
    feat = net.forward_features(x)  # at feature resolution the CAM's mean + bias is the logit
    fc = net.get_classifier()
    raw = torch.einsum("bc,bchw->bhw", fc.weight[k], feat)
    assert torch.allclose(raw.mean((1, 2)) + fc.bias[k], logits[torch.arange(2), k], atol=1e-5)
    assert "forward_features" in loc.cam_supported(nn.Sequential(nn.Flatten(), nn.Linear(256, 3)), x)


def test_synthetic_loc_is_deterministic_and_boxes_hold_the_objects():
    x1, y1, b1 = make_localization_set(12, size=32, num_classes=4, seed=5)
    x2, y2, b2 = make_localization_set(12, size=32, num_classes=4, seed=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(b1, b2)
    assert not torch.equal(x1, make_localization_set(12, size=32, num_classes=4, seed=6)[0])
    assert sorted(y1.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and x1.dtype == torch.uint8
    w, h = b1[:, 2] - b1[:, 0], b1[:, 3] - b1[:, 1]
    assert (b1[:, :2] >= 0).all() and (b1[:, 2:] <= 32).all() and (w >= 11).all() and (h >= 11).all()
    for i in range(12):  # the object's dark shade (<= 20) appears only inside its box
        x0, y0, x_1, y_1 = b1[i].tolist()
        dark = (x1[i] <= 20).all(0)
        assert dark[y0:y_1, x0:x_1].any() and dark.sum() == dark[y0:y_1, x0:x_1].sum()
    d = load_synthetic_loc(n_train=40, n_test=40, num_classes=len(TEXTURES))
    d.test_subset(12, torch.Generator().manual_seed(0))
    d.subset(8, torch.Generator().manual_seed(1))
    assert d.test_boxes.shape == (12, 4) and d.num_test == 12
    assert d.train_boxes.shape == (8, 4) and d.num_train == 8
    for xs, bs in ((d.test_x, d.test_boxes), (d.train_x, d.train_boxes)):  # subsets keep images and boxes aligned
        for x, b in zip(xs, bs):
            x0, y0, x_1, y_1 = b.tolist()
            dark = (x <= 20).all(0)
            assert dark[y0:y_1, x0:x_1].any() and dark.sum() == dark[y0:y_1, x0:x_1].sum()


# ---------------------------------------------------------------------------------------------- OOD
def test_auroc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        si = torch.randint(0, 6, (37,), generator=g).double()
        so = torch.randint(0, 5, (23,), generator=g).double()
        pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(si.tolist(), so.tolist())]
        assert ood.auroc(si, so) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert ood.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0 and ood.auroc([1.0, 2.0], [3.0, 4.0]) == 0.0


def test_tnr_at_tpr95_and_detection_accuracy_hand_cases():
    # 20 in-scores 1..20: keeping >= 95% (19 of 20) puts the threshold at 2; OOD below 2: 0.5, 1, 1.5
    si = [float(v) for v in range(1, 21)]
    assert ood.tnr_at_tpr(si, [0.5, 1.0, 1.5, 2.0, 3.0]) == pytest.approx(0.6)
    assert ood.tnr_at_tpr(si, [0.0] * 4) == 1.0 and ood.tnr_at_tpr(si, [5.0] * 4) == 0.0
    # 10 in-scores: 95% of 10 is 9.5, so all 10 must stay in: threshold 1, and only 0.5 is below it
    assert ood.tnr_at_tpr([float(v) for v in range(1, 11)], [0.5, 1.5]) == 0.5
    # best threshold 0.7 (or 0.6): 0.5 * 3/4 + 0.5 * 1 = 0.875
    assert ood.detection_accuracy([0.9, 0.8, 0.7, 0.6], [0.65, 0.3, 0.2, 0.1]) == pytest.approx(0.875)
    assert ood.detection_accuracy([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert ood.detection_accuracy([0.5, 0.5], [0.5, 0.5]) == 0.5


def test_ece_hand_case():
    conf = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55], dtype=torch.float64)
    correct = torch.tensor([1, 1, 1, 0, 1, 0])
    # bin (14/15, 1]: acc 0.75, conf 0.95, weight 4/6; bin (8/15, 9/15]: acc 0.5, conf 0.55, weight 2/6
    assert cal.expected_calibration_error(conf, correct, 15) == pytest.approx(0.2 * 4 / 6 + 0.05 * 2 / 6)
    assert cal.expected_calibration_error(torch.ones(4), torch.ones(4)) == 0.0
    # bins are closed on the right: 0.6 = 9/15 belongs to (8/15, 9/15], 0.62 to the next bin
    two = torch.tensor([0.6, 0.62], dtype=torch.float64)
    assert cal.expected_calibration_error(two, torch.tensor([1, 0])) == pytest.approx((0.4 + 0.62) / 2)
    # one bin for everything: |mean acc - mean conf|
    assert cal.expected_calibration_error(conf, correct, 1) == pytest.approx(abs(4 / 6 - (0.95 * 4 + 0.55 * 2) / 6))


def test_ood_noise_sets():
    g = torch.Generator().manual_seed(0)
    u = ood.ood_noise("uniform", 50, (1, 8, 8), g)
    gs = ood.ood_noise("gaussian", 50, (1, 8, 8), g)
    assert u.shape == gs.shape == (50, 1, 8, 8) and u.min() >= 0 and u.max() <= 1
    assert gs.min() == 0 and gs.max() == 1 and ((gs > 0) & (gs < 1)).any()  # N(0.5, 1) clipped at both ends


def test_ood_and_calibration_through_evaluate_model():
    # a model that is fully confident on the test set and unsure on noise: AUROC 100, TNR 100
    class Confident(nn.Module):
        def forward(self, x):
            on_grid = ((x * 255 - (x * 255).round()).abs() < 1e-4).flatten(1).all(1)  # test images: multiples of 1/255
            return torch.stack([torch.where(on_grid, 20.0, 0.0), torch.zeros(x.shape[0])], 1)
    data = black_white(10, 6)
    rep = evaluate_model(Confident(), data, identity, EvalOptions(metrics=("ood", "calibration"), ood_size=30))
    for name in ("uniform", "gaussian"):
        r = rep["ood"]["sets"][name]
        assert r["auroc"] == 100.0 and r["tnr_at_tpr95"] == 100.0 and r["detection_acc"] == 100.0 and r["n"] == 30
    # it always says class 0 with confidence sigmoid(20): half right
    p = torch.sigmoid(torch.tensor(20.0, dtype=torch.float64)).item()
    assert rep["clean_acc"] == 50.0
    assert rep["calibration"]["ece"] == pytest.approx(100 * abs(0.5 - p), abs=1e-3)
    assert any("no natural OOD dataset" in n for n in rep["notes"])


# -------------------------------------------------------------------------------------- end to end
def _train(model: nn.Module, data: TensorData, epochs: int, lr: float = 0.1, batch: int = 64) -> None:
    steps = epochs * math.ceil(data.num_train / batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2 * lr, total_steps=steps)
    model.train()
    for ep in range(epochs):
        for x, y in data.train_batches(batch, torch.Generator().manual_seed(ep), torch.Generator().manual_seed(ep)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _save(path, model, data, name, layer, seed, dataset, kwargs):
    torch.save({"model_state": model.state_dict(), "model": "resnet8_cifar", "model_kwargs": kwargs,
                "num_classes": data.num_classes, "in_chans": data.in_chans, "input_size": data.input_size,
                "dataset": dataset, "mean": data.mean, "std": data.std,
                "setting": {"name": name, "layer": layer, "alpha": 1.0, "variant": "cutmix"}, "seed": seed,
                "config": {}, "metrics": {"final_top1_err": 0.0, "history": []}}, path)


def test_end_to_end_on_a_study_directory(tmp_path, capsys):
    data = make_synthetic()  # what load_dataset("synthetic") returns
    ckdir = tmp_path / "study" / "ckpt"
    ckdir.mkdir(parents=True)
    accs = {}
    for name, layer, seed in (("baseline", None, 0), ("baseline", None, 1), ("layer0", 0, 0), ("layer2", 2, 1)):
        torch.manual_seed(seed + (layer or 0))
        net = timm.create_model("resnet8_cifar", num_classes=4, in_chans=1, width=4)
        if name == "baseline":
            _train(net, data, 3)
        net.eval()
        with torch.no_grad():
            hits = net(data.normalize(data.test_x)).argmax(1) == data.test_y
        accs[f"{name}_seed{seed}"] = 100 * float(hits.double().mean())
        _save(ckdir / f"{name}_seed{seed}.pt", net, data, name, layer, seed, "synthetic", {"width": 4})

    out = evaluate_main(["--ckpt", str(tmp_path / "study"), "--lams", "0", "0.5", "1", "--occlusion-steps", "4"])
    assert out == tmp_path / "study" / "eval"
    for label, acc in accs.items():
        rep = json.loads((out / label / "report.json").read_text())
        assert {"clean_acc", "fgsm", "occlusion", "inbetween", "ood", "calibration", "notes", "setting",
                "seed"} <= set(rep)
        assert "localization" not in rep and any("no ground-truth boxes" in n for n in rep["notes"])
        assert rep["clean_acc"] == pytest.approx(acc)
        assert rep["occlusion"]["sizes"] == [0, 4, 8, 12, 16] and rep["inbetween"]["lams"] == [0.0, 0.5, 1.0]
        assert rep["occlusion"]["center"][0] == pytest.approx(acc)  # an empty hole changes nothing
        assert set(rep["ood"]["sets"]) == {"uniform", "gaussian"} and rep["test_size"] == 64
        assert (out / label / "report.md").read_text().startswith(f"# {label}")
        assert (out / label / "occlusion.png").stat().st_size > 0
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["baseline_seed0", "baseline_seed1", "layer0_seed0", "layer2_seed1"]
    assert {"clean_acc", "fgsm_acc", "ood_auroc", "ece", "occ_center"} <= set(rows[0])
    with open(out / "comparison_by_setting.csv") as f:
        agg = list(csv.DictReader(f))
    assert [(r["setting"], r["n"]) for r in agg] == [("baseline", "2"), ("layer0", "1"), ("layer2", "1")]
    assert float(agg[0]["clean_acc_mean"]) == pytest.approx((accs["baseline_seed0"] + accs["baseline_seed1"]) / 2)
    md = (out / "comparison.md").read_text()
    assert "## By setting" in md and "paired" in md and "layer2" in md
    assert "95 % paired t-interval of Δ" in md and "| layer0 | 1 | n too small |" in md  # one pair: no interval
    assert (out / "occlusion.png").exists() and (out / "inbetween.png").exists()
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| layer0 |" in printed

    # a subset of metrics, no plots, another output dir
    out2 = evaluate_main(["--ckpt", str(ckdir / "layer0_seed0.pt"), "--metrics", "fgsm,calibration", "--no-plots",
                          "--out", str(tmp_path / "e2"), "--epsilon", "4"])
    rep = json.loads((out2 / "layer0_seed0" / "report.json").read_text())
    assert "fgsm" in rep and "calibration" in rep and "occlusion" not in rep and "ood" not in rep
    assert rep["fgsm"]["epsilon_255"] == 4.0
    assert not list(out2.rglob("*.png"))

    # --model / --weights with a plain state_dict
    sd = tmp_path / "w.pth"
    torch.save(torch.load(ckdir / "baseline_seed0.pt", weights_only=False)["model_state"], sd)
    out3 = evaluate_main(["--model", "resnet8_cifar", "--weights", str(sd), "--dataset", "synthetic",
                          "--model-kwargs", "width=4", "--metrics", "calibration", "--no-plots", "--test-subset", "32"])
    rep = json.loads((out3 / "w" / "report.json").read_text())
    assert out3 == tmp_path / "eval" and rep["test_size"] == 32

    with pytest.raises(SystemExit):
        evaluate_main(["--ckpt", str(ckdir), "--metrics", "fgsm,nonsense"])
    with pytest.raises(SystemExit):
        evaluate_main(["--ckpt", str(ckdir), "--model", "resnet8_cifar"])


def test_localization_end_to_end_beats_chance(tmp_path):
    # a ResNet-8 trained for a few seconds on synthetic-loc: its CAM boxes must hit far more often than
    # another image's box would
    torch.manual_seed(0)
    train = load_synthetic_loc(n_train=256, n_test=8)
    net = timm.create_model("resnet8_cifar", num_classes=4, in_chans=3, width=8)
    _train(net, train, 8)
    ck = tmp_path / "loc.pt"
    _save(ck, net, train, "baseline", None, 0, "synthetic-loc", {"width": 8})
    out = evaluate_main(["--ckpt", str(ck), "--metrics", "localization,calibration", "--no-plots",
                  "--test-subset", "200"])
    rep = json.loads((out / "loc" / "report.json").read_text())
    lo = rep["localization"]
    assert rep["dataset"] == "synthetic-loc" and rep["test_size"] == 200
    assert rep["clean_acc"] > 80
    assert lo["gt_known"] > lo["chance_gt_known"] + 10
    assert lo["top1_loc"] <= rep["clean_acc"] and 0 < lo["mean_iou_gt_known"] < 1  # top-1 loc needs the class
    md = (out / "comparison.md").read_text()
    assert "GT-known loc" in md
