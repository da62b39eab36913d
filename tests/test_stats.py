"""The paired t-intervals of the study summaries and the evaluation's comparison, against scipy."""
from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from experiments import stats
from experiments.evaluation.report import write_comparison


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 19, 30, 31, 60, 120, 1000])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995, 0.9995])
def test_t_quantile_matches_scipy(df, p):
    assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-10)


def test_t_quantile_rejects_what_it_cannot_answer():
    for p, df in ((0.5, 3), (1.0, 3), (0.3, 3), (0.975, 0), (0.975, 2.5)):
        with pytest.raises(ValueError):
            stats.t_quantile(p, df)


@pytest.mark.parametrize("diffs", [[-0.48 - 0.97, -0.48 + 0.97], [-1.0, -1.0, -0.5], [0.3, -0.2, 0.9, 1.4, 0.1],
                                   [2.0, 2.5, 1.5, 2.2, 1.9, 2.1, 2.4, 1.8, 2.3, 2.0]])
def test_paired_interval_matches_scipy(diffs):
    n = len(diffs)
    mean = sum(diffs) / n
    sem = scipy_stats.sem(diffs)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    iv = stats.paired_interval(diffs)
    assert iv.n == n and iv.mean == pytest.approx(mean) and iv.std == pytest.approx(sem * math.sqrt(n))
    assert (iv.low, iv.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert iv.excludes_zero == (low > 0 or high < 0)


def test_two_seeds_need_a_large_ratio():
    # Δ = -0.60 ± 0.37 over two seeds passed the old "|mean| > 2 SE" rule; its 95 % t-interval holds 0
    iv = stats.paired_interval([-0.60 - 0.37 / math.sqrt(2), -0.60 + 0.37 / math.sqrt(2)])
    assert abs(iv.mean) > 2 * iv.std / math.sqrt(2) and not iv.excludes_zero
    assert stats.format_excludes(iv) == "no: includes 0"
    assert stats.format_interval(iv) == "[-3.92, +2.72]"
    assert stats.format_interval_verdict(iv) == "[-3.92, +2.72] includes 0"
    far = stats.paired_interval([-2.0, -2.1])
    assert far.excludes_zero and stats.format_excludes(far) == "yes"
    assert stats.format_interval_verdict(far) == "[-2.69, -1.41] excludes 0"


def test_fewer_than_two_pairs_give_no_interval():
    for diffs in ([], [-1.5]):
        iv = stats.paired_interval(diffs)
        assert not iv.defined and not iv.excludes_zero and iv.low != iv.low
        assert stats.format_interval(iv) == stats.format_excludes(iv) == "n too small"
    assert stats.paired_interval([-1.5]).mean == -1.5


def test_no_spread_gives_a_point_interval():
    iv = stats.paired_interval([-1.0, -1.0])
    assert (iv.low, iv.high) == (-1.0, -1.0) and iv.excludes_zero
    assert not stats.paired_interval([0.0, 0.0]).excludes_zero


def _report(setting, seed, acc):
    return {"label": f"{setting}_seed{seed}", "setting": {"name": setting, "layer": None if setting == "baseline"
                                                          else 0}, "seed": seed, "clean_acc": acc,
            "model": "m", "dataset": "d", "test_size": 100}


def test_evaluation_comparison_prints_the_interval(tmp_path):
    reports = [_report("baseline", 0, 80.0), _report("baseline", 1, 82.0), _report("baseline", 2, 81.0),
               _report("layer0", 0, 81.0), _report("layer0", 1, 83.1), _report("layer0", 2, 82.05),
               _report("layer1", 0, 90.0)]
    write_comparison(reports, tmp_path, plots=False)
    md = (tmp_path / "comparison.md").read_text()
    iv = stats.paired_interval([1.0, 1.1, 1.05])
    assert f"## {stats.INTERVAL_TITLE}" in md
    assert f"| layer0 | 3 | {stats.format_interval(iv)} excludes 0 |" in md
    assert "| layer1 | 1 | n too small |" in md
