"""Variant ablation (the paper's Table 8): CutMix and five variants of it at one layer index, against the
baseline without CutMix, over paired seeds.

cutmix: as published; center_gaussian: box centre drawn near the centre; fixed_size: half-side box
(lam = 0.75); scheduled: the chance of mixing ramps from 0 to 1 over training; one_hot: the label of the
larger area; complete_label: 0.5/0.5 labels whatever the box.
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

VARIANTS = ["cutmix", "center_gaussian", "fixed_size", "scheduled", "one_hot", "complete_label"]


@dataclass
class VariantOptions(StudyOptions):
    """The shared options, the variants to run and the layer to mix at."""

    variants: list[str] = study_option("--variants", VARIANTS, nargs="+", choices=VARIANTS, help="variants to run")
    layer: int = study_option("--layer", 0, type=int, help="layer index to mix at (0 = input)")


def make_settings(opts: VariantOptions) -> list[Setting]:
    """The baseline, then each variant of --variants at --layer."""
    return [Setting("baseline")] + [Setting(v, layer=opts.layer, alpha=opts.alpha, variant=v) for v in opts.variants]


def plot(stats: list[dict], out: Path, name: str) -> Path:
    """variants.png: one bar per setting, the baseline as a band."""
    return results.plot_bars(stats, out / "variants.png", f"{name}: final top-1 test error, mean ± std over seeds")


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m experiments.variants`: run the study (see --help); returns its output directory."""
    return study.main("variants", __doc__, argv, make_settings, plot, VariantOptions,
                      flags={"layer": "--layer", "variant": "--variants"})


if __name__ == "__main__":
    main()
