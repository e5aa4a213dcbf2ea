"""Seed-level statistics beside the paired t-test: a bootstrap interval and P(improvement).

Shared by the report's significance tables (:mod:`flexexp.report`) and the claims
(:mod:`flexexp.claims`). Torch-free; scipy is imported where it is used.

- :func:`bootstrap_interval`: a 95% bootstrap interval of the mean paired difference
  (``scipy.stats.bootstrap``, percentile method, a fixed seed: a pure function of the data);
- :func:`prob_improvement`: rliable's probability of improvement (Agarwal et al. 2021),
  ``P(X > Y) = 1/(n m) sum_i sum_j S(x_i, y_j)`` with ``S`` 1, 1/2 or 0 as ``x_i`` is
  above, equal to or below ``y_j``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BOOT_METHOD", "BOOT_RESAMPLES", "BOOT_SEED", "BOOT_COLUMNS", "bootstrap_interval",
           "prob_improvement", "paired_extras", "EMPTY_EXTRAS", "legend"]

# percentile, as rliable: BCa's jackknife acceleration is NaN (with a RuntimeWarning) on
# equal differences and unstable on 3 seeds; the percentile interval is defined for n >= 2
BOOT_METHOD = "percentile"
BOOT_RESAMPLES = 9999  # scipy's default
BOOT_SEED = 0  # a fresh numpy Generator per interval: no row depends on another's draws
#: The columns :func:`paired_extras` adds, in this order (after a table's own columns).
BOOT_COLUMNS = ["boot_lo", "boot_hi", "prob_improvement"]


def bootstrap_interval(diff: np.ndarray | list[float], confidence: float = 0.95
                       ) -> tuple[float, float]:
    """``(low, high)``: the bootstrap interval of the mean of ``diff``.

    Fewer than 2 differences: ``(nan, nan)`` (nothing to resample; the cells stay empty).
    All differences equal: exactly ``(d, d)``, every resample's mean being ``d`` (scipy is
    not called, so no rounding of a mean of equal numbers and no warning)."""
    from scipy import stats

    diff = np.asarray(diff, dtype=float)
    if diff.size < 2 or not np.isfinite(diff).all():
        return math.nan, math.nan
    if (diff == diff[0]).all():
        return float(diff[0]), float(diff[0])
    res = stats.bootstrap((diff,), np.mean, n_resamples=BOOT_RESAMPLES,
                          confidence_level=confidence, method=BOOT_METHOD,
                          rng=np.random.default_rng(BOOT_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def prob_improvement(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> float:
    """``P(X > Y)``: the fraction of pairs ``(x_i, y_j)`` with ``x_i > y_j``, ties counting
    one half (rliable's probability of improvement); nan when either sample is empty.

    Counted in integers (2 per win, 1 per tie) and divided once: exact up to that one
    rounding."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return math.nan
    wins = int((x[:, None] > y[None, :]).sum())
    ties = int((x[:, None] == y[None, :]).sum())
    return (2 * wins + ties) / (2 * x.size * y.size)


def paired_extras(base: pd.Series, other: pd.Series) -> dict[str, Any]:
    """:data:`BOOT_COLUMNS` of ``other`` against ``base`` (accuracies indexed by seed) on
    their common seeds: the bootstrap interval of the mean difference ``other - base`` and
    ``P(other > base)`` over those seeds."""
    seeds = sorted(set(base.index) & set(other.index))
    x = other.loc[seeds].to_numpy(dtype=float)
    y = base.loc[seeds].to_numpy(dtype=float)
    lo, hi = bootstrap_interval(x - y)
    return {"boot_lo": lo, "boot_hi": hi, "prob_improvement": prob_improvement(x, y)}


def legend(x: str, y: str) -> list[str]:
    """Markdown: one line on each statistic (a blank line between them), ``x`` against
    ``y`` (``"the variant"``, ``"AvgPool"``)."""
    return [
        f"*bootstrap 95%*: {BOOT_METHOD} interval of the mean paired difference "
        f"(scipy.stats.bootstrap over the seeds' differences, {BOOT_RESAMPLES} resamples, "
        f"numpy Generator seed {BOOT_SEED}; not BCa, unstable on 3 seeds and undefined on "
        "equal differences); empty below 2 pairs, [d, d] when every difference is d.", "",
        f"*P(better)*: probability of improvement (rliable, Agarwal et al. 2021): the fraction "
        f"of ({x}'s seed, {y}'s seed) pairs over the compared seeds in which {x} scores "
        "higher, ties counting 1/2."]


#: The same columns, empty: a comparison without pairs (not comparable, no common seed).
EMPTY_EXTRAS: dict[str, Any] = dict.fromkeys(BOOT_COLUMNS, math.nan)
