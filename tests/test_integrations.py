"""featmix.integrations: import cost, the shared soft-target loss, the torchvision reference collate."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import featmix
from featmix.integrations import SoftTargetCrossEntropy, soft_target_cross_entropy
from featmix.integrations.torchvision import MixCollate, mix_from_reference_args


def test_importing_featmix_and_integrations_loads_no_framework():
    code = ("import sys, featmix, featmix.integrations; "
            "print(sorted(m for m in ('timm', 'lightning', 'transformers', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_soft_target_cross_entropy_matches_torch_on_probabilities():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5), torch.softmax(torch.randn(6, 5), -1)
    expected = torch.nn.functional.cross_entropy(logits, targets)
    assert torch.allclose(soft_target_cross_entropy(logits, targets), expected, atol=1e-6)
    per_sample = soft_target_cross_entropy(logits, targets, reduction="none")
    assert per_sample.shape == (6,) and torch.allclose(per_sample.sum(), SoftTargetCrossEntropy("sum")(logits, targets))
    assert soft_target_cross_entropy(logits.half(), targets).dtype == torch.float32


def test_soft_target_cross_entropy_errors_name_what_came():
    with pytest.raises(TypeError, match="class indices"):
        soft_target_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"logits \(2, 3\) and targets \(2, 4\)"):
        soft_target_cross_entropy(torch.randn(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        SoftTargetCrossEntropy("avg")


class ConstantImages(Dataset):
    """Image i is filled with i (label i % 3); it holds no tensor, so spawn workers receive it without shared
    memory."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.full((3, 8, 8), float(i)), i % 3


def _spawn_batches(collate, seed=None):
    # the transform's generator is reseeded in each worker from its seed and the worker's seed, which comes
    # from the DataLoader's generator: seeding both makes the stream reproducible
    loader = DataLoader(ConstantImages(), batch_size=4, num_workers=1, multiprocessing_context="spawn",
                        collate_fn=collate, generator=None if seed is None else torch.Generator().manual_seed(seed))
    return list(loader)


@pytest.fixture
def file_system_sharing():
    """This sandbox cannot pass a tensor to a spawn child through a shared-memory fd ("unable to resize file");
    a seeded generator pickles its state as a tensor, so the seeded test shares through files instead."""
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(before)


@pytest.mark.slow
def test_seeded_mix_collate_draws_the_same_in_spawn_workers(file_system_sharing):
    runs = [_spawn_batches(MixCollate(featmix.CutMix(num_classes=3, generator=torch.Generator().manual_seed(3))),
                           seed=5) for _ in range(2)]
    assert any(not torch.equal(images[:, 0, 0, 0], images[:, 0, -1, -1]) or targets.max() < 1
               for images, targets in runs[0])  # something was mixed
    for (images_a, targets_a), (images_b, targets_b) in zip(*runs):
        assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b)


def test_mix_collate_in_a_spawn_worker_mixes_every_batch():
    batches = _spawn_batches(MixCollate(featmix.CutMix(num_classes=3)))
    assert len(batches) == 2
    for b, (images, targets) in enumerate(batches):
        assert targets.shape == (4, 3) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(4))
        for i in range(4):
            own = 4 * b + i
            values = images[i, 0].unique().tolist()
            assert set(values) <= set(range(4 * b, 4 * b + 4))  # pixels come from this batch only
            partner_share = float((images[i, 0] != own).float().mean())
            expected = torch.zeros(3)
            expected[own % 3] += 1 - partner_share
            for v in values:
                if v != own:  # one partner, pasted on the corrected share of the area
                    expected[int(v) % 3] += partner_share
            assert len(values) <= 2 and torch.allclose(targets[i], expected, atol=1e-6)
    assert any(len(images[i, 0].unique()) == 2 for images, _ in batches for i in range(4))


def test_mix_collate_is_picklable_and_checks_its_arguments():
    import pickle

    collate = pickle.loads(pickle.dumps(MixCollate(featmix.CutMix(num_classes=3))))
    images, targets = collate([(torch.zeros(3, 4, 4), 1), (torch.ones(3, 4, 4), 2)])
    assert images.shape == (2, 3, 4, 4) and targets.shape == (2, 3)
    with pytest.raises(TypeError, match="transform must be callable"):
        MixCollate("cutmix")
    with pytest.raises(TypeError, match="not \\(images, labels\\)"):
        MixCollate(lambda x, y: (x, y))([(torch.zeros(3, 2, 2), 0, 5)])


def test_mix_from_reference_args_follows_the_references():
    assert mix_from_reference_args(10) is None
    assert type(mix_from_reference_args(10, cutmix_alpha=1.0)).__name__ == "CutMix"
    assert type(mix_from_reference_args(10, mixup_alpha=0.2)).__name__ == "Mixup"
    both = mix_from_reference_args(10, mixup_alpha=0.2, cutmix_alpha=1.0)
    assert both.sampler.kind == "cutmix_or_mixup" and both.sampler.switch_prob == 0.5
    with pytest.raises(ValueError, match="cutmix_alpha must be >= 0"):
        mix_from_reference_args(10, cutmix_alpha=-1.0)
