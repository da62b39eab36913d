"""Speed benchmarks of featmix: `python -m experiments.bench.mixing` (one mix of a batch against timm,
torchvision, the reference code and a copy) and `python -m experiments.bench.step` (a whole training
step with and without `CutMixAt`, eager and compiled); `common` holds the interleaved timer they share.

They run with the OpenMP default waiting policy a user's training script gets (see `experiments`).
"""
