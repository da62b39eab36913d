"""Feature CutMix (the paper's ImageNet table): baseline vs CutMix on the input vs CutMix at a layer drawn
at random for every batch (featmix's layer="random", or a list of layer indices), over paired seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import openmp  # noqa: F401  (sets OMP_WAIT_POLICY: import it before anything that loads torch)

# isort: split
from . import results, study
from .cli import UsageError
from .engine import Setting
from .options import StudyOptions, study_option


def _layers(text: str) -> str | int:
    return text if text == "random" else int(text)


@dataclass
class FeatureOptions(StudyOptions):
    """The shared options and the layers Feature CutMix draws from."""

    feature_layers: list[str | int] = study_option(
        "--feature-layers", ["random"], nargs="+", type=_layers, metavar="L",
        help="'random' (featmix's choice per batch among the input, the stem and every stage but the last, as "
             "Manifold Mixup) or the layer indices to draw from")


def make_settings(opts: FeatureOptions) -> list[Setting]:
    """The baseline, CutMix on the input, and Feature CutMix over --feature-layers."""
    layers = opts.feature_layers
    if layers == ["random"]:
        feature = Setting("feature_random", layer="random", alpha=opts.alpha)
    elif "random" in layers:
        got = " ".join(map(str, layers))
        raise UsageError(f"--feature-layers: expected 'random' alone or layer indices, got {got}")
    else:
        feature = Setting("feature_" + "-".join(map(str, layers)), layer=list(layers), alpha=opts.alpha)
    return [Setting("baseline"), Setting("input", layer=0, alpha=opts.alpha), feature]


def plot(stats: list[dict], out: Path, name: str) -> Path:
    """feature_cutmix.png: one bar per setting, the baseline as a band."""
    return results.plot_bars(stats, out / "feature_cutmix.png",
                             f"{name}: final top-1 test error, mean ± std over seeds")


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m experiments.feature_cutmix`: run the study (see --help); returns its output directory."""
    return study.main("feature_cutmix", __doc__, argv, make_settings, plot, FeatureOptions,
                      flags={"layer": "--feature-layers"})


if __name__ == "__main__":
    main()
