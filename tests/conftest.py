"""pytest hooks and fixtures; the helpers tests import live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import REAL_FMNIST, REPO

# Under pytest-xdist (scripts/test.sh) each worker takes its share of the CPUs: two
# workers with torch's default of one thread per CPU each would oversubscribe the
# machine, and OpenMP threads that wait for a busy core slow a step several times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (_cpus or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    """``realdata`` tests run only where the package's four files are installed, ``gpu``
    tests only where PyTorch sees a CUDA GPU."""
    _skip_marked(items, "realdata", _realdata_missing())
    if not torch.cuda.is_available():
        _skip_marked(items, "gpu", "no CUDA GPU (torch.cuda.is_available() is False)")


def _realdata_missing() -> str | None:
    """Why the ``realdata`` tests cannot run here, or None when they can."""
    from flexexp.data.paper import FMNIST_FILES

    if all((REAL_FMNIST / f"{f}.gz").is_file() for f in FMNIST_FILES):
        return None
    return f"no real Fashion-MNIST in {REAL_FMNIST}/ (apt-get install dataset-fashion-mnist)"


def _skip_marked(items, marker: str, reason: str | None) -> None:
    """Skip the tests marked ``marker`` with ``reason`` (nothing when it is None)."""
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_system_fashion_mnist(monkeypatch):
    """Tests on fixture files behave the same whether or not Debian's Fashion-MNIST
    package is installed: in-process, its folder is looked for where nothing is (the
    ``realdata`` tests and the tests of the copy point it where they need)."""
    from flexexp.data import paper

    monkeypatch.setattr(paper, "FMNIST_SYSTEM_DIR", REPO / "tests" / "no-system-fashion-mnist")
