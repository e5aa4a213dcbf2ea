"""The recipe probe's tables (python -m flexexp.probe) against the records they read."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from helpers import make_cfg
from omegaconf import OmegaConf

from flexexp.probe import main


def write(runs: Path, pool: str, lr: float, epochs: int, test_acc: float | None,
          status: str = "completed", **over: str) -> None:
    cfg = OmegaConf.to_container(make_cfg(["experiment=fmnist_probe", f"pool={pool}",
                                           f"optim.lr={lr}", f"trainer.epochs={epochs}",
                                           *(f"{k}={v}" for k, v in over.items())]),
                                 resolve=True)
    run = runs / "fashion_mnist" / pool / "sac_off" / f"seed0-{lr}-{epochs}"
    run.mkdir(parents=True)
    hist = [{"epoch": e + 1, "lr": lr, "train_loss": 1.0 / (e + 1), "train_acc": 50.0 + e,
             "test_acc": test_acc} for e in range(epochs)]
    rec = {"dataset": "fashion_mnist", "pool": pool, "sac": False, "seed": 0, "epochs": epochs,
           "status": status, "test_acc": test_acc, "history": hist, "config": cfg,
           "device": "cpu", "device_name": "x86_64", "torch_version": "2.x",
           "wall_time_s": 1.0}
    (run / "result.json").write_text(json.dumps(rec))


def test_probe_tables_by_pool_lr_and_steps(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    accs = {("avg", 0.1, 1): 10.5, ("avg", 0.1, 3): 73.0, ("avg", 0.01, 1): 60.0,
            ("flex_reg_dropout", 0.1, 1): 11.0}
    for (pool, lr, epochs), acc in accs.items():
        write(runs, pool, lr, epochs, acc)
    write(runs, "avg", 0.01, 3, None, status="failed")
    assert main([f"paths.runs={runs}", f"out_dir={out}"]) == 0
    probe = pd.read_csv(out / "probe.csv")
    assert len(probe) == 5
    # 20,000 training images at batch 1000: 20 steps an epoch
    row = probe[(probe.pool == "avg") & (probe.lr == 0.1) & (probe.epochs == 3)].iloc[0]
    assert row.steps == 60 and row.test_acc == 73.0 and row.train_acc == 52.0
    assert row.run_dir == "fashion_mnist/avg/sac_off/seed0-0.1-3"  # relative to paths.runs
    curves = pd.read_csv(out / "curves.csv")
    avg60 = curves[(curves.pool == "avg") & (curves.budget_steps == 60) & (curves.lr == 0.1)]
    assert avg60.step.tolist() == [20, 40, 60]
    readme = (out / "README.md").read_text()
    assert "| pool | peak LR | 20 steps | 60 steps |" in readme
    assert "| avg | 0.1 | 10.5 | 73.0 |" in readme
    assert "| avg | 0.01 | 60.0 | — |" in readme  # the failed run is not a number
    assert "| flex_reg_dropout | 0.1 | 11.0 | — |" in readme
    assert "**not a reproduction**" in readme
    assert "python -m flexexp.train experiment=fmnist_probe" in readme
    assert "seed0-0.01-3: failed" in readme
    assert "dataset.train_size=20000" in readme and "Measured on: cpu (x86_64), torch 2.x" in readme
    assert capsys.readouterr().out.startswith("# Recipe probe")


def test_probe_refuses_runs_that_differ_in_more_than_the_grid(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    write(runs, "avg", 0.1, 1, 10.0)
    write(runs, "avg", 0.01, 1, 60.0, **{"dataset.train_size": 10000})
    assert main([f"paths.runs={runs}", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "dataset.train_size takes 10000, 20000" in err and not out.exists()
    assert main([f"paths.runs={tmp_path / 'none'}"]) == 2
    assert "experiment=fmnist_probe" in capsys.readouterr().err
    assert main(["bogus=1"]) == 2
