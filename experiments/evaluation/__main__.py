"""`python -m experiments.evaluation`: evaluate checkpoints (see `experiments.evaluation.command`)."""
from .command import main

main()
