"""OpenMP waits passively in the study and evaluation commands: import this module before torch loads.

On CPU cores shared with other work, OpenMP threads that spin while they wait made a training epoch 5-13x
slower than passive ones (docs: "The studies and the evaluation"); on idle cores it makes no measurable
difference. OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so a command's entry module imports this
module among its first imports. It sets OMP_WAIT_POLICY=PASSIVE (unless the variable is set) only when the
running program is one of `COMMANDS` (`python -m experiments.<command>`): importing the experiments from
anywhere else changes nothing, and the benchmarks keep OpenMP's default, as a user's training script has it.
"""
from __future__ import annotations

import os
import sys

COMMANDS = frozenset({
    "experiments.depth_ablation", "experiments.alpha_sweep", "experiments.variants", "experiments.feature_cutmix",
    "experiments.compare", "experiments.throughput", "experiments.evaluation.__main__",
})


def running_command() -> str | None:
    """The module run as `python -m MODULE` when it is one of `COMMANDS`, else None."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    return name if name in COMMANDS else None


if running_command() is not None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
