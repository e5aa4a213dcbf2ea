"""The report as a pure function of run records (no training here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import gamma
from scipy import stats

from flexexp.report import main, report


def write_record(runs: Path, dataset: str, pool: str, sac: bool, seed: int, acc: float | None,
                 status: str = "completed", epochs: int = 100, **extra) -> Path:
    d = runs / dataset / pool / f"sac_{'on' if sac else 'off'}" / f"seed{seed}-{epochs:08x}"
    d.mkdir(parents=True)
    rec = {"dataset": dataset, "pool": pool, "sac": sac, "seed": seed, "epochs": epochs,
           "status": status, "test_acc": acc,
           "config": {"dataset": {"name": dataset}, "pool": {"name": pool},
                      "trainer": {"epochs": epochs, "device": "cpu"}, "seed": seed}, **extra}
    (d / "result.json").write_text(json.dumps(rec))
    return d


def test_tables_statistics_and_paper_columns(tmp_path):
    runs = tmp_path / "runs"
    accs = {"avg": [91.0, 91.5, 92.0], "flex": [92.0, 92.1, 93.3]}
    for pool, values in accs.items():
        for seed, acc in enumerate(values):
            write_record(runs, "cifar10", pool, False, seed, acc)
    out = report(runs, tmp_path / "out")
    t1 = out["table1"].set_index(["dataset", "variant"])
    row = t1.loc[("cifar10", "flex")]
    assert row.n == 3
    # float64 statistics of values near 92 computed in two orders: a few roundings
    # relative to the values' size (a deviation from the mean cancels their leading
    # digits, so the error scales with max|x|, not with the std)
    big = max(max(v) for v in accs.values())
    tol = gamma(16, torch.float64) * big
    assert row["mean"] == pytest.approx(sum(accs["flex"]) / 3, rel=0, abs=tol)
    assert row["std"] == pytest.approx(pd.Series(accs["flex"]).std(ddof=1), rel=0, abs=tol)
    assert (row["min"], row["max"]) == (92.0, 93.3)
    assert row.paper == 91.91 and row.delta == pytest.approx(row["mean"] - 91.91, rel=0, abs=tol)
    # no runs: missing, never zero
    empty = t1.loc[("cifar100", "avg")]
    assert empty.n == 0 and math.isnan(empty["mean"]) and empty.paper == 66.18
    assert out["table2"].n.sum() == 0
    # paired test against AvgPool
    sig = out["significance1"].set_index("variant").loc["flex"]
    diffs = [b - a for a, b in zip(accs["avg"], accs["flex"], strict=True)]
    assert sig.mean_diff == pytest.approx(sum(diffs) / 3, rel=0, abs=tol)
    # p = 2 sf(|t|, 2): t moves by |t| * tol / sd(diffs) at most, p by pdf(t) times that,
    # and the special function is accurate to a few dozen ulps
    ref = stats.ttest_rel(accs["flex"], accs["avg"])
    sd = pd.Series(diffs).std(ddof=1)
    dt = abs(ref.statistic) * 2 * tol / sd
    p_tol = 2 * stats.t.pdf(ref.statistic, 2) * dt + gamma(64, torch.float64) * ref.pvalue
    assert sig.p_value == pytest.approx(ref.pvalue, rel=0, abs=p_tol)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert (sig.ci95_low, sig.ci95_high) == pytest.approx((sig.mean_diff - half,
                                                           sig.mean_diff + half), rel=0, abs=tol)
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "| CIFAR10 | 91.50 ± 0.50 (3) *paper 91.63* |" in md
    assert "| CIFAR100 | — *paper 66.18* |" in md


def test_failed_and_malformed_records(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, "cifar10", "avg", True, 0, 90.0)
    write_record(runs, "cifar10", "avg", True, 1, None, status="failed",
                 error="DivergenceError: NaN at epoch 3")
    bad = write_record(runs, "cifar10", "avg", True, 2, 95.0)
    (bad / "result.json").write_text('{"dataset": "cifar10", "pool"')  # truncated
    partial = write_record(runs, "cifar10", "avg", True, 3, 95.0)
    (partial / "result.json").write_text(json.dumps({"dataset": "cifar10"}))
    with pytest.warns(UserWarning) as caught:
        out = report(runs, tmp_path / "out")
    messages = " ".join(str(w.message) for w in caught)
    assert str(bad / "result.json") in messages and str(partial / "result.json") in messages
    row = out["table2"].set_index(["dataset", "variant"]).loc[("cifar10", "avg")]
    assert row.n == 1 and row["mean"] == 90.0  # only the completed, readable run
    failed = pd.read_csv(tmp_path / "out" / "failed.csv")
    assert failed.error.tolist() == ["DivergenceError: NaN at epoch 3"]


def test_different_configs_are_never_averaged(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_record(runs, "cifar10", "flex", False, seed, 90.0 + seed, epochs=100)
    write_record(runs, "cifar10", "flex", False, 0, 10.0, epochs=1)  # a smoke test run
    with pytest.warns(UserWarning, match="2 different configs"):
        out = report(runs, tmp_path / "out")
    row = out["table1"].set_index(["dataset", "variant"]).loc[("cifar10", "flex")]
    assert row.n == 3 and row["mean"] == 91.0  # (90 + 91 + 92) / 3: exact


def test_auto_settings_are_told_apart_by_what_ran(tmp_path):
    # trainer.precision=auto is bf16 on a GPU and fp32 on a CPU: the same config, but not
    # the same computation. The record's resolved settings keep them apart; an explicit
    # fp32 run (trainer=plain) and an `auto` one on a CPU computed the same and may mix.
    runs = tmp_path / "runs"
    ran = {"precision": "bfloat16", "channels_last": True, "compile": "reduce-overhead"}
    for seed in range(3):
        write_record(runs, "cifar10", "flex", False, seed, 90.0 + seed, **ran)
    cpu = {"precision": "float32", "channels_last": False, "compile": "none"}
    write_record(runs, "cifar10", "flex", False, 3, 10.0, **cpu)
    with pytest.warns(UserWarning, match="2 different configs"):
        out = report(runs, tmp_path / "out")
    row = out["table1"].set_index(["dataset", "variant"]).loc[("cifar10", "flex")]
    assert row.n == 3 and row["mean"] == 91.0


def test_cli_arguments(tmp_path, capsys):
    assert main([f"paths.runs={tmp_path / 'missing'}"]) == 2
    assert "no runs directory" in capsys.readouterr().err
    assert main(["runs=x"]) == 2
    assert "unknown argument 'runs=x'" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    assert main([f"paths.runs={tmp_path / 'runs'}", f"out_dir={tmp_path / 'o'}"]) == 0
    assert (tmp_path / "o" / "table1.csv").exists()


def test_report_needs_no_torch(tmp_path):
    import subprocess
    import sys

    write_record(tmp_path / "runs", "cifar10", "avg", False, 0, 91.0)
    code = ("import sys; from flexexp.report import main; "
            f"assert main(['paths.runs={tmp_path / 'runs'}', 'out_dir={tmp_path / 'o'}']) == 0; "
            "assert 'torch' not in sys.modules and 'hydra' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def write_pools_record(runs: Path, pool: str, downsample: str | None, seed: int, acc: float,
                       params: int, images_per_s: float = 1280.0, dataset: str = "digits",
                       status: str = "completed") -> Path:
    d = runs / dataset / pool / "sac_off" / f"seed{seed}-{downsample or 'none'}"
    d.mkdir(parents=True)
    model = {"name": "resnet20"} | ({"downsample": downsample} if downsample else {})
    rec = {"dataset": dataset, "pool": pool, "sac": False, "seed": seed, "epochs": 15,
           "status": status, "test_acc": acc if status == "completed" else None,
           "num_params": params, "images_per_s": images_per_s,
           "config": {"dataset": {"name": dataset}, "pool": {"name": pool}, "model": model,
                      "trainer": {"epochs": 15, "batch_size": 128}, "seed": seed}}
    (d / "result.json").write_text(json.dumps(rec))
    return d


def test_table3_related_pools(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    # no related runs: no table 3
    write_record(runs, "cifar10", "avg", False, 0, 91.0)
    assert "table3" not in report(runs, out) and not (out / "table3.md").exists()
    base = 269_722
    for seed in range(3):
        write_pools_record(runs, "avg", None, seed, 96.0 + seed, base)  # an old record: stride
        write_pools_record(runs, "gfgp", "stride", seed, 97.0, base + 4096, images_per_s=640.0)
        write_pools_record(runs, "avg", "s3pool", seed, 95.0 + seed / 2, base)
    write_pools_record(runs, "avg", "gfgp", 0, 0.0, base + 5120, status="failed")
    tables = report(runs, out)
    t3 = tables["table3"]
    assert list(t3.columns) == ["dataset", "sac", "pool", "downsample", "n", "mean", "std",
                                "min", "max", "params", "extra_params", "step_ms"]
    assert set(t3.dataset) == {"digits"}  # only datasets with related runs
    rows = t3.set_index(["pool", "downsample"])
    assert list(rows.index) == [("avg", "stride"), ("gfgp", "stride"), ("avg", "gfgp"),
                                ("avg", "s3pool")]
    avg = rows.loc[("avg", "stride")]
    # small integers: every sum, deviation and square is exact, so are the statistics
    assert avg.n == 3 and avg["mean"] == 97.0 and avg["std"] == 1.0
    assert avg.extra_params == 0 and avg.step_ms == 100.0  # 1000 * 128 / 1280 img/s: exact
    gfgp = rows.loc[("gfgp", "stride")]
    assert gfgp.extra_params == 4096 and gfgp.step_ms == 200.0
    s3 = rows.loc[("avg", "s3pool")]
    assert (s3["min"], s3["max"], s3.n) == (95.0, 96.0, 3)
    assert rows.loc[("avg", "gfgp")].n == 0  # the failed cell is listed, never averaged
    assert math.isnan(rows.loc[("avg", "gfgp")]["mean"])
    md = (out / "table3.md").read_text()
    assert "| Digits | off | GFGP | stride conv | 97.00 ± 0.00 (3) |" in md
    assert "| Digits | off | AvgPool | S3Pool | 95.50 ± 0.50 (3) | 95.00 | 96.00 | 269,722 | +0 |" \
        in md
    assert pd.read_csv(out / "table3.csv").shape == (4, 12)
    # Tables 1 and 2 keep ResNet20's strided downsampling only: the s3pool runs stay out
    t1 = tables["table1"].set_index(["dataset", "variant"])
    assert t1.loc[("digits", "avg")].n == 3 and t1.loc[("digits", "avg")]["mean"] == 97.0
    assert main([f"paths.runs={runs}", f"out_dir={out}"]) == 0
    assert "Table 3: related pools" in capsys.readouterr().out
