"""Alias: `python -m experiments.bench_step` runs `python -m experiments.bench.step` (same options)."""
from .bench.step import main

if __name__ == "__main__":
    main()
