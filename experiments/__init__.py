"""Runnable studies of CutMix at the input and at feature maps: `python -m experiments.<study>`.

depth_ablation, alpha_sweep, variants, feature_cutmix share `study` (options, grid, resume), `engine`
(one training run), `data` (datasets held on the device) and `results` (rows, summary, plots).

OpenMP threads that spin while waiting are ruinous when the CPU is shared (measured here: 2 spinning
threads on 2 busy cores ran a ResNet-8 step 3-10x slower than 2 passive threads or 1 thread), so the
studies default to passive waiting; on idle cores it made no measurable difference to their speed. It
only takes effect when this package is imported before torch, as `python -m experiments.<study>`
does; set OMP_WAIT_POLICY yourself to override. The benchmarks (`experiments.bench.*`, and their aliases
`experiments.bench_*`) are left with
the OpenMP default a user's own training script gets: passive waiting makes every short parallel
region pay a thread wake-up, which would misstate what mixing costs in that script.
"""
import os
import sys

_MAIN = next((a for a in getattr(sys, "orig_argv", [])[1:] if a.startswith("experiments.")), "")
if not _MAIN.startswith(("experiments.bench.", "experiments.bench_")):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
