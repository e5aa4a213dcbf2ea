"""scripts/gpu_check.sh: argument errors, and the --dry-run of the Fashion-MNIST grid
(the GPU run's exact steps at CPU sizes, on fixture files)."""

from __future__ import annotations

import os
import subprocess

import pandas as pd
import pytest
from datafiles import write_fashion_mnist
from helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_gpu_check_refuses_unknown_grids_and_options():
    proc = gpu_check("--grid", "cifar10", "--dry-run")
    assert proc.returncode == 2 and "--grid fashion_mnist is the one grid so far" in proc.stderr
    proc = gpu_check("--bogus")
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr
    assert gpu_check("--help").stdout.startswith("GPU checks")


@pytest.mark.slow
def test_gpu_check_dry_run_trains_the_grid_and_writes_the_report(tmp_path):
    data, runs, out = tmp_path / "data", tmp_path / "runs", tmp_path / "out"
    write_fashion_mnist(data, n_train=300, n_test=100)
    proc = gpu_check("--grid", "fashion_mnist", "--dry-run", "--data-root", str(data),
                     "--runs", str(runs), "--out", str(out), "--",
                     "dataset.verify_checksums=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[gpu_check] grid trained in" in proc.stdout
    for num in (1, 2):  # 4 variants, one seed, beside the paper's numbers
        table = pd.read_csv(out / f"table{num}.csv")
        ours = table[table.dataset == "fashion_mnist"].set_index("variant")
        assert sorted(ours.index) == sorted(["avg", "flex", "flex_reg", "flex_reg_dropout"])
        assert (ours.n == 1).all() and ours.paper.notna().all()
    assert len(list(runs.rglob("result.json"))) == 8
