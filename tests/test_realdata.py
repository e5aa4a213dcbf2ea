"""The real Fashion-MNIST, from Debian's package dataset-fashion-mnist (``realdata``
tests: skipped where the package is not installed; `.ci/run` installs it).

The figures are the published dataset's: 60,000 + 10,000 images of 28x28, 6,000 (train)
and 1,000 (test) per class, pixel mean 0.2860 and std 0.3530 on [0, 1], and the MD5s of
the unpacked IDX files (the package recompressed the .gz archives, so those differ from
the upstream ones)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import REAL_FMNIST, TINY, run_cli
from omegaconf import OmegaConf

from flexexp.config import compose_config
from flexexp.data import paper
from flexexp.data.sources import load_arrays
from flexexp.tracking import read_json

pytestmark = pytest.mark.realdata

SIZES = {"train-images-idx3-ubyte": 47_040_016, "train-labels-idx1-ubyte": 60_008,
         "t10k-images-idx3-ubyte": 7_840_016, "t10k-labels-idx1-ubyte": 10_008}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> tuple[Path, str]:
    """``python -m flexexp.data download dataset=fashion_mnist`` into a fresh root, as a
    user runs it (the package's files copied, checksums on); the root and its output."""
    root = tmp_path_factory.mktemp("real")
    proc = run_cli(["download", "dataset=fashion_mnist", f"dataset.root={root}"], cwd=root,
                   module="flexexp.data")
    assert proc.returncode == 0, proc.stderr
    return root, proc.stdout + proc.stderr


def spec(root: Path, *overrides: str):
    return OmegaConf.to_object(compose_config(
        ["dataset=fashion_mnist", f"dataset.root={root}", "dataset.download=false",
         *overrides]).dataset)


def test_download_copies_the_package_and_the_content_is_the_published_one(root):
    root, output = root
    raw = root / paper.FMNIST_FOLDER
    for name in paper.FMNIST_FILES:
        assert f"copied {raw / name}.gz from {REAL_FMNIST / name}.gz" in output
        assert (raw / name).stat().st_size == SIZES[name]
        assert paper.md5_of(raw / name) == paper.FMNIST_CONTENT_MD5[name]
    assert "fashion_mnist: ready, 60000 train / 10000 test images at 32x32" in output


def test_real_splits_classes_and_pixel_statistics(root):
    root, _ = root
    arrays = load_arrays(spec(root))  # dataset.verify_checksums defaults to true
    assert arrays.x_train.shape == (60_000, 1, 32, 32)
    assert arrays.x_test.shape == (10_000, 1, 32, 32)
    assert arrays.x_train.dtype == torch.uint8
    assert arrays.y_train.bincount(minlength=10).tolist() == [6000] * 10
    assert arrays.y_test.bincount(minlength=10).tolist() == [1000] * 10
    assert arrays.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    border = arrays.x_train.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0  # 28x28 zero-padded to 32x32
    # mean and std of the 28x28 pixels on [0, 1]: integer sums (exact), then float64;
    # the published figures are rounded to 4 decimals
    x = arrays.x_train[:, :, 2:30, 2:30].to(torch.int64)
    n = x.numel()
    s1, s2 = int(x.sum()), int((x * x).sum())
    mean = s1 / n / 255
    std = math.sqrt(s2 / n / 255**2 - mean**2)
    assert abs(mean - 0.2860) <= 0.5e-4 and abs(std - 0.3530) <= 0.5e-4
    # the padded images' statistics, which conf/dataset/fashion_mnist.yaml normalises with
    cfg = spec(root)
    m32 = s1 / (n / 28**2 * 32**2) / 255
    sd32 = math.sqrt(s2 / (n / 28**2 * 32**2) / 255**2 - m32**2)
    assert abs(m32 - cfg.mean[0]) <= 0.5e-4 and abs(sd32 - cfg.std[0]) <= 0.5e-4


def test_a_short_run_on_real_data_learns(root, tmp_path):
    """2,000 training images, 2 epochs of 20 steps at batch 100, Adam at peak LR 0.01:
    the test accuracy on 1,000 real test images must exceed 50%. Chance is 10%, and a
    chance-level model's accuracy on 1,000 images has a standard deviation of 0.95
    points, so 50% is over 40 standard deviations above chance; the same run reached
    67.5% and 64.4% (seeds 0 and 1) on a 2-core CPU, so a healthy pipeline clears it by
    a wide margin too."""
    root, _ = root
    runs = tmp_path / "runs"
    overrides = [o for o in TINY if not o.startswith(("dataset", "trainer.batch_size",
                                                       "trainer.epochs"))]
    proc = run_cli([*overrides, "dataset=fashion_mnist", f"dataset.root={root}",
                    "dataset.download=false", "dataset.train_size=2000",
                    "dataset.test_size=1000", "trainer.batch_size=100", "trainer.epochs=2",
                    "optim.lr=0.01", f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = runs.rglob("result.json")
    rec = read_json(result)
    assert rec["status"] == "completed" and rec["dataset"] == "fashion_mnist"
    assert rec["config"]["dataset"]["verify_checksums"] is True
    assert rec["test_acc"] > 50, f"{rec['test_acc']:.1f}% after 40 steps (chance 10%)"
