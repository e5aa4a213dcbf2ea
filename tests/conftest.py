"""Shared test helpers: compose the real config, run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from flexexp.config import compose_config

# Under pytest-xdist (scripts/test.sh) each worker takes its share of the CPUs: two
# workers with torch's default of one thread per CPU each would oversubscribe the
# machine, and OpenMP threads that wait for a busy core slow a step several times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (_cpus or 1) // _WORKERS))

REPO = Path(__file__).resolve().parent.parent

#: Overrides that shrink a run to seconds on a CPU.
TINY = [
    "dataset=synthetic",
    "dataset.image_size=16",
    "dataset.train_size=256",
    "dataset.test_size=128",
    "trainer.batch_size=64",
    "trainer.epochs=1",
    "trainer.progress=false",
    "trainer.device=cpu",
    "trainer.threads=1",
]


def make_cfg(overrides: list[str] | None = None, return_hydra_config: bool = False
             ) -> DictConfig:
    """The real composed config (conf/config.yaml) with ``overrides`` applied."""
    return compose_config(list(overrides or []), return_hydra_config)


def run_cli(args: list[str], cwd: Path, module: str = "flexexp.train",
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` in ``cwd`` the way a user does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


#: Code for :func:`start_train`: SIGKILL the run at the third batch of its second epoch,
#: right after its first checkpoint, at the same step on any machine however fast (a
#: timed kill can land after a fast machine has finished the run).
KILL_MID_EPOCH_2 = """
import os, signal
import flexexp.tracking as tracking
from flexexp.data.loader import DeviceLoader
_saved = {"n": 0}
_real_write, _real_iter = tracking.atomic_write_bytes, DeviceLoader.__iter__
def _counting_write(path, data):
    _real_write(path, data)
    if str(path).endswith("last.pt"):
        _saved["n"] += 1
def _dying_iter(self):
    for i, batch in enumerate(_real_iter(self)):
        if self.train and _saved["n"] >= 1 and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch
tracking.atomic_write_bytes = _counting_write
DeviceLoader.__iter__ = _dying_iter
"""


def start_train(args: list[str], cwd: Path, extra_code: str = "") -> subprocess.Popen:
    """Start ``python -m flexexp.train args`` in the background, with ``extra_code`` run
    first in the same process (fault injection: see :data:`KILL_MID_EPOCH_2`)."""
    code = f"{extra_code}\nimport sys\nsys.argv = ['flexexp.train', *{args!r}]\n" \
           "from flexexp.train import main\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


#: Where Debian's package dataset-fashion-mnist puts the real files (the realdata tests').
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def pytest_collection_modifyitems(config, items):
    """``realdata`` tests run only where the package's four files are installed."""
    from flexexp.data.paper import FMNIST_FILES

    if all((REAL_FMNIST / f"{f}.gz").is_file() for f in FMNIST_FILES):
        return
    skip = pytest.mark.skip(reason=f"no real Fashion-MNIST in {REAL_FMNIST}/ (apt-get install "
                                   "dataset-fashion-mnist)")
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_system_fashion_mnist(monkeypatch):
    """Tests on fixture files behave the same whether or not Debian's Fashion-MNIST
    package is installed: in-process, its folder is looked for where nothing is (the
    ``realdata`` tests and the tests of the copy point it where they need)."""
    from flexexp.data import paper

    monkeypatch.setattr(paper, "FMNIST_SYSTEM_DIR", REPO / "tests" / "no-system-fashion-mnist")


@pytest.fixture
def cfg_factory():
    return make_cfg
