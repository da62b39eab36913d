"""Alias: `python -m experiments.evaluate` runs `python -m experiments.evaluation` (same options)."""
from .evaluation.command import main

if __name__ == "__main__":
    main()
