"""featmix's experiments, in three rooms (run from a checkout: `python -m experiments.<module>`).

Studies (this folder): `depth_ablation`, `alpha_sweep`, `variants`, `feature_cutmix` are thin entry
points over `study` (options, recipes, settings x seeds with resume), `engine` (one training run),
`data` (datasets held on the device), `results` (rows, summary, tables and plots) and `cli` (the
command-line pieces every tool shares). Evaluation of checkpoints: `experiments.evaluation` (one
module per measurement). Speed benchmarks: `experiments.bench` (`mixing`, `step`). `evaluate`,
`bench_mixing` and `bench_step` are aliases of the moved commands.

OpenMP threads that spin while waiting slow everything down when the CPU is shared (README: "Results"),
so the studies and the evaluation default to passive waiting. It only takes effect when this package
is imported before torch, as `python -m experiments.<module>` does; set OMP_WAIT_POLICY yourself to
override. The benchmarks keep the OpenMP default a user's own training script gets: passive waiting
makes every short parallel region pay a thread wake-up, which would misstate what mixing costs there.
"""
import os
import sys

_MAIN = next((a for a in getattr(sys, "orig_argv", [])[1:] if a.startswith("experiments.")), "")
if not _MAIN.startswith(("experiments.bench.", "experiments.bench_")):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
