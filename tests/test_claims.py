"""flexexp.claims: a verdict on every claim of the paper, from controlled run records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import approx_f64

from flexexp.claims import MIN_SEEDS, verdict
from flexexp.report import report


def record(runs: Path, dataset: str, pool: str, sac: bool, seed: int, acc: float,
           epochs: int = 100) -> None:
    d = runs / dataset / pool / f"sac_{'on' if sac else 'off'}" / f"seed{seed}-{epochs}"
    d.mkdir(parents=True)
    cfg = {"dataset": {"name": dataset}, "pool": {"name": pool},
           "sac": {"name": "on" if sac else "off", "enabled": sac,
                   "weights": [0.1, 0.2, 0.7] if sac else [1.0]},
           "trainer": {"epochs": epochs}, "seed": seed}
    (d / "result.json").write_text(json.dumps({
        "dataset": dataset, "pool": pool, "sac": sac, "seed": seed, "epochs": epochs,
        "status": "completed", "test_acc": acc, "config": cfg}))


@pytest.mark.parametrize("n,low,high,expect", [
    (3, 0.1, 0.5, "holds"), (3, -0.5, -0.1, "reversed"), (5, -0.1, 0.4, "not beyond seed noise"),
    (2, 0.1, 0.5, "too few seeds (n=2; 3 needed)"), (0, math.nan, math.nan, "too few seeds"),
])
def test_verdict_reads_the_interval(n, low, high, expect):
    assert verdict(n, low, high).startswith(expect)


def test_claims_on_a_controlled_grid(tmp_path):
    runs = tmp_path / "runs"
    # cifar10, 3 seeds: FlexPool beats AvgPool by 1.0 +- 0.1 (holds); +Reg against FlexPool
    # +-0.5 around 0 (noise); +Reg+Dropout below +Reg by 1.0 +- 0.1 (reversed)
    base = [90.0, 91.0, 92.0]
    for seed, b in enumerate(base):
        record(runs, "cifar10", "avg", False, seed, b)
        record(runs, "cifar10", "flex", False, seed, b + 1.0 + 0.1 * (seed - 1))
        record(runs, "cifar10", "flex_reg", False, seed, b + 1.0 + [0.5, -0.5, 0.25][seed])
        record(runs, "cifar10", "flex_reg_dropout", False, seed,
               b + 1.0 + [0.5, -0.5, 0.25][seed] - 1.0 - 0.1 * (seed - 1))
    # fashion_mnist, 2 seeds only: no verdict
    for seed in range(2):
        record(runs, "fashion_mnist", "avg", False, seed, 90.0 + seed)
        record(runs, "fashion_mnist", "flex", False, seed, 95.0 + seed)
    out = report(runs, tmp_path / "out")
    claims = out["claims"].set_index(["claim", "dataset"])
    first = claims.loc[("FlexPool beats AvgPool (Table 1)", "cifar10")]
    assert first.verdict == "holds" and first.n_pairs == 3
    assert first.mean_diff == approx_f64(1.0, 8)  # three differences of values near 92
    assert first.paper_diff == approx_f64(91.91 - 91.63, 2)  # the paper's Table 1
    assert claims.loc[("FlexPool+Reg beats FlexPool (Table 1)", "cifar10")].verdict == \
        "not beyond seed noise"
    assert claims.loc[("FlexPool+Reg+Dropout beats FlexPool+Reg (Table 1)", "cifar10")].verdict \
        == "reversed"
    few = claims.loc[("FlexPool beats AvgPool (Table 1)", "fashion_mnist")]
    assert few.verdict.startswith("too few seeds") and few.n_pairs == 2 < MIN_SEEDS
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "| FlexPool beats AvgPool (Table 1) | cifar10 | +0.28 | +1.00 |" in md
    csv = (tmp_path / "out" / "claims.csv").read_text().splitlines()
    assert csv[0] == ("claim,dataset,paper_diff,n_pairs,mean_diff,ci95_low,ci95_high,p_value,"
                      "verdict,boot_lo,boot_hi,prob_improvement")


def test_sac_claims_pair_the_same_variant_and_other_settings_are_not_comparable(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        record(runs, "cifar10", "flex", False, seed, 90.0 + seed)
        record(runs, "cifar10", "flex", True, seed, 91.0 + seed + 0.1 * seed)
        record(runs, "cifar10", "flex_reg", False, seed, 90.0 + seed, epochs=100)
        record(runs, "cifar10", "flex_reg", True, seed, 95.0 + seed, epochs=4)
    with pytest.warns(UserWarning, match="differ from flex's in trainer.epochs"):
        claims = report(runs, tmp_path / "out")["claims"].set_index(["claim", "dataset"])
    assert claims.loc[("SAC improves FlexPool", "cifar10")].verdict == "holds"
    other = claims.loc[("SAC improves FlexPool+Reg", "cifar10")]
    assert other.verdict == "not comparable: differs in trainer.epochs" and other.n_pairs == 0


def test_each_table_says_which_recipe_its_runs_followed(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        record(runs, "cifar10", "avg", False, seed, 90.0 + seed)
    report(runs, tmp_path / "paper")
    assert "(recipe: the paper's)" in (tmp_path / "paper" / "table1.md").read_text()
    code = tmp_path / "code"
    record(code, "cifar10", "flex_softmax", False, 0, 91.0)
    path = next(code.rglob("result.json"))
    rec = json.loads(path.read_text())
    rec["config"]["model"] = {"block": "authors"}
    path.write_text(json.dumps(rec))
    report(code, tmp_path / "code-out")
    assert "(recipe: the authors' code)" in (tmp_path / "code-out" / "table1.md").read_text()
    # both under one root: never averaged together, and the report says so
    (runs / "code").mkdir()
    path.rename(runs / "code" / "result.json")
    with pytest.warns(UserWarning) as caught:
        report(runs, tmp_path / "mixed")
    text = " ".join(str(w.message) for w in caught)
    assert "runs of 2 recipes under one root" in text
    assert "differ from avg's in model" in text  # and the two are not paired
