"""Variant ablation (the paper's Table 8): CutMix and five variants of it at one layer index, against the
baseline without CutMix, over paired seeds.

cutmix: as published; center_gaussian: box centre drawn near the centre; fixed_size: half-side box
(lam = 0.75); scheduled: the chance of mixing ramps from 0 to 1 over training; one_hot: the label of the
larger area; complete_label: 0.5/0.5 labels whatever the box.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # a command, not an import: OpenMP reads this once, as torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path
from typing import Any, Sequence

from . import results, study
from .engine import Setting

VARIANTS = ["cutmix", "center_gaussian", "fixed_size", "scheduled", "one_hot", "complete_label"]


def make_settings(opts: dict[str, Any]) -> list[Setting]:
    """The baseline, then each variant of --variants at --layer."""
    return [Setting("baseline")] + [Setting(v, layer=opts["layer"], alpha=opts["alpha"], variant=v)
                                    for v in opts["variants"]]


def plot(stats: list[dict], out: Path, name: str) -> Path:
    """variants.png: one bar per setting, the baseline as a band."""
    return results.plot_bars(stats, out / "variants.png", f"{name}: final top-1 test error, mean ± std over seeds")


OPTIONS: list[study.Option] = [
    ("--variants", dict(nargs="+", choices=VARIANTS, default=VARIANTS, help="variants to run")),
    ("--layer", dict(type=int, default=0, help="layer index to mix at (0 = input)")),
]


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m experiments.variants`: run the study (see --help); returns its output directory."""
    return study.main("variants", __doc__, argv, OPTIONS, make_settings, plot,
                      flags={"layer": "--layer", "variant": "--variants"})


if __name__ == "__main__":
    main()
