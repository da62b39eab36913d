"""Alias: `python -m experiments.bench_mixing` runs `python -m experiments.bench.mixing` (same options)."""
from .bench.mixing import main

if __name__ == "__main__":
    main()
