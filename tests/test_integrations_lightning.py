"""featmix.integrations.lightning: CutMixCallback in a real ``Trainer.fit`` on CPU, resumed from a checkpoint."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import featmix
from featmix.integrations import soft_target_cross_entropy
from featmix.integrations.lightning import CutMixCallback, rank_seed


class Images(Dataset):
    """Image i is filled with i (label i % 4), so a mixed pixel names the image it came from."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        return torch.full((3, 8, 8), float(i)), i % 4


class Tiny(pl.LightningModule):
    """A linear classifier that records every batch it trains and validates on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
        self.seen = []
        self.validated = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen.append((self.current_epoch, batch_idx, images.clone(), targets.clone()))
        return soft_target_cross_entropy(self.net(images / 16), targets)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.validated.append((images.clone(), labels.clone()))
        return nn.functional.cross_entropy(self.net(images / 16), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    return DataLoader(Images(), batch_size=4, shuffle=False, num_workers=0)


def _trainer(tmp_path, epochs, callback, **kwargs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[callback],
                      default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _fit(tmp_path, epochs, seed=7, ckpt=None, **kwargs):
    pl.seed_everything(seed, verbose=False)
    module = Tiny()
    callback = CutMixCallback(num_classes=4, alpha=1.0)
    trainer = _trainer(tmp_path, epochs, callback, **kwargs)
    trainer.fit(module, _loader(), _loader(), ckpt_path=ckpt)
    return module, callback, trainer


def test_training_batches_are_mixed_validation_batches_are_not(tmp_path, one_thread):
    module, _, _ = _fit(tmp_path, 1)
    assert len(module.seen) == 4
    mixed = 0
    for _, _, images, targets in module.seen:
        assert targets.shape == (4, 4) and targets.dtype == torch.float32
        mixed += sum(images[i, 0].unique().numel() > 1 for i in range(4))
    assert mixed > 0
    assert module.validated and all(labels.dtype == torch.int64 for _, labels in module.validated)
    assert all(images[i].unique().numel() == 1 for images, _ in module.validated for i in range(4))


def test_generator_seeded_from_the_global_seed_and_rank(tmp_path, one_thread):
    _, callback, _ = _fit(tmp_path, 1, seed=11, limit_train_batches=1, limit_val_batches=0)
    expected = torch.Generator().manual_seed(rank_seed(11, 0))
    fresh = CutMixCallback(num_classes=4, seed=11)
    assert fresh.seed == 11
    assert rank_seed(11, 0) != rank_seed(11, 1) and rank_seed(11, 0) != rank_seed(12, 0)
    # one batch drawn: the callback's generator has moved on from the seeded state by exactly that draw
    replay = featmix.CutMix(num_classes=4, generator=expected)
    replay(torch.zeros(4, 3, 8, 8), torch.arange(4))
    assert torch.equal(callback.generator.get_state(), expected.get_state())


def test_resumed_run_continues_the_draw_stream_bit_for_bit(tmp_path, one_thread):
    full, _, _ = _fit(tmp_path / "full", 3)
    first, callback, trainer = _fit(tmp_path / "part", 1)
    ckpt = tmp_path / "part.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if "CutMixCallback" in k]
    assert saved["sampler"]["step"] == 4 and 0 in saved["generators"]
    resumed, resumed_callback, _ = _fit(tmp_path / "resumed", 3, seed=99, ckpt=str(ckpt))  # another seed: restored
    assert resumed_callback.transform.sampler.step == 12
    assert len(full.seen) == 12 and len(first.seen) == 4 and len(resumed.seen) == 8
    for (e, b, images, targets), (e2, b2, images2, targets2) in zip(full.seen[4:], resumed.seen):
        assert (e, b) == (e2, b2)
        assert torch.equal(images, images2) and torch.equal(targets, targets2)
    for (_, _, images, targets), (_, _, images2, targets2) in zip(full.seen[:4], first.seen):
        assert torch.equal(images, images2) and torch.equal(targets, targets2)


def test_scheduled_variant_resumes_its_step(tmp_path, one_thread):
    pl.seed_everything(3, verbose=False)
    callback = CutMixCallback(num_classes=4, variant="scheduled", total_steps=8)
    trainer = _trainer(tmp_path, 1, callback, limit_val_batches=0)
    trainer.fit(Tiny(), _loader())
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    again = CutMixCallback(num_classes=4, variant="scheduled", total_steps=8)
    _trainer(tmp_path, 2, again, limit_val_batches=0).fit(Tiny(), _loader(), ckpt_path=str(tmp_path / "s.ckpt"))
    assert again.transform.sampler.step == 8


def test_callback_errors_name_the_argument():
    with pytest.raises(ValueError, match="exactly one of them"):
        CutMixCallback()
    with pytest.raises(ValueError, match="pass seed= instead"):
        CutMixCallback(num_classes=3, generator=torch.Generator())
    with pytest.raises(TypeError, match="featmix batch transform"):
        CutMixCallback(transform=nn.Identity())
    callback = CutMixCallback(num_classes=3)
    with pytest.raises(TypeError, match="must be a list"):
        callback.on_train_batch_start(None, None, (torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])), 0)
    with pytest.raises(TypeError, match="not a CutMixCallback state"):
        callback.load_state_dict({"step": 3})
