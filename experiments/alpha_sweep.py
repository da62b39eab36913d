"""Alpha sweep (the paper's Figure 3, right): CutMix with lam ~ Beta(alpha, alpha) for each alpha, at one
layer index, against the baseline without CutMix, over paired seeds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import results, study
from .engine import Setting


def make_settings(opts: dict[str, Any]) -> list[Setting]:
    return [Setting("baseline")] + [Setting(f"alpha{a:g}", layer=opts["layer"], alpha=a) for a in opts["alphas"]]


def plot(stats: list[dict], out: Path, name: str) -> Path:
    return results.plot_curve(stats, "alpha", out / "alpha.png", "alpha (lam ~ Beta(alpha, alpha))",
                              f"{name}: final top-1 test error, mean ± std over seeds", log_x=True)


def main(argv: Sequence[str] | None = None) -> Path:
    p = study.build_parser("alpha_sweep", __doc__)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0],
                   help="values of alpha to sweep")
    p.add_argument("--layer", type=int, default=0, help="layer index to mix at (0 = input)")
    return study.run_study("alpha_sweep", p.parse_args(argv), make_settings, plot)


if __name__ == "__main__":
    main()
