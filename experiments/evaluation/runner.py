"""`evaluate_model`: the clean pass, then every requested measurement, each with its own progress bar."""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable

import torch.nn as nn

from ..data import FolderData, TensorData
from .base import EvalContext, EvalOptions, Measurement, Normalize
from .calibration import Calibration
from .clean import Clean
from .fgsm import FGSM
from .inbetween import InBetween
from .localization import Localization
from .occlusion import Occlusion
from .ood import OOD

# name -> measurement, in the order they run and report (the clean pass always runs first)
MEASUREMENTS: dict[str, type[Measurement]] = {
    m.name: m for m in (FGSM, Occlusion, InBetween, OOD, Calibration, Localization)}
METRICS = tuple(MEASUREMENTS)


def _bar(steps: Iterable[Any], total: int, desc: str, progress: bool) -> Iterable[Any]:
    if not progress:
        return steps
    from tqdm.auto import tqdm
    return tqdm(steps, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)


def run_measurement(m: Measurement, progress: bool = False, label: str = "") -> dict[str, Any]:
    """Feed every step of `m` to it (with a progress bar when asked) and return its report section."""
    for step in _bar(m.steps(), m.num_steps(), f"{label} {m.name}".strip(), progress):
        m.accumulate(step)
    return m.report()


def evaluate_model(model: nn.Module, data: TensorData | FolderData, normalize: Normalize, opts: EvalOptions,
                   progress: bool = False, label: str = "") -> dict[str, Any]:
    """Every requested measurement of one model on `data`'s test set -> the report body (numbers in %)."""
    t0 = time.perf_counter()
    ctx = EvalContext(model, data, normalize, opts)
    rep: dict[str, Any] = {"test_size": ctx.num_test, **run_measurement(Clean(ctx), progress, label)}
    seconds = {"clean": time.perf_counter() - t0}
    for name in (n for n in METRICS if n in opts.metrics):
        t1 = time.perf_counter()
        m = MEASUREMENTS[name](ctx)
        reason = m.skip_reason()
        if reason:
            ctx.notes.append(f"{name} skipped: {reason}")
            continue
        rep[name] = run_measurement(m, progress, label)
        seconds[name] = time.perf_counter() - t1
    rep["notes"] = ctx.notes
    rep["eval_time_s"] = time.perf_counter() - t0
    rep["time_s"] = seconds
    return rep
