"""The paper's comparison (Table 3 and its CIFAR-100 table): baseline, Mixup, Manifold Mixup, Cutout, Feature
CutMix and CutMix, each through featmix's one draw/site machinery, over paired seeds.

Mixup and Cutout act on the input; Manifold Mixup is Mixup and Feature CutMix is CutMix at a layer drawn for
every batch among the input, the stem and every stage but the last (featmix's layer="random"). Every
method mixes a batch with the recipe's --cutmix-prob, so all of them see the same gate stream. The table
`table3.md` puts the paper's numbers (at the paper's scale) beside ours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import openmp  # noqa: F401  (sets OMP_WAIT_POLICY: import it before anything that loads torch)

# isort: split
from . import results, stats, study
from .engine import Setting
from .options import StudyOptions

# name -> (row label, paper's ImageNet ResNet-50 top-1 err, paper's CIFAR-100 PyramidNet-200 top-1 err)
PAPER = {
    "baseline": ("Baseline", 23.68, 16.45),
    "mixup": ("Mixup", 22.58, 15.63),
    "manifold_mixup": ("Manifold Mixup", 22.50, 16.14),
    "cutout": ("Cutout", 22.93, 16.53),
    "feature_cutmix": ("Feature CutMix", 21.80, None),
    "cutmix": ("CutMix", 21.40, 14.47),
}


def make_settings(opts: StudyOptions) -> list[Setting]:
    """The six rows of Table 3, in its order (the baseline first)."""
    a = opts.alpha
    return [Setting("baseline"),
            Setting("mixup", layer=0, alpha=a, kind="mixup"),
            Setting("manifold_mixup", layer="random", alpha=a, kind="mixup"),
            Setting("cutout", layer=0, kind="cutout"),
            Setting("feature_cutmix", layer="random", alpha=a),
            Setting("cutmix", layer=0, alpha=a)]


def paper_table(summary: Sequence[dict[str, Any]]) -> str:
    """Table 3's layout: one row per method, our paired result beside the paper's two columns."""
    lines = [f"| method | ours: final top-1 err | Δ vs baseline (paired) | {stats.INTERVAL_TITLE} | "
             f"{stats.EXCLUDES_TITLE} | lower than baseline | paper: ImageNet ResNet-50 top-1 err | "
             "paper: CIFAR-100 PyramidNet-200 top-1 err |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        label, imagenet, cifar = PAPER[s["setting"]]
        base = s["setting"] == "baseline"
        delta = "(reference)" if base else results.fmt_mean_std(s["diff_final_top1_err"], sign=True)
        interval = "" if base else stats.format_interval(s["interval"])
        excludes = "" if base else stats.format_excludes(s["interval"])
        wins = "" if base else f"{s['wins']}/{s['n_pairs']}"
        lines.append(f"| {label} | {results.fmt_mean_std(s['final_top1_err'])} | {delta} | {interval} | {excludes} | "
                     f"{wins} | {imagenet:.2f} | {'–' if cifar is None else f'{cifar:.2f}'} |")
    return "\n".join(lines)


def plot(summary: list[dict], out: Path, name: str) -> Path:
    """compare.png (one bar per method) and table3.md (the paper's layout with its numbers beside ours)."""
    note = ("The paper's columns are its published numbers at its scale (ImageNet ResNet-50, 300 epochs; "
            "CIFAR-100 PyramidNet-200, best of training, mean of 3 runs); ours come from this study's setup "
            "(see summary.md), so compare the ordering, not the values. Errors in %, mean ± std over seeds. "
            + results.INTERVAL_NOTE)
    (out / "table3.md").write_text(f"# {name}: the paper's Table 3 rows\n\n{paper_table(summary)}\n\n{note}\n")
    print(f"table: {out / 'table3.md'}")
    return results.plot_bars(summary, out / "compare.png", f"{name}: final top-1 test error, mean ± std over seeds")


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m experiments.compare`: run the study (see --help); returns its output directory."""
    return study.main("compare", __doc__, argv, make_settings, plot)


if __name__ == "__main__":
    main()
