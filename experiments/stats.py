"""Paired t-intervals for the studies' and the evaluation's differences to the baseline, without scipy.

Seed k of every setting shares initial weights, data order and augmentation with seed k of the baseline, so
the differences d_k = setting_k - baseline_k are paired. Their 95 % t-interval is
mean(d) ± t(0.975, n - 1) · std(d) / √n. With n = 2 the quantile is 12.71 (one degree of freedom): a pair of
seeds rarely excludes 0, and the tables say so rather than call a difference resolved.

The quantile comes from the exact CDF of Student's t for an integer number of degrees of freedom (a finite
trigonometric sum, Abramowitz & Stegun 26.7.3-4), inverted by bisection, so `experiments` needs no scipy.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

LEVEL = 0.95
INTERVAL_TITLE = "95 % paired t-interval of Δ"
EXCLUDES_TITLE = "excludes 0?"
TOO_FEW = "n too small"


def _central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (a positive integer) degrees of freedom, t >= 0."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + (2·4)/(3·5) cos⁴θ + ...)), df - 2 powers of cos
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sinθ (1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ...), df - 2 powers of cos
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (0.5 < p < 1; df a positive integer).

    `t_quantile(0.975, 1)` = 12.706..., the two-sided 95 % factor for one degree of freedom."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must lie in (0.5, 1), got {p}")
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df}")
    df = int(df)
    target = 2 * p - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while _central_probability(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # bisection to the last bit of a double
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _central_probability(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class PairedInterval:
    """Mean, sample std and the t-interval of n paired differences (`low`/`high` are nan when n < 2)."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def defined(self) -> bool:
        """True when there are at least 2 differences (an interval needs one degree of freedom)."""
        return self.n >= 2 and self.low == self.low

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or wholly below 0."""
        return self.defined and (self.low > 0 or self.high < 0)


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> PairedInterval:
    """The `level` t-interval of the mean of `diffs`: mean ± t((1 + level)/2, n - 1) · std / √n."""
    n = len(diffs)
    if n == 0:
        return PairedInterval(0, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedInterval(1, mean, math.nan, math.nan, math.nan)
    std = statistics.stdev(diffs)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return PairedInterval(n, mean, std, mean - half, mean + half)


def format_interval(iv: PairedInterval) -> str:
    """'[-1.55, -0.12]' (two decimals, signed), or 'n too small' below 2 differences."""
    return f"[{iv.low:+.2f}, {iv.high:+.2f}]" if iv.defined else TOO_FEW


def format_excludes(iv: PairedInterval) -> str:
    """'yes', 'no: includes 0' or 'n too small'."""
    if not iv.defined:
        return TOO_FEW
    return "yes" if iv.excludes_zero else "no: includes 0"


def format_interval_verdict(iv: PairedInterval) -> str:
    """One cell: '[-1.55, -0.12] excludes 0', '[-9.1, +3.2] includes 0' or 'n too small'."""
    if not iv.defined:
        return TOO_FEW
    return f"{format_interval(iv)} {'excludes' if iv.excludes_zero else 'includes'} 0"
