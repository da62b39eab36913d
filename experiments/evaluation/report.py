"""Writing an evaluation: report.json + report.md per checkpoint, and the comparison across checkpoints
(comparison.md, comparison.csv, comparison_by_setting.csv, occlusion.png, inbetween.png)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .. import results, stats
from .clean import Clean
from .runner import MEASUREMENTS

# Scalars of a report that the comparison tables show: key -> (column title, path into the report).
SUMMARY_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    **Clean.columns,
    **{key: (title, (m.name, *path)) for m in MEASUREMENTS.values() for key, (title, path) in m.columns.items()}}
COLUMNS_NOTE = ("Columns: clean = top-1 accuracy; FGSM = accuracy under one-step FGSM; occlusion = mean accuracy over "
                "the hole-size grid (per-size curves in each report and occlusion.png); in-between = accuracy against "
                "the label of the larger part, mean over lam (inbetween.png); OOD = max-softmax detector, mean over "
                "the OOD sets; ECE = 15-bin expected calibration error; loc = CAM boxes with IoU >= 0.5 (top-1: and "
                "class correct).")
Groups = dict[str, list[dict[str, Any]]]


def summary_row(report: dict[str, Any]) -> dict[str, Any]:
    """The scalars of one report that the comparison shows (missing measurements left out)."""
    row: dict[str, Any] = {"label": report["label"], "setting": report["setting"].get("name"),
                           "layer": report["setting"].get("layer"), "seed": report.get("seed")}
    for key, (_, path) in SUMMARY_KEYS.items():
        v: Any = report
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            row[key] = v
    return row


def write_report(report: dict[str, Any], out: Path, plots: bool) -> None:
    """report.json and report.md (and this checkpoint's plots) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    s = report["setting"]
    md = [f"# {report['label']}", "",
          f"`{report['checkpoint']}`: {report['model']}, setting {s.get('name')} (layer {s.get('layer')}, alpha "
          f"{s.get('alpha', '–')}, variant {s.get('variant', '–')}), seed {report.get('seed')}; evaluated on "
          f"{report['dataset']} ({report['test_size']} test images) in {report['eval_time_s']:.0f} s. "
          "Numbers are %.", "",
          results.md_table(["metric", "value"], [[SUMMARY_KEYS[k][0], v] for k, v in summary_row(report).items()
                                                 if k in SUMMARY_KEYS])]
    for name, m in MEASUREMENTS.items():
        if name in report:
            md += [""] + m.markdown(report)
    if report.get("notes"):
        md += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    if plots:
        plot_curves({s.get("name"): [report]}, out)


def _setting_key(reports: Sequence[dict[str, Any]]) -> tuple:
    layer = reports[0]["setting"].get("layer")
    name = reports[0]["setting"].get("name") or ""
    if layer is None:
        return (0, 0, "" if name == "baseline" else name)
    if isinstance(layer, int):
        return (1, layer, name)
    return (2, 0, name)


def group_by_setting(reports: Sequence[dict[str, Any]]) -> Groups:
    """Reports per setting name, the baseline first, then by layer index, then the rest by name."""
    groups: Groups = {}
    for r in reports:
        groups.setdefault(r["setting"].get("name") or r["label"], []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: _setting_key(kv[1])))


def _setting_tables(groups: Groups, keys: list[str]) -> tuple[list[list[Any]], list[dict[str, Any]],
                                                                list[list[Any]], list[list[Any]]]:
    """Per setting: the Markdown row (mean ± std), the CSV record, the paired difference to the baseline
    (mean ± std) and its 95 % paired t-interval."""
    base = groups.get("baseline")
    base_by_seed = {r.get("seed"): summary_row(r) for r in base} if base else {}
    md_rows, csv_rows, delta_rows, interval_rows = [], [], [], []
    for name, g in groups.items():
        srows = [summary_row(r) for r in g]
        means = {k: results.mean_std([r[k] for r in srows if k in r]) for k in keys}
        md_rows.append([name, srows[0]["layer"], len(g)] + [results.fmt_mean_std(means[k], missing_std="")
                                                            for k in keys])
        csv_rows.append({"setting": name, "layer": srows[0]["layer"], "n": len(g),
                         **{f"{k}_mean": means[k][0] for k in keys}, **{f"{k}_std": means[k][1] for k in keys}})
        paired = [r for r in srows if r["seed"] in base_by_seed] if base and name != "baseline" else []
        if paired:
            d = {k: stats.paired_interval([r[k] - base_by_seed[r["seed"]][k] for r in paired
                                           if k in r and k in base_by_seed[r["seed"]]]) for k in keys}
            delta_rows.append([name, len(paired)] + [results.fmt_mean_std((d[k].mean, d[k].std), sign=True,
                                                                          missing_std="") for k in keys])
            interval_rows.append([name, len(paired)] + [stats.format_interval_verdict(d[k]) for k in keys])
    return md_rows, csv_rows, delta_rows, interval_rows


def _comparison_markdown(reports: Sequence[dict[str, Any]], table: str, titles: list[str],
                         delta_rows: list[list[Any]], interval_rows: list[list[Any]],
                         per_ckpt: list[list[Any]]) -> list[str]:
    first = reports[0]
    subset = ", a fixed subset" if first.get("test_subset") else ""
    eps = f"; FGSM eps {first['fgsm']['epsilon_255']:g}/255" if "fgsm" in first else ""
    md = ["# Evaluation: robustness, in-between samples, OOD, calibration, localisation", "",
          f"{len(reports)} checkpoint(s) of {first['model']} on {first['dataset']} ({first['test_size']} test "
          f"images{subset}){eps}. All numbers are %, mean ± sample std over seeds (no ± with one seed). Higher is "
          "better except ECE.", "", "## By setting", "", table]
    if delta_rows:
        md += ["", "## Difference to the baseline of the same seed (paired; positive = higher than baseline)", "",
               results.md_table(["setting", "pairs"] + titles, delta_rows),
               "", f"## {stats.INTERVAL_TITLE} (does it exclude 0?)", "",
               results.md_table(["setting", "pairs"] + titles, interval_rows), "", results.INTERVAL_NOTE]
    md += ["", "## Per checkpoint", "", results.md_table(["checkpoint", "setting", "seed"] + titles, per_ckpt),
           "", COLUMNS_NOTE]
    notes = sorted({n for r in reports for n in r.get("notes", [])})
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return md


def write_comparison(reports: Sequence[dict[str, Any]], out: Path, plots: bool) -> str:
    """comparison.md / .csv / _by_setting.csv and the cross-checkpoint plots; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    groups = group_by_setting(reports)
    rows = [summary_row(r) for g in groups.values()
            for r in sorted(g, key=lambda r: (r.get("seed") is None, r.get("seed")))]
    keys = [k for k in SUMMARY_KEYS if any(k in r for r in rows)]
    results.write_csv(out / "comparison.csv", rows, ["label", "setting", "layer", "seed"] + keys)
    md_rows, csv_rows, delta_rows, interval_rows = _setting_tables(groups, keys)
    results.write_csv(out / "comparison_by_setting.csv", csv_rows, list(csv_rows[0]))
    titles = [SUMMARY_KEYS[k][0] for k in keys]
    table = results.md_table(["setting", "layer", "n"] + titles, md_rows)
    per_ckpt = [[r["label"], r["setting"], r["seed"]] + [r.get(k) for k in keys] for r in rows]
    md = _comparison_markdown(reports, table, titles, delta_rows, interval_rows, per_ckpt)
    (out / "comparison.md").write_text("\n".join(md) + "\n")
    if plots:
        plot_curves(groups, out)
    return table


# plot file -> (measurement, x key, (panel key, panel title) x 2, y of one report's panel, x label, y label)
PLOTS = {
    "occlusion.png": ("occlusion", "sizes", (("center", "occlusion: center (hole zeroed)"),
                                             ("boundary", "occlusion: boundary (outside zeroed)")),
                      lambda section, key: section[key], "hole side s (pixels)", "top-1 accuracy (%)"),
    "inbetween.png": ("inbetween", "lams", (("cutmix", "in-between samples: CutMix-ed pairs"),
                                            ("mixup", "in-between samples: Mixup-ed pairs")),
                      lambda section, key: section[key]["major"], "lam (share of image A)",
                      "top-1 acc vs label of larger part (%)"),
}


def plot_curves(groups: Groups, out: Path) -> list[Path]:
    """occlusion.png and inbetween.png in `out` (one line per setting: mean ± std over its reports), where measured."""
    written = []
    for file, (metric, xs_key, panels, value, xlabel, ylabel) in PLOTS.items():
        measured = {name: [r[metric] for r in g if metric in r] for name, g in groups.items()}
        measured = {name: sections for name, sections in measured.items() if sections}
        if not measured:
            continue
        lines = [(title, {name: (s[0][xs_key], [value(x, key) for x in s]) for name, s in measured.items()})
                 for key, title in panels]
        written.append(results.plot_panels(lines, out / file, xlabel, ylabel))
    return written
