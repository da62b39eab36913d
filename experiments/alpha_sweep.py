"""Alpha sweep (the paper's Figure 3, right): CutMix with lam ~ Beta(alpha, alpha) for each alpha, at one
layer index, against the baseline without CutMix, over paired seeds.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # a command, not an import: OpenMP reads this once, as torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path
from typing import Any, Sequence

from . import results, study
from .engine import Setting


def make_settings(opts: dict[str, Any]) -> list[Setting]:
    """The baseline, then CutMix at --layer for each alpha of --alphas."""
    return [Setting("baseline")] + [Setting(f"alpha{a:g}", layer=opts["layer"], alpha=a) for a in opts["alphas"]]


def plot(stats: list[dict], out: Path, name: str) -> Path:
    """alpha.png: final top-1 error against alpha (log axis), the baseline as a band."""
    return results.plot_curve(stats, "alpha", out / "alpha.png", "alpha (lam ~ Beta(alpha, alpha))",
                              f"{name}: final top-1 test error, mean ± std over seeds", log_x=True)


OPTIONS: list[study.Option] = [
    ("--alphas", dict(type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0], help="values of alpha to sweep")),
    ("--layer", dict(type=int, default=0, help="layer index to mix at (0 = input)")),
]


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m experiments.alpha_sweep`: run the study (see --help); returns its output directory."""
    return study.main("alpha_sweep", __doc__, argv, OPTIONS, make_settings, plot,
                      flags={"layer": "--layer", "alpha": "--alphas"})


if __name__ == "__main__":
    main()
