"""`python -m experiments.evaluation`: evaluate checkpoints (see `experiments.evaluation.command`)."""
from .. import openmp  # noqa: F401  (first of this package: OMP_WAIT_POLICY before torch loads)
from .command import main

main()
