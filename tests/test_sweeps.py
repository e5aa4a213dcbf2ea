"""Multirun sweeps end to end: grid -> report, skip and resume, launchers, failures."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import KILL_MID_EPOCH_2, TINY, run_cli, start_train
from helpers import approx_csv

from flexexp.tracking import read_json

GRID = ["-m", *TINY, "pool=avg,flex", "sac=off,on", "seed=0,1"]


def records(runs: Path) -> list[dict]:
    return [read_json(p) for p in sorted(runs.rglob("result.json"))]


def checkpoint_mtimes(runs: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in runs.rglob("last.pt")}


@pytest.mark.slow
def test_grid_then_report_matches_the_run_records(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    t0 = time.time()
    first = run_cli([*GRID, f"paths.runs={runs}"], cwd=tmp_path)
    t_first = time.time() - t0
    assert first.returncode == 0, first.stderr
    recs = records(runs)
    assert len(recs) == 8 and all(r["status"] == "completed" for r in recs)
    assert {(r["pool"], r["sac"], r["seed"]) for r in recs} == {
        (p, s, k) for p in ("avg", "flex") for s in (False, True) for k in (0, 1)}

    rep = run_cli([f"paths.runs={runs}", f"out_dir={out}"], cwd=tmp_path,
                  module="flexexp.report")
    assert rep.returncode == 0, rep.stderr
    assert "Table 1" in rep.stdout and "Table 2" in rep.stdout
    for num, sac in ((1, False), (2, True)):
        table = pd.read_csv(out / f"table{num}.csv")
        assert list(table.columns) == ["dataset", "variant", "n", "mean", "std", "min", "max",
                                       "paper", "delta"]
        ours = table[table.dataset == "synthetic"].set_index("variant")
        assert sorted(ours.index) == ["avg", "flex"]
        for variant, row in ours.iterrows():
            accs = [r["test_acc"] for r in recs if r["pool"] == variant and r["sac"] == sac]
            mean = sum(accs) / len(accs)
            std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
            assert row.n == len(accs) == 2
            assert row["mean"] == approx_csv(mean)
            assert row["std"] == approx_csv(std)
            assert row["min"] == approx_csv(min(accs))
            assert row["max"] == approx_csv(max(accs))
            assert math.isnan(row.paper) and math.isnan(row.delta)
        # the paper's cells are there, empty (n=0), never zero
        paper = table[table.dataset == "cifar10"].set_index("variant")
        assert (paper.n == 0).all() and paper["mean"].isna().all()
        assert paper.loc["avg", "paper"] == {1: 91.63, 2: 89.31}[num]
        sig = pd.read_csv(out / f"significance{num}.csv").set_index("variant")
        diffs = [next(r["test_acc"] for r in recs if r["pool"] == "flex" and r["sac"] == sac
                      and r["seed"] == k)
                 - next(r["test_acc"] for r in recs if r["pool"] == "avg" and r["sac"] == sac
                        and r["seed"] == k) for k in (0, 1)]
        assert sig.loc["flex", "n_pairs"] == 2
        assert sig.loc["flex", "mean_diff"] == approx_csv(sum(diffs) / 2)
        assert (out / f"table{num}.md").read_text().count("synthetic") == 0  # labelled
        assert "Synthetic" in (out / f"table{num}.md").read_text()
        assert (out / f"figure{num}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same sweep again trains nothing
    before = checkpoint_mtimes(runs)
    t0 = time.time()
    again = run_cli([*GRID, f"paths.runs={runs}"], cwd=tmp_path)
    t_again = time.time() - t0
    assert again.returncode == 0, again.stderr
    assert (again.stdout + again.stderr).count("already completed") == 8
    assert checkpoint_mtimes(runs) == before
    print(f"first sweep {t_first:.1f} s, repeated sweep {t_again:.1f} s")


@pytest.mark.slow
def test_killed_cell_resumes_alone(tmp_path):
    runs = tmp_path / "runs"
    long = [*TINY, "trainer.epochs=10", "dataset.train_size=512", f"paths.runs={runs}"]
    # two cells done, then one long cell killed after its first checkpoint
    done = run_cli(["-m", *TINY, "pool=avg,flex", f"paths.runs={runs}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    before = checkpoint_mtimes(runs)
    proc = start_train([*long, "pool=flex_reg"], tmp_path, KILL_MID_EPOCH_2)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    killed = next((runs / "synthetic" / "flex_reg").rglob("cell.json")).parent
    assert not (killed / "result.json").exists()  # SIGKILL leaves no record, only last.pt

    rerun = run_cli(["-m", *TINY, "pool=avg,flex", f"paths.runs={runs}"], cwd=tmp_path)
    assert rerun.returncode == 0
    assert (rerun.stdout + rerun.stderr).count("already completed") == 2
    resumed = run_cli([*long, "pool=flex_reg"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    assert read_json(killed / "result.json")["status"] == "completed"
    after = checkpoint_mtimes(runs)
    assert {k: after[k] for k in before} == before  # nothing else was retrained


@pytest.mark.slow
def test_failing_cell_is_recorded_and_does_not_stop_the_sweep(tmp_path):
    runs = tmp_path / "runs"
    # the second cell asks for more images per batch than the dataset has
    proc = run_cli(["-m", *TINY, "trainer.batch_size=100000,64", f"paths.runs={runs}"],
                   cwd=tmp_path)
    assert proc.returncode != 0
    recs = {r["status"]: r for r in records(runs)}
    assert set(recs) == {"completed", "failed"}
    assert "trainer.batch_size=100000 is larger than the 256 training images" in \
        recs["failed"]["error"]
    assert (Path(recs["failed"]["run_dir"]) / "error.txt").exists()
    rep = run_cli([f"paths.runs={runs}", f"out_dir={tmp_path / 'out'}"], cwd=tmp_path,
                  module="flexexp.report")
    assert rep.returncode == 0
    failed = pd.read_csv(tmp_path / "out" / "failed.csv")
    assert len(failed) == 1 and failed.status[0] == "failed"
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert table[table.dataset == "synthetic"].n.tolist() == [1]  # the failure is not averaged


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
])
def test_launchers_complete_a_two_cell_sweep(tmp_path, launcher):
    runs = tmp_path / "runs"
    proc = run_cli(["-m", *launcher, *TINY, "pool=avg,flex", f"paths.runs={runs}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(runs)
    assert sorted(r["pool"] for r in recs) == ["avg", "flex"]
    assert all(r["status"] == "completed" for r in recs)


@pytest.mark.parametrize("name,datasets,sac", [
    ("table1", "cifar10,fashion_mnist,cifar100,tiny_imagenet", "off"),
    ("table2", "cifar10,fashion_mnist,cifar100,tiny_imagenet", "on"),
    ("paper", "cifar10,fashion_mnist,cifar100,tiny_imagenet", "off,on"),
    ("demo", None, "off,on"),
])
def test_experiment_presets_define_the_grids(name, datasets, sac):
    from conftest import make_cfg

    cfg = make_cfg([f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert params.get("dataset") == datasets
    assert params.pool == "avg,flex,flex_reg,flex_reg_dropout"
    assert params.sac == sac
    assert params.seed == "0,1,2"
    if name == "demo":
        assert cfg.dataset.name == "digits" and cfg.trainer.epochs == 15
