"""Result rows (JSON lines + CSV), the Markdown summary with paired differences, and the plots; the table,
CSV, mean ± std and plotting helpers that the evaluation's reports (`experiments.evaluation.report`) share.

The summary compares every setting with the baseline *of the same seed*: runs of one seed share
initial weights, data order and augmentation, so the per-seed difference cancels most of the
seed-to-seed spread that would otherwise swamp effects of a point or less.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .stats import EXCLUDES_TITLE, INTERVAL_TITLE, format_excludes, format_interval, paired_interval

ROW_KEYS = (
    "study", "model", "dataset", "setting", "layer", "alpha", "variant", "kind", "cutmix_prob", "seed", "epochs",
    "train_size", "test_size", "batch_size", "lr", "best_top1_err", "best_top5_err", "best_epoch",
    "final_top1_err", "final_top5_err", "final_train_loss", "train_time_s", "eval_time_s", "compile_time_s",
    "compiled_graphs", "images_per_s", "world_size", "device", "threads", "config_hash", "finished_at",
)
INTERVAL_NOTE = ("*95 % paired t-interval of Δ*: mean(Δ) ± t(0.975, n − 1)·std(Δ)/√n over the n paired seeds "
                 "(t = 12.71 for n = 2, 4.30 for n = 3, 2.78 for n = 5); *excludes 0?* says whether it lies wholly "
                 "on one side of 0; with fewer than 2 pairs there is no interval (*n too small*).")
ERROR_KEYS = ("best_top1_err", "best_top5_err", "final_top1_err", "final_top5_err", "top1_err", "top5_err")
TIME_KEYS = ("train_time_s", "eval_time_s", "compile_time_s")


def exact_decimals(n: int) -> int | None:
    """Decimals that write every percentage 100*k/n exactly (n = 2^a 5^b); None when no finite number does."""
    for d in range(12):
        if 10 ** (d + 2) % n == 0:
            return d
    return None


def round_percent(value: float, n: int) -> float:
    """A percentage of `n` items (100*k/n) without float noise: exact decimals, else 10 significant digits."""
    d = exact_decimals(n) if n > 0 else None
    return round(value, d) if d is not None else float(f"{value:.10g}")


def round_row(row: dict[str, Any]) -> dict[str, Any]:
    """What was measured, without float noise: errors to their exact resolution (100/test_size %), train
    accuracy to 100/train_size %, losses to float32's 7 significant digits, times to ms, throughput to 0.1."""
    out = dict(row)
    test_n, train_n = row.get("test_size") or 0, row.get("train_size") or 0
    ddp = (row.get("world_size") or 1) > 1  # DDP trims the epoch to a multiple of the world size

    def fix(key: str, v: Any) -> Any:
        if not isinstance(v, float) or v != v or v in (math.inf, -math.inf):
            return v
        if key in ERROR_KEYS:
            return round_percent(v, test_n)
        if key == "train_acc":
            return round_percent(v, 0 if ddp else train_n)
        if key.endswith("loss"):
            return float(f"{v:.7g}")
        if key in TIME_KEYS:
            return round(v, 3)
        return round(v, 1) if key == "images_per_s" else v
    for k, v in row.items():
        out[k] = fix(k, v)
    if isinstance(row.get("history"), list):
        out["history"] = [{k: fix(k, v) for k, v in e.items()} for e in row["history"]]
    return out


def append_row(out: str | Path, row: dict[str, Any]) -> None:
    """Append one run to results.jsonl (all keys, as computed) and, rounded (`round_row`), to results.csv
    (`ROW_KEYS`, or the columns of the file's existing header).

    The JSON lines keep each float as computed: the summary's means are taken from them, and a mean that
    falls exactly on a tie at its second decimal (17.625 from 18.12 and 17.13) is printed as it always was
    only from the values as computed (rounded first, 17.625 prints as 17.62; as computed, 17.63)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    row = round_row(row)
    csv_path = out / "results.csv"
    header = None
    if csv_path.exists() and csv_path.stat().st_size > 0:
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), None)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or ROW_KEYS, extrasaction="ignore")
        if header is None:
            w.writeheader()
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


def load_rows(out: str | Path) -> list[dict[str, Any]]:
    """All rows of results.jsonl (a truncated last line from a killed run is skipped)."""
    path = Path(out) / "results.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std) of `xs`; std is nan for one value, both are nan for none."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def summarize(rows: Iterable[dict[str, Any]], order: Sequence[str] | None = None,
              baseline: str = "baseline") -> list[dict[str, Any]]:
    """Per setting: seeds, mean/std of final and best errors, and paired differences to the baseline.

    Δ = setting - baseline of the same seed (negative: the setting has lower error). `interval` is the 95 %
    paired t-interval of the final top-1 Δ (`experiments.stats.paired_interval`); `wins` counts seeds where the
    setting's final top-1 error is lower than the baseline's.
    """
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], {})[r["seed"]] = r  # a later row of the same run wins
    names = [n for n in (order or by) if n in by]
    base = by.get(baseline, {})
    stats = []
    for name in names:
        runs = by[name]
        first = next(iter(runs.values()))
        s: dict[str, Any] = {"setting": name, "n": len(runs), "seeds": sorted(runs),
                             "layer": first.get("layer"), "alpha": first.get("alpha"), "variant": first.get("variant")}
        for key in ("final_top1_err", "best_top1_err", "final_top5_err", "best_top5_err"):
            s[key] = mean_std([r[key] for r in runs.values()])
        paired = sorted(set(runs) & set(base)) if name != baseline else []
        s["n_pairs"] = len(paired)
        for key in ("final_top1_err", "best_top1_err"):
            d = [runs[k][key] - base[k][key] for k in paired]
            s["diff_" + key] = mean_std(d)
        d = [runs[k]["final_top1_err"] - base[k]["final_top1_err"] for k in paired]
        s["wins"] = sum(x < 0 for x in d)
        s["interval"] = paired_interval(d)
        stats.append(s)
    return stats


def fmt_mean_std(ms: tuple[float, float], sign: bool = False, missing_std: str = " ± –") -> str:
    """'m ± s' with two decimals ('+' shown with `sign`); `missing_std` stands for a nan std; '–' for a nan mean."""
    m, s = ms
    if m != m:
        return "–"
    head = f"{m:+.2f}" if sign else f"{m:.2f}"
    return f"{head} ± {s:.2f}" if s == s else head + missing_std


def _cell(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else ("–" if v is None else str(v))


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats with two decimals, None as '–', anything else as str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str]) -> Path:
    """Write `rows` (dicts; missing keys as empty cells) under a header of `fieldnames`; returns the path."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames), restval="")
        w.writeheader()
        w.writerows(rows)
    return Path(path)


SUMMARY_HEADER = ("setting", "n", "final top-1 err", "best top-1 err", "final top-5 err",
                  "Δ final top-1 vs baseline (paired)", "Δ best top-1 (paired)", "lower than baseline",
                  INTERVAL_TITLE, EXCLUDES_TITLE)


def markdown_table(stats: Sequence[dict[str, Any]], baseline: str = "baseline") -> str:
    """The summary table (errors in %, mean ± sample std over seeds)."""
    rows = []
    for s in stats:
        is_base = s["setting"] == baseline
        delta = "(reference)" if is_base else fmt_mean_std(s["diff_final_top1_err"], sign=True)
        delta_best = "" if is_base else fmt_mean_std(s["diff_best_top1_err"], sign=True)
        wins = "" if is_base else f"{s['wins']}/{s['n_pairs']}"
        interval = "" if is_base else format_interval(s["interval"])
        excludes = "" if is_base else format_excludes(s["interval"])
        rows.append([s["setting"], s["n"], fmt_mean_std(s["final_top1_err"]), fmt_mean_std(s["best_top1_err"]),
                     fmt_mean_std(s["final_top5_err"]), delta, delta_best, wins, interval, excludes])
    return md_table(SUMMARY_HEADER, rows)


def write_summary(out: str | Path, stats: Sequence[dict[str, Any]], header: str = "",
                  baseline: str = "baseline") -> Path:
    """Write summary.md: a short header, the table and how to read it."""
    notes = (
        "Errors are test errors in %, mean ± sample std over seeds. *final*: after the last epoch; *best*: the "
        "lowest error among the evaluations during training (the paper's convention; optimistic, since it is "
        "chosen on the test set). Δ = setting − baseline of the same seed (negative = fewer errors), mean ± std "
        f"of the per-seed differences. {INTERVAL_NOTE} *lower than baseline*: seeds where the final top-1 error "
        "is below the baseline's.")
    path = Path(out) / "summary.md"
    path.write_text(f"{header}\n\n{markdown_table(stats, baseline)}\n\n{notes}\n")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: plotting is optional)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return Path(path)


def _baseline_band(ax: Any, stats: Sequence[dict[str, Any]], key: str, baseline: str) -> None:
    base = next((s for s in stats if s["setting"] == baseline), None)
    if base is None or base[key][0] != base[key][0]:
        return
    m, sd = base[key]
    ax.axhline(m, ls="--", color="gray", label=f"baseline ({m:.2f})")
    if sd == sd:
        ax.axhspan(m - sd, m + sd, color="gray", alpha=0.15, lw=0)


def _label_error_axes(ax: Any, stats: Sequence[dict[str, Any]], key: str, title: str) -> None:
    ax.set_ylabel("top-1 error (%)" if "top1" in key else "top-5 error (%)")
    n = max((s["n"] for s in stats), default=0)
    ax.set_title(f"{title} (n = {n})", fontsize=9)
    ax.legend(fontsize=8)


def plot_curve(stats: Sequence[dict[str, Any]], x_key: str, path: str | Path, xlabel: str, title: str,
               key: str = "final_top1_err", log_x: bool = False, baseline: str = "baseline") -> Path:
    """Figure-3 style: error vs `x_key` (layer index or alpha), std error bars, baseline dashed with band."""
    pts = sorted((float(s[x_key]), *s[key]) for s in stats
                 if s["setting"] != baseline and isinstance(s.get(x_key), (int, float)))
    fig, ax = pyplot().subplots(figsize=(5, 3.6), dpi=120)
    _baseline_band(ax, stats, key, baseline)
    if pts:
        xs, ms, sds = zip(*pts)
        ax.errorbar(xs, ms, yerr=[0 if v != v else v for v in sds], marker="o", capsize=3, color="C3", label="CutMix")
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel)
    _label_error_axes(ax, stats, key, title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bars(stats: Sequence[dict[str, Any]], path: str | Path, title: str, key: str = "final_top1_err",
              baseline: str = "baseline") -> Path:
    """One bar per setting (mean, std error bars), the baseline as a dashed line with its band."""
    fig, ax = pyplot().subplots(figsize=(max(4.0, 0.8 * len(stats) + 1.5), 3.6), dpi=120)
    _baseline_band(ax, stats, key, baseline)
    names = [s["setting"] for s in stats]
    ms = [s[key][0] for s in stats]
    sds = [0 if s[key][1] != s[key][1] else s[key][1] for s in stats]
    ax.bar(range(len(stats)), ms, yerr=sds, capsize=3, color=["gray" if n == baseline else "C3" for n in names])
    ax.set_xticks(range(len(stats)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    finite = [m - s for m, s in zip(ms, sds) if m == m]
    if finite:
        ax.set_ylim(bottom=max(0.0, min(finite) - 2))
    _label_error_axes(ax, stats, key, title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_panels(panels: Sequence[tuple[str, dict[str, tuple[Sequence[float], list[list[float]]]]]],
                path: str | Path, xlabel: str, ylabel: str) -> Path:
    """Side-by-side panels (title, {line label: (x, one y list per run)}): per line the mean, a ±std band."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), dpi=120, sharey=True,
                                  squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for i, (label, (xs, ys)) in enumerate(lines.items()):
            t = torch.tensor(ys, dtype=torch.float64)
            m = t.mean(0)
            ax.plot(xs, m.tolist(), marker="o", ms=3, label=f"{label} (n={len(ys)})", color=f"C{i % 10}")
            if len(ys) > 1:
                sd = t.std(0)
                ax.fill_between(xs, (m - sd).tolist(), (m + sd).tolist(), alpha=0.15, color=f"C{i % 10}", lw=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)

