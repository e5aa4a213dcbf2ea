"""flexexp.pairstats: the bootstrap interval and the probability of improvement, alone and in
the report's tables (significance*.csv, table*.md, claims.*) built from controlled records."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import approx_csv, gamma
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from test_report import write_record

from flexexp.pairstats import (
    BOOT_COLUMNS,
    BOOT_METHOD,
    BOOT_RESAMPLES,
    BOOT_SEED,
    bootstrap_interval,
    paired_extras,
    prob_improvement,
)
from flexexp.report import SIG_COLUMNS, report


def exact_prob(x: list[int], y: list[int]) -> Fraction:
    """rliable's P(X > Y) in exact rationals: the definition, term by term."""
    s = sum(Fraction(1) if a > b else Fraction(1, 2) if a == b else Fraction(0)
            for a in x for b in y)
    return s / (len(x) * len(y))


# ---------------------------------------------------------------------------- P(X > Y)


def test_prob_improvement_by_hand_with_ties():
    # x=3 beats 2, 2, 0; x=2 ties 2, 2 and beats 0; x=1 beats 0 only: 5 wins, 2 ties of 9
    assert exact_prob([3, 2, 1], [2, 2, 0]) == Fraction(5 * 2 + 2, 2 * 9) == Fraction(2, 3)
    # integers counted, then one correctly rounded division: the float nearest 2/3, exactly
    assert prob_improvement([3, 2, 1], [2, 2, 0]) == float(Fraction(2, 3))
    assert prob_improvement([2, 2, 0], [3, 2, 1]) == float(Fraction(1, 3))
    # samples of different sizes: 1 ties 1, beats 0, loses to 2 (twice): 2 wins, 2 ties of 6
    assert prob_improvement([1, 1], [1, 0, 2]) == 0.5
    assert prob_improvement([5.0], [5.0]) == 0.5  # all ties
    assert prob_improvement([6.0, 7.0], [1.0, 2.0]) == 1.0
    assert math.isnan(prob_improvement([], [1.0])) and math.isnan(prob_improvement([1.0], []))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=7),
       st.lists(st.integers(0, 4), min_size=1, max_size=7))
def test_prob_improvement_is_the_definition(x, y):
    # small integers: many ties; every count is exact, so only the final division rounds
    assert prob_improvement(x, y) == float(exact_prob(x, y))


# ---------------------------------------------------------------------------- bootstrap


DIFFS = [0.5, 1.0, 2.5, -0.25, 1.75]  # binary fractions: the data are exact


def test_bootstrap_interval_is_scipys_with_the_fixed_seed():
    lo, hi = bootstrap_interval(DIFFS)
    ref = stats.bootstrap((np.asarray(DIFFS),), np.mean, n_resamples=BOOT_RESAMPLES,
                          method=BOOT_METHOD, rng=np.random.default_rng(BOOT_SEED))
    # the same call on the same data in the same process: the same numbers, bit for bit
    assert (lo, hi) == (ref.confidence_interval.low, ref.confidence_interval.high)
    assert bootstrap_interval(DIFFS) == (lo, hi)  # reproducible: a fresh Generator each call
    assert bootstrap_interval(np.asarray(DIFFS)) == (lo, hi)


def test_bootstrap_interval_contains_the_mean_and_stays_within_the_data():
    lo, hi = bootstrap_interval(DIFFS)
    mean = sum(DIFFS) / len(DIFFS)  # 1.1 to one rounding, far inside the interval
    assert lo < mean < hi
    # percentiles of resample means: each a mean of 5 values in [min, max], computed with
    # at most 6 roundings relative to max|d|
    tol = gamma(len(DIFFS) + 1, torch.float64) * max(abs(d) for d in DIFFS)
    assert min(DIFFS) - tol <= lo and hi <= max(DIFFS) + tol


@pytest.mark.parametrize("diff,expect", [
    ([], (math.nan, math.nan)),
    ([1.25], (math.nan, math.nan)),  # one pair: nothing to resample
    ([0.3, 0.3], (0.3, 0.3)),  # equal differences: exactly [d, d], no rounded mean
    ([0.3, 0.3, 0.3], (0.3, 0.3)),
    ([-2.0] * 5, (-2.0, -2.0)),
])
def test_degenerate_cases_are_empty_or_exact_without_warnings(diff, expect):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = bootstrap_interval(diff)
    assert all(math.isnan(g) if math.isnan(e) else g == e
               for g, e in zip(got, expect, strict=True)), got


@pytest.mark.parametrize("diff", [[0.0, 1.0], [1.0, 1.0 + 2**-40, 1.0]])
def test_two_pairs_and_nearly_equal_differences_give_an_interval_without_warnings(diff):
    # [1, 1 + 2^-40, 1]: not equal, so scipy resamples them; the interval is about [1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = bootstrap_interval(diff)
    tol = gamma(len(diff) + 1, torch.float64) * max(abs(d) for d in diff)
    assert min(diff) - tol <= lo <= hi <= max(diff) + tol


def test_paired_extras_pairs_on_the_common_seeds():
    base = pd.Series({0: 90.0, 1: 91.0, 2: 92.0, 7: 50.0})  # seed 7 has no partner
    other = pd.Series({2: 95.0, 0: 91.0, 1: 91.0, 9: 10.0})  # nor has seed 9
    out = paired_extras(base, other)
    assert list(out) == BOOT_COLUMNS
    assert (out["boot_lo"], out["boot_hi"]) == bootstrap_interval([1.0, 0.0, 3.0])
    assert out["prob_improvement"] == float(exact_prob([91, 91, 95], [90, 91, 92]))


# ---------------------------------------------------------------------------- the report


def _grid(runs: Path) -> None:
    """cifar10: FlexPool paired differences 1, 0, 3 (ties with AvgPool); FlexPool+Reg all 2
    (equal differences); digits: one seed of each (one pair)."""
    avg, flex, reg = [90.0, 91.0, 92.0], [91.0, 91.0, 95.0], [92.0, 93.0, 94.0]
    for seed in range(3):
        write_record(runs, "cifar10", "avg", False, seed, avg[seed])
        write_record(runs, "cifar10", "flex", False, seed, flex[seed])
        write_record(runs, "cifar10", "flex_reg", False, seed, reg[seed])
    write_record(runs, "digits", "avg", False, 0, 80.0)
    write_record(runs, "digits", "flex", False, 0, 79.0)


def test_report_writes_the_new_columns(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    _grid(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n=1 and equal differences: no warning either
        report(runs, out)
    header = (out / "significance1.csv").read_text().splitlines()[0].split(",")
    assert header == SIG_COLUMNS
    assert header[:9] == ["dataset", "variant", "n_pairs", "mean_diff", "ci95_low",
                          "ci95_high", "p_value", "significant", "note"]  # unchanged, first
    assert header[9:] == BOOT_COLUMNS == ["boot_lo", "boot_hi", "prob_improvement"]
    sig = pd.read_csv(out / "significance1.csv").set_index(["dataset", "variant"])
    flex = sig.loc[("cifar10", "flex")]
    lo, hi = bootstrap_interval([1.0, 0.0, 3.0])  # small integers: exact differences
    assert (flex.boot_lo, flex.boot_hi) == (approx_csv(lo), approx_csv(hi))
    assert flex.prob_improvement == approx_csv(2 / 3)  # 5 wins and 2 ties of 9 pairs
    reg = sig.loc[("cifar10", "flex_reg")]
    assert (reg.boot_lo, reg.boot_hi) == (2.0, 2.0)  # all differences 2: exact
    assert reg.prob_improvement == approx_csv(17 / 18)  # 8 wins, 1 tie (92 = 92)
    one = sig.loc[("digits", "flex")]
    assert one.n_pairs == 1 and math.isnan(one.boot_lo) and math.isnan(one.boot_hi)
    assert one.prob_improvement == 0.0  # 79 < 80
    md = (out / "table1.md").read_text()
    assert "| bootstrap 95% | P(better) |" in md
    assert f"|  | [{lo:.2f}, {hi:.2f}] | 0.67 |" in md
    assert "|  | [2.00, 2.00] | 0.94 |" in md
    assert "| Digits | FlexPool | 1 | -1.00 |  |  |  |  | 0.00 |" in md
    assert sum(line.startswith(("*bootstrap 95%*", "*P(better)*")) for line in md.splitlines()) \
        == 2  # one line of explanation each
    claims = pd.read_csv(out / "claims.csv").set_index(["claim", "dataset"])
    first = claims.loc[("FlexPool beats AvgPool (Table 1)", "cifar10")]
    assert (first.boot_lo, first.boot_hi) == (approx_csv(lo), approx_csv(hi))
    assert first.prob_improvement == approx_csv(2 / 3)


def test_the_report_is_a_pure_function_of_the_records(tmp_path):
    runs = tmp_path / "runs"
    _grid(runs)
    report(runs, tmp_path / "a")
    report(runs, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix in (".csv", ".md"))
    assert {"significance1.csv", "table1.md", "claims.csv", "claims.md"} <= set(names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
