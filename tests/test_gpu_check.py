"""scripts/gpu_check.sh: argument errors, the --dry-run of the GPU check (its steps at CPU
sizes: the gpu tier skips, the benchmark and the training cell run, the records are
written) and the --dry-run of the Fashion-MNIST grid (on fixture files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from datafiles import write_fashion_mnist
from helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHON": sys.executable}  # this interpreter, with this test run's packages
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


#: What every line of gpu-<device>.jsonl says, and what each kind of measurement adds.
LINE_KEYS = {"measurement", "setting", "ok", "rc", "timed_out", "wall_s", "device_name",
             "torch_version", "time"}
KIND_KEYS = {
    "gpu_tier": {"passed", "failed", "skipped", "error"},
    "bench": {"harness_img_s", "compute_bound_img_s", "reference_img_s", "harness_over_compute",
              "harness_over_reference", "precision", "channels_last", "compile", "peak_rss_mb",
              "epoch_images"},
    "train": {"status", "process_s", "s_per_epoch", "images_per_s", "setup_s", "first_step_s",
              "startup_s", "peak_gpu_mb", "precision", "channels_last", "compile", "epochs"},
}
MD_HEADER = ("| setting | images/s | harness/compute | s/epoch | process s (train) | setup_s "
             "| first_step_s | peak GPU MB |")


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_the_records(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    t0 = time.time()
    proc = gpu_check("--dry-run", "--out", str(out), "--runs", str(runs))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    print(f"dry run: {time.time() - t0:.1f} s")
    assert sorted(p.name for p in out.iterdir()) == ["gpu-cpu.jsonl", "gpu-cpu.md"]
    lines = [json.loads(line) for line in (out / "gpu-cpu.jsonl").read_text().splitlines()]
    assert [(r["measurement"], r["setting"]) for r in lines] == [
        ("gpu_tier", "tests/test_gpu.py"), ("bench", "defaults"), ("bench", "plain"),
        ("train", "defaults")]
    for r in lines:
        missing = (LINE_KEYS | KIND_KEYS[r["measurement"]]) - r.keys()
        assert not missing, (r["measurement"], missing)
        assert r["ok"] is True and r["rc"] == 0 and r["device_name"] == "cpu"
    tier, default, plain, train = lines
    # no GPU here: every test of the tier skips, none fails
    assert tier["skipped"] > 0 and tier["passed"] == tier["failed"] == tier["error"] == 0
    for r in (default, plain):
        assert r["harness_img_s"] > 0 and r["compute_bound_img_s"] > 0 and r["epoch_images"] == 200
    # on a CPU the defaults resolve to fp32, NCHW, eager: trainer=plain's settings
    assert (plain["precision"], plain["channels_last"], plain["compile"]) == (
        "float32", False, "none")
    assert train["status"] == "completed" and train["epochs"] == 2
    assert train["process_s"] > train["setup_s"] > 0 and train["first_step_s"] > 0
    assert train["peak_gpu_mb"] is None  # no GPU: nothing allocated there
    md = (out / "gpu-cpu.md").read_text().splitlines()
    assert md[0] == "# GPU check on cpu" and MD_HEADER in md
    rows = md[md.index(MD_HEADER) + 2:][:3]
    assert [r.split(" | ")[0] for r in rows] == ["| bench defaults", "| bench plain",
                                                  "| train defaults, 2 epochs"]
    assert proc.stdout.count(MD_HEADER) == 1  # the summary is printed too
    assert len(list(runs.rglob("result.json"))) == 1  # the cell's run, under --runs

