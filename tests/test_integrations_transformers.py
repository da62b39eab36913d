"""featmix.integrations.transformers: ``CutMixTrainer.train`` and ``evaluate`` on tiny config-built models."""
from __future__ import annotations

import pytest
import torch
import transformers as T
from torch.utils.data import Dataset

import featmix
from featmix.integrations.transformers import CutMixTrainer

VIT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
           patch_size=8, num_labels=3)


class Images(Dataset):
    """Dict samples as HF image datasets give them, with one column no model takes (``image_id``)."""

    def __init__(self, n: int = 8, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"pixel_values": self.images[i], "labels": int(self.labels[i]), "image_id": f"img{i}"}


def _args(tmp_path, **kw):
    return T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                               max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                               logging_steps=1, dataloader_num_workers=0, remove_unused_columns=True, **kw)


def _plain_eval_loss(model, data: Images) -> float:
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(data.images[i:i + 4]).logits, data.labels[i:i + 4])
                  for i in range(0, len(data), 4)]
    return float(torch.stack(losses).mean())


class Spy(torch.nn.Module):
    """A featmix transform that counts its calls and keeps the targets it made."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = featmix.CutMix(num_classes=3, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def forward(self, images, labels):
        self.calls += 1
        return self.inner(images, labels)


def test_input_level_train_then_evaluate(tmp_path, one_thread):
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(**VIT))
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    spy = Spy()
    data = Images()
    trainer = CutMixTrainer(model=model, args=_args(tmp_path), train_dataset=data, eval_dataset=data, cutmix=spy)
    result = trainer.train()
    assert result.global_step == 3 and spy.calls == 3  # every training batch, and only those, mixed
    assert spy.inner.last_mix is not None
    assert all(k == ["pixel_values"] for k in seen)  # labels never reach the model (no float-label BCE)
    metrics = trainer.evaluate()
    assert spy.calls == 3  # evaluation batches are not mixed
    assert metrics["eval_loss"] == pytest.approx(_plain_eval_loss(model, data), rel=1e-5)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)


def test_input_level_loss_is_soft_ce_on_the_mixed_targets(tmp_path, one_thread):
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(**VIT))
    trainer = CutMixTrainer(model=model, args=_args(tmp_path), train_dataset=Images(),
                            cutmix=featmix.CutMix(num_classes=3, generator=torch.Generator().manual_seed(4)))
    data = Images()
    inputs = {"pixel_values": data.images[:4].clone(), "labels": data.labels[:4]}
    model.train()
    torch.manual_seed(1)
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    images, targets = featmix.CutMix(num_classes=3, generator=torch.Generator().manual_seed(4))(
        data.images[:4].clone(), data.labels[:4])
    assert not torch.allclose(targets.max(1).values, torch.ones(4))  # this draw mixes
    torch.manual_seed(1)
    logits = model(pixel_values=images).logits
    assert torch.allclose(loss, -(targets * torch.log_softmax(logits, -1)).sum(-1).mean(), atol=1e-6)


def _feature_mixes(trainer, model, data: Images, grid):
    """Several training losses on one batch: each mixes at the layer, on its grid (some draws paste a box)."""
    model.train()
    records = []
    for _ in range(6):
        loss = trainer.compute_loss(model, {"pixel_values": data.images[:4], "labels": data.labels[:4]})
        assert torch.isfinite(loss)
        records.append(model.last_mix)
    assert all(r is not None and tuple(r.grid) == grid for r in records)
    assert any(r.lam < 1 for r in records)


def test_feature_level_cutmix_at_train_then_evaluate(tmp_path, one_thread):
    torch.manual_seed(0)
    inner = T.ResNetForImageClassification(T.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8,
                                                          num_labels=3))
    model = featmix.CutMixAt(inner, layer=2, generator=torch.Generator().manual_seed(0))
    data = Images()
    trainer = CutMixTrainer(model=model, args=_args(tmp_path), train_dataset=data, eval_dataset=data)
    result = trainer.train()  # remove_unused_columns keeps pixel_values (the wrapped model's input) and labels
    assert result.global_step == 3 and model.last_mix is not None
    _feature_mixes(trainer, model, data, (4, 4))  # after stage 1 of a 16 x 16 image: stride 4
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(_plain_eval_loss(inner, data), rel=1e-5)


def test_feature_level_hf_swin_stage(tmp_path, one_thread):
    torch.manual_seed(0)
    inner = T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                      num_heads=[1, 2], window_size=2, num_labels=3))
    model = featmix.CutMixAt(inner, layer=2, generator=torch.Generator().manual_seed(0))
    data = Images(size=32)
    trainer = CutMixTrainer(model=model, args=_args(tmp_path), train_dataset=data)
    trainer.train()
    _feature_mixes(trainer, model, data, (4, 4))  # stage 1 ends with patch merging: 32 / 4 / 2


def test_feature_level_passes_other_model_inputs(tmp_path, one_thread):
    torch.manual_seed(0)
    inner = T.ViTForImageClassification(T.ViTConfig(**VIT))
    model = featmix.CutMixAt(inner, layer=2, generator=torch.Generator().manual_seed(0))
    trainer = CutMixTrainer(model=model, args=_args(tmp_path), train_dataset=Images())
    model.train()
    data = Images()
    inputs = {"pixel_values": data.images[:4], "labels": data.labels[:4],
              "interpolate_pos_encoding": True}
    loss = trainer.compute_loss(model, inputs)
    assert torch.isfinite(loss) and model.last_mix is not None


def test_trainer_rejects_two_mixes_and_foreign_losses(tmp_path):
    inner = T.ViTForImageClassification(T.ViTConfig(**VIT))
    with pytest.raises(ValueError, match="pass one of them"):
        CutMixTrainer(model=featmix.CutMixAt(inner, layer=2), args=_args(tmp_path),
                      cutmix=featmix.CutMix(num_classes=3))
    with pytest.raises(ValueError, match="compute_loss_func"):
        CutMixTrainer(model=inner, args=_args(tmp_path), compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(TypeError, match="featmix batch transform"):
        CutMixTrainer(model=inner, args=_args(tmp_path), cutmix="cutmix")
    trainer = CutMixTrainer(model=inner, args=_args(tmp_path), cutmix=featmix.CutMix(num_classes=3))
    inner.train()
    with pytest.raises(TypeError, match="needs 'pixel_values' and 'labels'"):
        trainer.compute_loss(inner, {"pixel_values": torch.zeros(2, 3, 16, 16)})
