"""featmix's transforms as drop-ins: torchvision v2 CutMix's documented call forms (ported as cases written
for featmix from torchvision's documentation), and timm's Mixup in its training loop."""
from __future__ import annotations

import pytest
import timm.data
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors

import featmix
from tests.conftest import constant_images, find_rectangle, gen

B, K = 4, 5


def images_labels():
    return constant_images(B, 8, 8), torch.tensor([0, 1, 2, 4])


def check_mixed(images_in, images_out, targets):
    """The targets are soft (B, K) rows summing to 1 and at least one image changed."""
    assert targets.shape == (B, K) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    assert images_out.shape == images_in.shape


# -- call forms ----------------------------------------------------------------------------------------

def test_two_arguments_tuple_and_list():
    x, y = images_labels()
    out = featmix.CutMix(num_classes=K, generator=gen(0))(x, y)
    assert isinstance(out, tuple) and len(out) == 2
    check_mixed(x, *out)
    out = featmix.CutMix(num_classes=K, generator=gen(0))((x, y))
    assert isinstance(out, tuple)
    check_mixed(x, *out)
    out = featmix.CutMix(num_classes=K, generator=gen(0))([x, y])
    assert isinstance(out, list) and len(out) == 2  # the DataLoader's batch comes back as it went in
    check_mixed(x, *out)


class Samples(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((3, 8, 8), float(i)), i % K


@pytest.mark.parametrize("form", ["star", "packed"])
def test_in_a_collate_fn(form):
    cutmix = featmix.CutMix(num_classes=K, generator=gen(1))
    if form == "star":
        collate = lambda b: cutmix(*default_collate(b))  # noqa: E731
    else:
        collate = lambda b: cutmix(default_collate(b))  # noqa: E731
    for images, targets in DataLoader(Samples(), batch_size=4, collate_fn=collate):
        assert images.shape == (4, 3, 8, 8) and targets.shape == (4, K)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_dict_samples_and_labels_getter():
    x, y = images_labels()
    out = featmix.CutMix(num_classes=K, generator=gen(2))({"image": x, "label": y, "id": "batch-7"})
    assert set(out) == {"image", "label", "id"} and out["id"] == "batch-7"
    check_mixed(x, out["image"], out["label"])
    out = featmix.CutMix(num_classes=K, generator=gen(2))({"img": x, "Labels": y, "label_names": ["a"]})
    assert out["Labels"].shape == (B, K) and out["label_names"] == ["a"], "'labels' (any case) wins over 'label*'"
    getter = featmix.CutMix(num_classes=K, generator=gen(2), labels_getter=lambda s: s["target"])
    out = getter({"pixels": x, "target": y})
    check_mixed(x, out["pixels"], out["target"])
    with pytest.raises(ValueError, match="no label-like key"):
        featmix.CutMix(num_classes=K)({"image": x, "cls": y})
    with pytest.raises(ValueError, match="labels_getter must be 'default', a callable or None"):
        featmix.CutMix(num_classes=K, labels_getter="first")


def test_extra_items_pass_through_unchanged():
    x, y = images_labels()
    extra = torch.arange(B) * 10
    out_x, out_y, out_extra, name = featmix.CutMix(num_classes=K, generator=gen(3))(x, y, extra, "meta")
    assert out_extra is extra and name == "meta"
    check_mixed(x, out_x, out_y)


def test_tv_tensors_image_and_video_keep_their_type():
    x, y = images_labels()
    out, targets = featmix.CutMix(num_classes=K, generator=gen(4))(tv_tensors.Image(x), y)
    assert type(out) is tv_tensors.Image
    check_mixed(x, out.as_subclass(torch.Tensor), targets)
    video = tv_tensors.Video(torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1, 1).expand(B, 3, 2, 8, 8).clone())
    cutmix = featmix.CutMix(num_classes=K, generator=gen(5))
    for _ in range(5):
        out, targets = cutmix(video, y)
        assert type(out) is tv_tensors.Video and out.shape == video.shape
        for i in range(B):
            boxes = {find_rectangle((out[i, t] != i).any(0)) for t in range(3)}
            assert len(boxes) == 1, "all frames of a video share one box"


def test_integer_images_are_pasted_as_they_are():
    x = (constant_images(B, 8, 8) * 50).to(torch.uint8)
    out, targets = featmix.CutMix(num_classes=K, generator=gen(6))(x, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {0, 50, 100, 150}


def test_num_classes_none_with_probability_labels():
    x, _ = images_labels()
    soft = torch.softmax(torch.randn(B, K, generator=gen(7)), 1)
    out, targets = featmix.CutMix(generator=gen(8))(x, soft)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))


@pytest.mark.parametrize("bad,pattern", [
    (lambda x, y: (x, tv_tensors.BoundingBoxes(torch.zeros(B, 4), format="XYXY", canvas_size=(8, 8)), y),
     "does not support PIL images, bounding boxes"),
    (lambda x, y: (x, y.view(2, 2, 1)), r"labels must have shape \(B,\)"),
    (lambda x, y: (x[:3], y), "one entry per image: batch size 3, got 4"),
    (lambda x, y: (x[0], y), r"images must have 4 dimensions"),
    (lambda x, y: (x, y, tv_tensors.Mask(torch.zeros(B, 8, 8))), "masks"),
])
def test_what_torchvision_rejects_is_a_value_error(bad, pattern):
    x, y = images_labels()
    with pytest.raises(ValueError, match=pattern):
        featmix.CutMix(num_classes=K)(*bad(x, y))
    with pytest.raises(ValueError, match="labels must be a torch.Tensor"):  # also a TypeError, as before
        featmix.CutMix(num_classes=K)(x, [0, 1, 2, 3])


# -- timm's training loop ------------------------------------------------------------------------------

def test_mixup_enabled_false_passes_through_with_timms_targets():
    x, y = images_labels()
    g = gen(9)
    cutmix = featmix.CutMix(num_classes=K, label_smoothing=0.1, generator=g)
    state = g.get_state()
    cutmix.mixup_enabled = False  # what timm's train.py does at --mixup-off-epoch
    out, targets = cutmix(x, y)
    assert out is x and torch.equal(g.get_state(), state), "nothing drawn, nothing pasted"
    timm_off = timm.data.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.1, num_classes=K)
    timm_off.mixup_enabled = False
    _, timm_targets = timm_off(x.clone(), y)
    torch.testing.assert_close(targets, timm_targets)
    cutmix.mixup_enabled = True
    out, _ = cutmix(x, y)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("kwargs,cls,kind", [
    (dict(mixup_alpha=0.8, cutmix_alpha=1.0), featmix.CutMixOrMixup, "cutmix_or_mixup"),
    (dict(mixup_alpha=0.0, cutmix_alpha=1.0), featmix.CutMix, "cutmix"),
    (dict(mixup_alpha=0.2, cutmix_alpha=0.0), featmix.Mixup, "mixup"),
    (dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8)), featmix.CutMix, "cutmix"),
])
def test_from_timm_args_maps_timms_names(kwargs, cls, kind):
    t = featmix.from_timm_args(num_classes=K, **kwargs)
    assert type(t) is cls and t.sampler.kind == kind and t.label_smoothing == 0.1, "timm's defaults, smoothing 0.1"
    ref = timm.data.Mixup(num_classes=K, **kwargs)
    assert t.sampler.prob == ref.mix_prob and t.sampler.mode == ref.mode
    if kind == "cutmix_or_mixup":
        assert (t.sampler.alpha, t.sampler.mixup_alpha, t.sampler.switch_prob) == (1.0, 0.8, ref.switch_prob)
    with pytest.raises(ValueError, match="needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax"):
        featmix.from_timm_args(mixup_alpha=0.0, cutmix_alpha=0.0)
    out, targets = t(*images_labels())
    assert F.cross_entropy(torch.randn(B, K), targets).isfinite()
