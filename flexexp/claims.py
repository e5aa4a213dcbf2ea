"""A verdict on every claim of the paper, from the runs (``claims.md``, ``claims.csv``).

Each claim compares two cells of the same dataset, paired by seed: ``b`` beats ``a``.
The paper's own difference (from its Tables 1 and 2) stands beside ours: the mean paired
difference over seeds, its 95% t-interval and the paired t-test's p-value; after them (not
read by the verdict) the bootstrap 95% interval of that mean and the probability of
improvement ``P(b > a)`` over the seeds (:mod:`flexexp.pairstats`). The verdict:

- **holds**: the interval lies above 0 (the same direction as the paper, beyond seed noise);
- **reversed**: the interval lies below 0;
- **not beyond seed noise**: the interval contains 0;
- **too few seeds**: fewer than 3 pairs, no verdict (two seeds give an interval too wide to
  mean anything, one none at all);
- **not comparable**: the two cells' runs differ in more than what the claim compares (the
  pool, and for the SAC claims the SAC section): the keys are named.

Claims (the paper's Sec. 4.3 and its tables): FlexPool beats AvgPool (Table 1; the text
says by 1.5-2%); +Reg adds to FlexPool and +Reg+Dropout to +Reg ("a consistent increase
across the columns", in both tables); SAC adds 0.75-2.3% to each FlexPool variant.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from flexexp import pairstats
from flexexp.files import diff_keys

__all__ = ["CLAIMS", "CLAIM_COLUMNS", "MIN_SEEDS", "build_claims", "verdict", "claims_markdown"]

MIN_SEEDS = 3
NAMES = {"avg": "AvgPool", "flex": "FlexPool", "flex_reg": "FlexPool+Reg",
         "flex_reg_dropout": "FlexPool+Reg+Dropout"}


def _claims() -> list[tuple[str, tuple[str, bool], tuple[str, bool]]]:
    """``(statement, a, b)`` with ``a``/``b`` = (variant, sac): the claim is b > a."""
    out = []
    steps = [("avg", "flex"), ("flex", "flex_reg"), ("flex_reg", "flex_reg_dropout")]
    for sac, table in ((False, "Table 1"), (True, "Table 2")):
        for a, b in steps:
            out.append((f"{NAMES[b]} beats {NAMES[a]} ({table})", (a, sac), (b, sac)))
    for var in ("flex", "flex_reg", "flex_reg_dropout"):
        out.append((f"SAC improves {NAMES[var]}", (var, False), (var, True)))
    return out


CLAIMS = _claims()
CLAIM_COLUMNS = ["claim", "dataset", "paper_diff", "n_pairs", "mean_diff", "ci95_low",
                 "ci95_high", "p_value", "verdict", *pairstats.BOOT_COLUMNS]


def verdict(n: int, low: float, high: float) -> str:
    """The verdict of a paired comparison from its 95% interval (see the module doc)."""
    if n < MIN_SEEDS:
        return f"too few seeds (n={n}; {MIN_SEEDS} needed)"
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "not beyond seed noise"


def _stats(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """Paired differences ``b - a`` on the common seeds: n, mean, 95% interval, p."""
    from scipy import stats

    seeds = sorted(set(a.index) & set(b.index))
    diff = (b.loc[seeds] - a.loc[seeds]).to_numpy(dtype=float)
    n = len(diff)
    out = {"n_pairs": n, "mean_diff": diff.mean() if n else math.nan, "ci95_low": math.nan,
           "ci95_high": math.nan, "p_value": math.nan}
    if n >= 2:
        sd = diff.std(ddof=1)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        out["ci95_low"], out["ci95_high"] = out["mean_diff"] - half, out["mean_diff"] + half
        if sd > 1e-4:  # as the report's significance tables: equal differences, no p
            out["p_value"] = float(stats.ttest_1samp(diff, 0.0).pvalue)
    return {**out, **pairstats.paired_extras(a, b)}


def _paper(paper: dict[bool, pd.DataFrame], ds: str, a: tuple[str, bool],
           b: tuple[str, bool]) -> float:
    def value(v: tuple[str, bool]) -> float:
        t = paper.get(v[1])
        if t is None or t.empty:
            return math.nan
        hit = t[(t.dataset == ds) & (t.variant == v[0])]["paper"]
        return float(hit.iloc[0]) if len(hit) else math.nan

    return value(b) - value(a)


def build_claims(done: pd.DataFrame, paper: dict[bool, pd.DataFrame]) -> pd.DataFrame:
    """One row per (claim, dataset) with runs of both cells. ``done``: completed runs, one
    config per (dataset, variant, sac) (the report's ``select_comparable``); ``paper``:
    the paper's table per SAC setting (``dataset, variant, paper``)."""
    rows = []
    for statement, a, b in CLAIMS:
        for ds in done.dataset.unique():
            cells = [done[(done.dataset == ds) & (done.variant == v) & (done.sac == s)]
                     for v, s in (a, b)]
            if any(c.empty for c in cells):
                continue
            row = {"claim": statement, "dataset": ds, "paper_diff": _paper(paper, ds, a, b)}
            keys = [k for k in diff_keys(json.loads(cells[0].compare_config.iloc[0]),
                                         json.loads(cells[1].compare_config.iloc[0]))
                    if not (a[1] != b[1] and k.split(".")[0] == "sac")]
            if keys:
                rows.append({**row, "n_pairs": 0, "mean_diff": math.nan, "ci95_low": math.nan,
                             "ci95_high": math.nan, "p_value": math.nan,
                             "verdict": f"not comparable: differs in {', '.join(keys)}",
                             **pairstats.EMPTY_EXTRAS})
                continue
            s = _stats(*(c.set_index("seed")["test_acc"] for c in cells))
            rows.append({**row, **s, "verdict": verdict(s["n_pairs"], s["ci95_low"],
                                                        s["ci95_high"])})
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def _f(x: float, digits: int = 2, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}g}"


def _interval(low: float, high: float) -> str:
    return "—" if math.isnan(low) else f"[{_f(low)}, {_f(high)}]"


def _prob(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"


def claims_markdown(claims: pd.DataFrame) -> str:
    """``claims.md``: one row per claim and dataset, with how to read it."""
    lines = ["# The paper's claims against these runs", "",
             "Differences in top-1 points, ours paired by seed (b minus a); the verdict reads our "
             "95% interval: **holds** (above 0), **reversed** (below 0), **not beyond seed "
             f"noise** (contains 0); fewer than {MIN_SEEDS} seeds give no verdict.", "",
             "| claim | dataset | paper | ours (mean) | 95% interval | p | n | verdict | "
             "bootstrap 95% | P(better) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in claims.iterrows():
        interval = _interval(r.ci95_low, r.ci95_high)
        lines.append(f"| {r.claim} | {r.dataset} | {_f(r.paper_diff)} | {_f(r.mean_diff)} | "
                     f"{interval} | {_f(r.p_value, 2, sign=False)} | {r.n_pairs} | "
                     f"{r.verdict} | {_interval(r.boot_lo, r.boot_hi)} | "
                     f"{_prob(r.prob_improvement)} |")
    if claims.empty:
        lines.append("| (no dataset has runs of both cells of any claim yet) | | | | | | | | | |")
    return "\n".join([*lines, "", *pairstats.legend("b", "a")]) + "\n"
