"""The shape every measurement shares, and the context it reads (model, test set, options, clean pass).

A measurement (`Measurement`) iterates its `steps()` (by default the test set in batches of pixels),
`accumulate`s each, and `report`s its section of report.json (accuracies, AUROC, TNR and ECE in %). It
names the scalars the comparison tables show (`columns`) and writes its own lines of report.md
(`markdown`). The clean pass runs first and keeps every image's prediction and confidence in
`EvalContext.clean`, so no measurement repeats it. Images travel in pixel space, floats in [0, 1];
`normalize` maps them to what the model was trained on, so perturbations mean what they say there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from .. import results
from ..data import FolderData, TensorData, balanced_subset
from .testsets import pixel_test_batches

Normalize = Callable[[torch.Tensor], torch.Tensor]
EVAL_SEED = 0  # in-between partners, OOD noise, chance boxes: the same for every checkpoint
GRID_SEED = 1234 + 2  # the grid measurements' fixed test subset (beside the studies' 1234 and 1234 + 1)
DEFAULT_LAMS = tuple(round(0.1 * k, 1) for k in range(11))


def pct(value: torch.Tensor | float) -> float:
    """A fraction as a percentage (a Python float)."""
    return 100.0 * float(value)


def as_double(values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Any scores or flags as a flat float64 CPU tensor."""
    return torch.as_tensor(values, dtype=torch.float64).flatten().cpu()


@dataclass
class EvalOptions:
    """What to measure and how (filled from the command line)."""

    metrics: tuple[str, ...] = ("fgsm", "occlusion", "inbetween", "ood", "calibration", "localization")
    epsilon: float = 8.0
    batch_size: int = 500
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    occlusion_steps: int = 8
    lams: tuple[float, ...] = DEFAULT_LAMS
    ece_bins: int = 15
    cam_threshold: float = 0.15
    iou_threshold: float = 0.5
    ood_size: int | None = None
    data_dir: str | None = None
    forward_batch: int = 128   # images per model call (settings of one test batch share calls)
    grid_images: int | None = None  # occlusion / in-between on a fixed subset of this many test images


@dataclass
class TestBatch:
    """One batch of the test set: pixels and labels on the device, test-set indices (CPU), clean predictions."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    pred: torch.Tensor


@dataclass
class CleanResults:
    """Per test image (CPU): clean top-1 prediction, max-softmax confidence, correctness, label; summed NLL."""

    pred: torch.Tensor
    conf: torch.Tensor
    correct: torch.Tensor
    labels: torch.Tensor
    nll: float = 0.0

    @classmethod
    def empty(cls, n: int) -> "CleanResults":
        """Zeroed results for `n` images, filled batch by batch."""
        return cls(torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n, dtype=torch.bool),
                   torch.zeros(n, dtype=torch.long))


class EvalContext:
    """What every measurement of one model reads: the model, the test set, the options and the clean pass."""

    def __init__(self, model: nn.Module, data: TensorData | FolderData, normalize: Normalize,
                 opts: EvalOptions) -> None:
        self.model, self.data, self.normalize, self.opts = model, data, normalize, opts
        self.device = opts.device
        self.num_test = data.num_test
        self.shape = tuple(data.input_size)
        self.notes: list[str] = []
        self.clean = CleanResults.empty(self.num_test)
        self._blank: torch.Tensor | None = None

    def logits(self, x_pix: torch.Tensor) -> torch.Tensor:
        """float32 logits of pixels in [0, 1], in model calls of at most `forward_batch` images (no gradient)."""
        step = self.opts.forward_batch
        with torch.no_grad():
            return torch.cat([self.model(self.normalize(x_pix[s:s + step])).float()
                              for s in range(0, x_pix.shape[0], step)])

    def predict(self, x_pix: torch.Tensor) -> torch.Tensor:
        """Top-1 class of pixels in [0, 1]."""
        return self.logits(x_pix).argmax(1)

    def predict_many(self, variants: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Top-1 classes of several image batches, run through shared model calls; one tensor per batch."""
        if not variants:
            return []
        return list(self.predict(torch.cat(list(variants))).split([v.shape[0] for v in variants]))

    def blank_prediction(self) -> torch.Tensor:
        """The class predicted for an all-black image (computed once: it is the same image for every sample)."""
        if self._blank is None:
            self._blank = self.predict(torch.zeros(1, *self.shape, device=self.device))[0]
        return self._blank

    def test_batches(self, index: torch.Tensor | None = None) -> Iterator[TestBatch]:
        """The test set (or the images at `index`) in order, batch by batch, with the clean predictions."""
        for x, y, idx in pixel_test_batches(self.data, self.opts.batch_size, self.device, index):
            yield TestBatch(x, y, idx, self.clean.pred[idx].to(self.device))

    def num_test_batches(self, index: torch.Tensor | None = None) -> int:
        """Batches in one pass over the test set (or over the images at `index`)."""
        return math.ceil((self.num_test if index is None else index.numel()) / self.opts.batch_size)

    def grid_index(self) -> torch.Tensor | None:
        """Test-set indices the grid measurements use: a fixed class-balanced subset (sorted), or None for all."""
        n = self.opts.grid_images
        if not n or n >= self.num_test:
            return None
        return balanced_subset(self.clean.labels, n, torch.Generator().manual_seed(GRID_SEED)).sort().values


class Measurement:
    """Base of every measurement: iterate `steps()`, `accumulate` each, then `report` (see the module doc)."""

    name: ClassVar[str] = ""
    # summary column key -> (column title, path inside this measurement's report section)
    columns: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx

    def skip_reason(self) -> str | None:
        """Why this measurement does not apply to this model or data (None: it does)."""
        return None

    def steps(self) -> Iterable[Any]:
        """What `accumulate` is fed: by default the test set in batches."""
        return self.ctx.test_batches()

    def num_steps(self) -> int:
        """How many steps `steps()` yields (for the progress bar)."""
        return self.ctx.num_test_batches()

    def accumulate(self, step: Any) -> None:
        """Take in one step."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """This measurement's section of the report (numbers in %)."""
        raise NotImplementedError

    # its line in report.md: filled from the report and (winning on a clash) this measurement's section
    line: ClassVar[str] = ""

    @classmethod
    def markdown(cls, report: dict[str, Any]) -> list[str]:
        """Its lines of report.md, given the whole report (by default `line`, filled in)."""
        return [cls.line.format_map({**report, **report[cls.name]})] if cls.line else []


class GridMeasurement(Measurement):
    """A measurement over a grid of settings: it runs on the grid subset of the test set (--grid-images) and
    reports a table (`title`, an optional `note` filled from its section, `header`, `rows(section)`)."""

    title: ClassVar[str] = ""
    note: ClassVar[str] = ""
    header: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.index = ctx.grid_index()
        self.seen = 0

    def steps(self) -> Iterable[TestBatch]:
        """The grid subset of the test set, in batches."""
        return self.ctx.test_batches(self.index)

    def num_steps(self) -> int:
        """Batches of the grid subset."""
        return self.ctx.num_test_batches(self.index)

    @staticmethod
    def rows(section: dict[str, Any]) -> list[list[Any]]:
        """The table's rows, one per grid point."""
        raise NotImplementedError

    @classmethod
    def markdown(cls, report: dict[str, Any]) -> list[str]:
        """A heading with the number of images, the note, the table."""
        section = report[cls.name]
        lines = [f"## {cls.title} ({section.get('n', report['test_size'])} test images)", ""]
        lines += [cls.note.format_map(section), ""] if cls.note else []
        return lines + [results.md_table(cls.header, cls.rows(section))]
