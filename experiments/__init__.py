"""featmix's experiments, in three rooms (run from a checkout: `python -m experiments.<module>`).

Studies (this folder): `depth_ablation`, `alpha_sweep`, `variants`, `feature_cutmix`, `compare` are thin entry
points over `study` (settings x seeds, checked first, resumed, summarised), `options` (the command line,
recipes and the typed `StudyOptions`), `runs` (training the runs one by one or `--jobs N` at once, saving
each), `engine` (one training run), `validate` (every option and setting checked before training),
`checkpoint` (per-epoch state, resume, `--max-minutes`), `fast` (the CUDA defaults and torch.compile), `data`
(datasets held on the device), `results` (rows, summary, tables and plots), `stats` (paired t-intervals) and
`cli` (the command-line pieces every tool shares); `throughput` times the studies' fast path; `gallery` draws
the documentation's pictures. Evaluation of checkpoints: `experiments.evaluation` (one module per
measurement). Speed benchmarks: `experiments.bench` (`mixing`, `step`, `compiled`).

Importing this package changes nothing in the environment. The study and evaluation commands, run as
`python -m ...`, wait passively in OpenMP (`experiments.openmp`); the benchmarks keep OpenMP's default, as a
user's own training script has it.
"""
