"""featmix's experiments, in three rooms (run from a checkout: `python -m experiments.<module>`).

Studies (this folder): `depth_ablation`, `alpha_sweep`, `variants`, `feature_cutmix`, `compare` are thin
entry points over `study` (options, recipes, settings x seeds, resume), `engine` (one training run),
`validate` (every option and setting checked before training), `checkpoint` (per-epoch state, resume,
`--max-minutes`), `parallel` (`--jobs`), `fast` (the CUDA defaults and torch.compile), `data` (datasets
held on the device), `results` (rows, summary, tables and plots) and `cli` (the command-line pieces every
tool shares); `throughput` times the studies' fast path. Evaluation of checkpoints: `experiments.evaluation`
(one module per measurement). Speed benchmarks: `experiments.bench` (`mixing`, `step`, `compiled`). `evaluate`,
`bench_mixing` and `bench_step` are aliases of the moved commands.

Importing this package changes nothing in the environment. The study and evaluation commands, run as
`python -m ...`, set OMP_WAIT_POLICY=PASSIVE (unless it is set) in their entry module before torch loads
OpenMP, which reads it once: on CPU cores shared with other work, OpenMP threads that spin while waiting
made a training epoch 5-13x slower than passive ones (README: "Results"); on idle cores it makes no
measurable difference. The benchmarks keep OpenMP's default, as a user's own training script has it.
"""
