"""End-to-end training: the CLI, the run record, TensorBoard, determinism, resume, skip."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import (
    KILL_MID_EPOCH_2,
    TINY,
    approx_csv,
    interrupt_in_epoch_2,
    make_cfg,
    only_run_dir,
    run_cli,
    start_train,
    unit_roundoff,
)

from flexexp import trainer
from flexexp.config import cell_name
from flexexp.models import DOWNSAMPLE_OPTIONS
from flexexp.tracking import read_json

RESULT_KEYS = {
    "dataset", "pool", "sac", "seed", "epochs", "status", "test_acc", "test_acc_aux", "history",
    "num_params", "wall_time_s", "images_per_s", "device", "torch_version", "git_commit",
}


def test_cli_one_epoch_writes_complete_record_and_tensorboard(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli([*TINY, "pool=flex_reg", "sac=on", f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run_dir(runs)
    # the directory names the cell
    assert run_dir.relative_to(runs).as_posix().startswith("synthetic/flex_reg/sac_on/seed0-")
    rec = read_json(run_dir / "result.json")
    assert RESULT_KEYS <= rec.keys()
    assert rec["status"] == "completed"
    assert (rec["dataset"], rec["pool"], rec["sac"], rec["epochs"]) == ("synthetic", "flex_reg",
                                                                        True, 1)
    assert set(rec["test_acc_aux"]) == {"stage1", "stage2"}
    assert 0 <= rec["test_acc"] <= 100 and len(rec["history"]) == 1
    assert rec["history"][0]["penalty"] is not None
    assert rec["device"] == "cpu" and rec["torch_version"] == torch.__version__
    assert (run_dir / "config.yaml").exists() and (run_dir / "last.pt").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train.log").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/beta1", "train/penalty", "train/loss_stage1",
                "test/acc_main", "test/acc_stage2"):
        assert tag in tags["scalars"], tag
    assert "train/momentum" not in tags["scalars"]  # Adam's is beta1
    # TensorBoard stores float32: one rounding of the record's float64
    assert acc.Scalars("test/acc_main")[0].value == pytest.approx(
        rec["test_acc"], rel=unit_roundoff(torch.float32), abs=0)
    assert acc.Scalars("train/beta1")[0].value == pytest.approx(
        rec["history"][0]["beta1"], rel=unit_roundoff(torch.float32), abs=0)
    assert any(t.startswith("flexpool/") for t in tags["images"])

    # a second start of the same cell skips it
    again = run_cli([*TINY, "pool=flex_reg", "sac=on", f"paths.runs={runs}"], cwd=tmp_path)
    assert again.returncode == 0
    assert "already completed" in again.stdout + again.stderr
    assert read_json(run_dir / "result.json")["wall_time_s"] == rec["wall_time_s"]


def test_top5_for_many_classes(tmp_path):
    cfg = make_cfg([*TINY, "dataset.num_classes=20", "sac=on"])
    rec = trainer.run(cfg, tmp_path / "run")
    assert 0 <= rec["test_acc"] <= rec["test_top5"] <= 100
    for head in ("stage1", "stage2"):
        assert rec["test_acc_aux"][head] <= rec["test_top5_aux"][head] <= 100


def test_same_seed_gives_identical_results(tmp_path):
    cfg = make_cfg([*TINY, "pool=flex", "trainer.epochs=2"])
    a = trainer.run(cfg, tmp_path / "a")
    b = trainer.run(cfg, tmp_path / "b")
    assert a["test_acc"] == b["test_acc"]
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    c = trainer.run(make_cfg([*TINY, "pool=flex", "trainer.epochs=2", "seed=1"]), tmp_path / "c")
    assert c["history"][-1]["train_loss"] != a["history"][-1]["train_loss"]


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    cfg = make_cfg([*TINY, "pool=flex_reg_dropout", "sac=on", "trainer.epochs=3"])
    ref = trainer.run(cfg, tmp_path / "ref")
    ref_state = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)

    interrupt_in_epoch_2(cfg, tmp_path / "cut", monkeypatch)  # after epoch 1's checkpoint
    rec = read_json(tmp_path / "cut" / "result.json")
    assert rec["status"] == "interrupted" and "simulated kill" in rec["error"]
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1

    resumed = trainer.run(cfg, tmp_path / "cut")
    assert resumed["status"] == "completed"
    assert resumed["test_acc"] == ref["test_acc"]
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in ref_state["model"].items():
        assert torch.equal(v, state["model"][k]), k


def test_run_dir_of_another_config_is_refused(tmp_path):
    trainer.run(make_cfg(TINY), tmp_path / "run")
    with pytest.raises(Exception, match="different config .*trainer.epochs"):
        trainer.run(make_cfg([*TINY, "trainer.epochs=2"]), tmp_path / "run")
    assert read_json(tmp_path / "run" / "result.json")["status"] == "completed"


def test_corrupt_checkpoint_is_moved_aside(tmp_path):
    cfg = make_cfg(TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")
    rec = trainer.run(cfg, run_dir)
    assert rec["status"] == "completed"
    aside = list(run_dir.glob("last.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"not a checkpoint"


def test_bad_config_on_cli_exits_2_with_one_paragraph(tmp_path):
    proc = run_cli([*TINY, "trainer.epochs=0", f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.epochs=0 is outside its range [1, inf)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(["pool=flexx"], cwd=tmp_path)
    assert proc.returncode == 2 and "Did you mean 'flex'" in proc.stderr


def test_cell_name_matches_run_dir(tmp_path):
    cfg = make_cfg([*TINY, "pool=flex"])
    proc = run_cli([*TINY, "pool=flex", f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / cell_name(cfg) / "result.json").exists()
    json.loads((tmp_path / cell_name(cfg) / "cell.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sac", ["off", "on"])
@pytest.mark.parametrize("pool", ["avg", "flex", "flex_reg", "flex_reg_dropout", "flex_softmax"])
def test_every_variant_learns_digits(tmp_path, pool, sac):
    cfg = make_cfg([f"pool={pool}", f"sac={sac}", "trainer.epochs=8", "trainer.progress=false",
                    "trainer.device=cpu"])
    rec = trainer.run(cfg, tmp_path / "run")
    assert rec["test_acc"] > 80.0, rec["history"][-1]  # chance is 10%


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("option", [
    "pool=max", "pool=gfgp", *(f"model.downsample={d}" for d in DOWNSAMPLE_OPTIONS),
])
def test_each_option_trains_on_digits(option, tmp_path):
    from flexexp.trainer import run

    cfg = make_cfg([option, "trainer.epochs=6", "trainer.progress=false", "trainer.device=cpu"])
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "completed"
    assert record["config"]["model"]["downsample"] == cfg.model.downsample
    assert record["test_acc"] > 60, f"{option}: {record['test_acc']:.1f}% (chance 10%)"


def test_torchrun_with_multirun_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flexexp.train", "-m", *TINY, "pool=avg,flex"],
                          cwd=tmp_path, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "a sweep (-m) under it" in proc.stderr


# ---------------------------------------------------------------------------- sweeps (-m)


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
    assert (again.stdout + again.stderr).count("already completed, skipped") == 8  # done lines
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
    assert (rerun.stdout + rerun.stderr).count("already completed, skipped") == 2
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
    from helpers import make_cfg

    cfg = make_cfg([f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert params.get("dataset") == datasets
    assert params.pool == "avg,flex,flex_reg,flex_reg_dropout"
    assert params.sac == sac
    assert params.seed == "0,1,2"
    if name == "demo":
        assert cfg.dataset.name == "digits" and cfg.trainer.epochs == 15
