"""Depth ablation (the paper's Figure 3, left): CutMix on the input (layer 0) or on the feature map after
layer index 1..4, against the same network trained without CutMix, over paired seeds.

Layer index: 0 = input image, 1 = after the stem, 2 = after stage 1, 3 = after stage 2, 4 = after stage 3.
With no arguments: the fast CPU recipe (ResNet-8 on a fixed 1,000-image Fashion-MNIST subset, 40 epochs,
6 settings x 2 seeds, full 10k test set), minutes on 2 CPU cores (the README gives the measured time).
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
class DepthOptions(StudyOptions):
    """The shared options and the layer indices to mix at."""

    layers: list[int] = study_option("--layers", [0, 1, 2, 3, 4], type=int, nargs="+",
                                     help="layer indices to mix at (0 = input)")


def make_settings(opts: DepthOptions) -> list[Setting]:
    """The baseline, then CutMix at each layer index of --layers."""
    return [Setting("baseline")] + [Setting(f"layer{i}", layer=i, alpha=opts.alpha) for i in opts.layers]


def plot(stats: list[dict], out: Path, name: str) -> Path:
    """depth.png: final top-1 error against the layer index, the baseline as a band."""
    return results.plot_curve(stats, "layer", out / "depth.png", "CutMix after layer index (0 = input)",
                              f"{name}: final top-1 test error, mean ± std over seeds")


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m experiments.depth_ablation`: run the study (see --help); returns its output directory."""
    return study.main("depth_ablation", __doc__, argv, make_settings, plot, DepthOptions,
                      flags={"layer": "--layers"})


if __name__ == "__main__":
    main()
