"""`python -m experiments.evaluation`: evaluate checkpoints (see `experiments.evaluation.command`)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a command, not an import: OpenMP reads this once, as torch loads

from .command import main

main()
