"""Alpha sweep (the paper's Figure 3, right): CutMix with lam ~ Beta(alpha, alpha) for each alpha, at one
layer index, against the baseline without CutMix, over paired seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import openmp  # noqa: F401  (sets OMP_WAIT_POLICY: import it before anything that loads torch)

# isort: split
from . import results, study
from .engine import Setting
from .options import StudyOptions, study_option


@dataclass
class AlphaOptions(StudyOptions):
    """The shared options, the alphas to sweep and the layer to mix at."""

    alphas: list[float] = study_option("--alphas", [0.1, 0.25, 0.5, 1.0, 2.0, 4.0], type=float, nargs="+",
                                       help="values of alpha to sweep")
    layer: int = study_option("--layer", 0, type=int, help="layer index to mix at (0 = input)")


def make_settings(opts: AlphaOptions) -> list[Setting]:
    """The baseline, then CutMix at --layer for each alpha of --alphas."""
    return [Setting("baseline")] + [Setting(f"alpha{a:g}", layer=opts.layer, alpha=a) for a in opts.alphas]


def plot(stats: list[dict], out: Path, name: str) -> Path:
    """alpha.png: final top-1 error against alpha (log axis), the baseline as a band."""
    return results.plot_curve(stats, "alpha", out / "alpha.png", "alpha (lam ~ Beta(alpha, alpha))",
                              f"{name}: final top-1 test error, mean ± std over seeds", log_x=True)


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m experiments.alpha_sweep`: run the study (see --help); returns its output directory."""
    return study.main("alpha_sweep", __doc__, argv, make_settings, plot, AlphaOptions,
                      flags={"layer": "--layer", "alpha": "--alphas"})


if __name__ == "__main__":
    main()
