"""featmix.integrations.timm: the uint8 collate on timm's real prefetcher loader, the CutMixAt factory and the
training task, run in miniature on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.task import ClassificationTask

import featmix
from featmix.integrations.timm import CutMixAtTask, FastCollateCutMix, cutmix_at_from_timm_args


def _samples(n: int = 4, size: int = 8, numpy: bool = True):
    """Sample i: a uint8 image filled with 10 * i, label i % 3."""
    out = []
    for i in range(n):
        image = np.full((3, size, size), 10 * i, np.uint8)
        out.append((image if numpy else torch.from_numpy(image), i % 3))
    return out


def _expected_targets(images: torch.Tensor, labels, num_classes: int, smoothing: float) -> torch.Tensor:
    """Targets read off the pixels: each image's share of each source image, smoothed one-hot labels mixed."""
    off, on = smoothing / num_classes, 1 - smoothing + smoothing / num_classes
    rows = []
    for i in range(images.shape[0]):
        row = torch.zeros(num_classes)
        for value, count in zip(*images[i, 0].unique(return_counts=True)):
            share = float(count) / images[i, 0].numel()
            onehot = torch.full((num_classes,), off)
            onehot[labels[int(value) // 10]] = on
            row += share * onehot
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("numpy", [True, False])
def test_collate_pastes_uint8_boxes_and_targets_follow_the_pixels(numpy):
    collate = FastCollateCutMix(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=3,
                                generator=torch.Generator().manual_seed(1))
    samples = _samples(numpy=numpy)
    mixed_batches = 0
    for _ in range(5):
        images, targets = collate(samples)
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
        assert targets.dtype == torch.float32 and targets.shape == (4, 3)
        labels = [label for _, label in samples]
        assert torch.allclose(targets, _expected_targets(images, labels, 3, 0.1), atol=1e-6)
        mixed_batches += int(any(images[i].unique().numel() > 1 for i in range(4)))
    assert mixed_batches > 0
    assert samples[0][0].max() == 0 and int(samples[1][0].max()) == 10  # the samples themselves are untouched


def test_collate_mixup_blends_and_rounds_like_timm():
    collate = FastCollateCutMix(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=3, label_smoothing=0.0,
                                generator=torch.Generator().manual_seed(0))
    images, targets = collate(_samples())
    record = collate.transform.last_mix
    assert images.dtype == torch.uint8 and record is not None
    lam = float(record.lam)
    assert all(images[i].unique().numel() == 1 for i in range(4))  # a blend, not a box
    for i in range(4):  # each image is round(lam * its own + (1 - lam) * a partner's), as timm rounds
        value = int(images[i, 0, 0, 0])
        assert any(value == round(lam * 10 * i + (1 - lam) * 10 * j) for j in range(4)), (i, value, lam)


def test_collate_modes_and_errors():
    with pytest.raises(ValueError, match="mode must be one of.*'half'"):
        FastCollateCutMix(cutmix_alpha=1.0, mode="half")
    with pytest.raises(ValueError, match="must be a uint8"):
        FastCollateCutMix(cutmix_alpha=1.0, num_classes=3)([(np.zeros((3, 4, 4), np.float32), 0)] * 2)
    with pytest.raises(ValueError, match="share a shape"):
        FastCollateCutMix(cutmix_alpha=1.0, num_classes=3)([(np.zeros((3, 4, 4), np.uint8), 0),
                                                            (np.zeros((3, 4, 5), np.uint8), 1)])
    images, targets = FastCollateCutMix(cutmix_alpha=1.0, num_classes=3, mode="elem")(_samples())
    assert images.dtype == torch.uint8 and torch.allclose(targets.sum(1), torch.ones(4))


class _PilDataset(torch.utils.data.Dataset):
    """8 PIL images (image i filled with 10 * i, label i % 3) with the ``transform`` timm's create_loader sets."""

    def __init__(self) -> None:
        self.transform = None

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        image = Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8))
        return (self.transform(image) if self.transform is not None else image), i % 3


def test_on_timms_prefetcher_loader_and_mixup_off_switch():
    collate = FastCollateCutMix(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=3,
                                generator=torch.Generator().manual_seed(0))
    loader = timm.data.create_loader(_PilDataset(), input_size=(3, 16, 16), batch_size=4, is_training=False,
                                     use_prefetcher=True, device=torch.device("cpu"), collate_fn=collate,
                                     num_workers=0, crop_pct=1.0, mean=(0, 0, 0), std=(1 / 255,) * 3)
    assert loader.mixup_enabled is True
    batches = list(loader)
    assert len(batches) == 2 and all(t.shape == (4, 3) and t.dtype == torch.float32 for _, t in batches)
    assert any(images[i, 0].unique().numel() > 1 for images, _ in batches for i in range(4))
    loader.mixup_enabled = False  # what train.py does at --mixup-off-epoch
    assert collate.mixup_enabled is False
    for images, targets in loader:
        assert all(images[i, 0].unique().numel() == 1 for i in range(4))
        assert torch.allclose(targets.max(1).values, torch.full((4,), 0.9 + 0.1 / 3))


def test_cutmix_at_from_timm_args_maps_timms_arguments():
    model = timm.create_model("resnet18", num_classes=3)
    only_cut = cutmix_at_from_timm_args(model, layer=2, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert isinstance(only_cut, featmix.CutMixAt) and only_cut.sampler.kind == "cutmix"
    assert only_cut.label_smoothing == 0.1 and only_cut.num_classes == 3  # timm's smoothing; classes from the model
    only_cut.remove()
    both = cutmix_at_from_timm_args(model, layer=3, cutmix_alpha=1.0, switch_prob=0.3, mode="elem")
    assert (both.sampler.kind, both.sampler.switch_prob, both.sampler.mode) == ("cutmix_or_mixup", 0.3, "elem")
    both.remove()
    manifold = cutmix_at_from_timm_args(model, layer=2)  # timm's defaults: mixup_alpha=1, cutmix_alpha=0
    assert manifold.sampler.kind == "mixup"
    manifold.remove()
    minmax = cutmix_at_from_timm_args(model, layer=2, mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8))
    assert minmax.sampler.kind == "cutmix" and minmax.sampler.cutmix_minmax == (0.2, 0.8)
    minmax.remove()
    with pytest.raises(ValueError, match="enable nothing"):
        cutmix_at_from_timm_args(model, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="'half'"):
        cutmix_at_from_timm_args(model, cutmix_alpha=1.0, mode="half")


def test_task_trains_a_cutmix_at_model_on_mixed_targets(one_thread):
    torch.manual_seed(0)
    model = cutmix_at_from_timm_args(timm.create_model("resnet18", num_classes=3), layer=2, mixup_alpha=0.0,
                                     cutmix_alpha=1.0, generator=torch.Generator().manual_seed(0))
    task = CutMixAtTask(model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    assert task.mixes
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    task.train()
    for _ in range(3):
        result = task(images, labels)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        assert model.last_mix is not None and result["output"].shape == (4, 3)
        assert torch.isfinite(result["loss"])
    task.eval()
    with torch.no_grad():
        result = task(images, labels)
        assert torch.allclose(result["loss"], torch.nn.functional.cross_entropy(model(images), labels))


def test_task_loss_is_soft_target_ce_of_the_returned_targets(one_thread):
    torch.manual_seed(0)
    model = cutmix_at_from_timm_args(timm.create_model("resnet18", num_classes=3), layer=2, mixup_alpha=0.0,
                                     cutmix_alpha=1.0, generator=torch.Generator().manual_seed(0))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    result = CutMixAtTask(model, verbose=False)(images, labels)
    model.sampler.generator.manual_seed(0)
    torch.manual_seed(1)
    output, targets = model(images, labels)
    expected = -(targets * torch.log_softmax(output, -1)).sum(-1).mean()
    assert torch.allclose(result["loss"], expected, atol=1e-6)
    assert not torch.allclose(targets.max(1).values, torch.full((4,), 0.9 + 0.1 / 3))  # really mixed


def test_task_with_a_plain_model_is_timms_classification_task():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    ours = CutMixAtTask(model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    theirs = ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    model.eval()
    assert not ours.mixes
    assert torch.equal(ours(images, labels)["loss"], theirs(images, labels)["loss"])
