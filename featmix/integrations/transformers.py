"""featmix in the Hugging Face ``Trainer``: ``CutMixTrainer`` trains image classifiers on mixed batches.

Input level: ``CutMixTrainer(model, args, ..., cutmix=featmix.CutMix(num_classes=...))`` mixes
``pixel_values`` of each training batch. Feature level: pass a ``featmix.CutMixAt`` as the model
(``CutMixTrainer(featmix.CutMixAt(hf_model, layer=2), args, ...)``): it mixes inside the forward. Either way
the training loss is soft-target cross-entropy on ``outputs.logits`` (the model never sees float labels, so
its own switch to BCE for float labels never fires), evaluation batches are not mixed and score plain
cross-entropy on the class indices, and ``remove_unused_columns`` keeps the model's inputs (the wrapped
model's when it is a ``CutMixAt``).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple, Union

import torch
import transformers
from torch import Tensor, nn

import featmix

from . import soft_target_cross_entropy


def _logits(outputs: Any) -> Tensor:
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        logits = outputs[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model's output has no .logits tensor (got {type(outputs).__name__}); CutMixTrainer "
                        f"trains image classifiers (...ForImageClassification)")
    return logits


class CutMixTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains on CutMix (input or feature level) with soft-target cross-entropy.

    Args:
        *args: ``transformers.Trainer``'s arguments (``model``, ``args``, ``train_dataset``, ...). A
            ``featmix.CutMixAt`` model mixes at its layer in training and is the plain model in evaluation.
        cutmix: a featmix batch transform applied to ``pixel_values`` of training batches (input level); None
            with a ``CutMixAt`` model (feature level), or to train unmixed.
        **kwargs: ``transformers.Trainer``'s keyword arguments (``compute_loss_func`` is not accepted: the loss
            is this class's).

    Returns:
        A ``transformers.Trainer``; ``compute_loss`` returns the mean loss of the batch (with the outputs when
        asked).

    Raises:
        ValueError: ``cutmix`` together with a ``CutMixAt`` model (two mixes per batch), or ``compute_loss_func``.
        TypeError: ``cutmix`` that is not callable; batches without ``labels``/``pixel_values`` in training, or a
            model output without logits.
    """

    def __init__(self, *args: Any, cutmix: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("CutMixTrainer computes its own loss (soft-target cross-entropy on the mixed targets): "
                             "do not pass compute_loss_func")
        if cutmix is not None and not callable(cutmix):
            raise TypeError(f"cutmix must be a featmix batch transform (e.g. featmix.CutMix(num_classes=...)), got "
                            f"{type(cutmix).__name__}")
        super().__init__(*args, **kwargs)
        self.mixes_inside = isinstance(self.model, featmix.CutMixAt)
        if cutmix is not None and self.mixes_inside:
            raise ValueError("the model is a featmix.CutMixAt (it mixes at its layer) and cutmix= mixes the input too: "
                             "pass one of them")
        self.cutmix = cutmix
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: the Trainer divides it for accumulation
        self.model_accepts_loss_kwargs = False

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the columns the classifier takes (the wrapped one's for a ``CutMixAt``), and the labels."""
        if self._signature_columns is None:
            inner = self.model.model if isinstance(self.model, featmix.CutMixAt) else self.model
            columns = list(inspect.signature(inner.forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", "labels", *self.label_names})

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[Tensor, int]] = None) -> Union[Tensor, Tuple[Tensor, Any]]:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if not model.training:
            outputs = self._plain_forward(model, inputs)
            if labels is None:
                loss = outputs.get("loss") if isinstance(outputs, dict) else None
                if loss is None:
                    raise TypeError("evaluation batch without labels: CutMixTrainer scores cross-entropy on the "
                                    "'labels' column")
            else:
                loss = nn.functional.cross_entropy(_logits(outputs).float(), labels)
            return (loss, outputs) if return_outputs else loss
        if labels is None or "pixel_values" not in inputs:
            raise TypeError(f"a training batch needs 'pixel_values' and 'labels'; got keys {sorted(inputs)} and "
                            f"labels={'missing' if labels is None else 'present'} (is remove_unused_columns dropping "
                            f"them? name the image column pixel_values)")
        if self.mixes_inside:
            outputs, targets = self._feature_forward(model, inputs, labels)
        elif self.cutmix is not None:
            inputs["pixel_values"], targets = self.cutmix(inputs["pixel_values"], labels)
            outputs = model(**inputs)
        else:
            outputs = self._plain_forward(model, inputs)
            targets = None
        logits = _logits(outputs)
        if targets is None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        else:
            loss = soft_target_cross_entropy(logits, targets)
        return (loss, outputs) if return_outputs else loss

    def _plain_forward(self, model: nn.Module, inputs: Dict[str, Any]) -> Any:
        if self.mixes_inside and set(inputs) == {"pixel_values"}:
            return model(inputs["pixel_values"])  # CutMixAt's positional images (no keyword needed from the core)
        return model(**inputs)

    @staticmethod
    def _feature_forward(model: nn.Module, inputs: Dict[str, Any], labels: Tensor) -> Tuple[Any, Tensor]:
        pixel_values = inputs.pop("pixel_values")
        if inputs:  # other model inputs go through CutMixAt's keyword arguments (core: pixel_values=, **kwargs)
            return model(pixel_values=pixel_values, labels=labels, **inputs)
        return model(pixel_values, labels)

    def prediction_step(self, model: nn.Module, inputs: Dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[Any] = None) -> Tuple[Optional[Tensor], Any, Any]:
        """Evaluation: the plain model on unmixed batches; loss = cross-entropy, predictions = the logits."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        return loss, _logits(outputs).detach(), labels
