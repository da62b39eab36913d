"""Alias: `python -m experiments.evaluate` runs `python -m experiments.evaluation` (same options)."""
import os

if __name__ == "__main__":  # a command, not an import: OpenMP reads this once, as torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .evaluation.command import main

if __name__ == "__main__":
    main()
