"""Shared test helpers: the real config and CLI, fault injection, and tolerances.

Tolerances follow from the dtype and the size of the computation.

A floating-point result may differ from machine to machine (another kernel, thread count,
instruction set or summation order), so no test compares one against a number that
happened to pass on one machine. The bounds here are the standard a-priori error bounds
of floating-point arithmetic (Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., sec. 3.1 and 4.2), which hold for every summation order a kernel may choose
(recursive, pairwise, blocked, with or without FMA):

- each operation rounds with a relative error of at most the unit roundoff
  ``u = eps / 2`` of its dtype;
- a chain of ``n`` such roundings is bounded by ``gamma_n = n u / (1 - n u)``;
- a sum of ``n`` terms, or an inner product of length ``n``, computed in any order, is
  within ``gamma_n * sum_i |term_i|`` of the exact value (eq. 3.5 and 4.4).

A test computes the exact value in float64 (whose own error is bounded the same way with
float64's ``u``) and asserts the result lies within the bound. The bound is rigorous but
not tight: a correct kernel lands far inside it, and a wrong formula far outside.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from flexexp.config import compose_config
from flexexp.models import resnet20

__all__ = [
    "REPO", "TINY", "REAL_FMNIST", "KILL_MID_EPOCH_2", "make_cfg", "run_cli", "start_train",
    "only_run_dir",
    "DOWN_ARGS", "net", "n_params", "avg2", "max2", "avg2_bound",
    "unit_roundoff", "gamma", "sum_error_bound", "softmax_sum_bound", "assert_within",
    "approx_f64", "approx_csv",
]


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: bounds ``n`` successive roundings."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"gamma_{n} is undefined in {dtype}: n * u = {nu} >= 1"
    return nu / (1 - nu)


def sum_error_bound(abs_terms: Tensor | float, n: int, dtype: torch.dtype) -> Tensor | float:
    """Bound on ``|computed - exact|`` for a sum (or inner product) of ``n`` terms in
    ``dtype`` whose absolute values sum to ``abs_terms``: ``gamma_n * abs_terms``."""
    return gamma(n, dtype) * abs_terms


def softmax_sum_bound(abs_sum: Tensor | float, n: int, z_abs: float, dtype: torch.dtype
                      ) -> Tensor | float:
    """Bound for ``sum_q x_q softmax_q(z)`` over ``n`` terms in ``dtype``, ``|z_q| <= z_abs``,
    ``abs_sum = sum_q |x_q| softmax_q(z)`` (at most ``max |x|``).

    Rounding ``z_q = lam x_q`` and ``z_q - max z`` moves each exponent by at most
    ``3 z_abs u`` (``|z_q - max z| <= 2 z_abs``), which ``exp`` turns into that relative
    error (``e^(z + d) = e^z e^d``); ``exp`` itself adds at most 2 u (within 1 ulp). The
    normaliser is a sum of ``n`` such terms (``gamma_n`` more) and one division divides
    them: each weight is within ``2 (3 z_abs + 2) u + gamma_(n+1)``; the weighted sum adds
    one product and ``n`` additions, and a ratio of two window means (GFGP's local form)
    two divisions more. ``ceil`` keeps every count an integer."""
    k = 2 * (3 * math.ceil(z_abs) + 2) + 2 * n + 6
    return gamma(k, dtype) * abs_sum


def assert_within(actual: Tensor, exact: Tensor, bound: Tensor | float, what: str = "") -> None:
    """Assert ``|actual - exact| <= bound`` elementwise, the difference taken in float64.

    ``bound`` (a number or a tensor broadcastable to ``actual``) must cover both sides:
    the computation under test and, where ``exact`` is itself a float64 computation,
    its own rounding (:func:`sum_error_bound` with ``torch.float64``)."""
    assert actual.shape == exact.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}")
    err = (actual.double() - exact.double()).abs()
    allowed = torch.as_tensor(bound, dtype=torch.float64).broadcast_to(err.shape)
    worst = int((err - allowed).flatten().argmax())
    assert (err <= allowed).all(), (
        f"{what}: |actual - exact| = {err.flatten()[worst].item():.3e} exceeds the bound "
        f"{allowed.flatten()[worst].item():.3e} at flat index {worst}"
    )


def approx_f64(value: float, ops: int) -> object:
    """``pytest.approx`` for a float64 value that went through ``ops`` roundings on
    either side of the comparison (Python float arithmetic, pandas, a JSON round trip
    that prints ``repr`` and parses it back exactly): relative tolerance ``gamma_ops``."""
    return pytest.approx(value, rel=gamma(ops, torch.float64), abs=0)


def approx_csv(value: float, decimals: int = 4, scale: float = 100.0) -> object:
    """``pytest.approx`` for a number read back from a CSV written with ``%.<decimals>f``
    against the test's own float64 computation of it: printing rounds by at most half a
    unit in the last printed place, and the two float64 computations (on inputs no
    larger than ``scale``; accuracies are at most 100) differ by ``gamma_16 * scale``."""
    return pytest.approx(value, rel=0,
                         abs=0.5 * 10.0**-decimals + gamma(16, torch.float64) * scale)


# ---------------------------------------------------------------------------- runs

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


def signal_mid_epoch_2(name: str) -> str:
    """Code for :func:`start_train`: send this process signal ``name`` (``"SIGKILL"``,
    ``"SIGTERM"``, ...) at the third batch of its second epoch, right after its first
    checkpoint: at the same step on any machine however fast (a timed kill can land after a
    fast machine has finished the run)."""
    return f"""
import os, signal
import flexexp.tracking as tracking
from flexexp.data.loader import DeviceLoader
_saved = {{"n": 0}}
_real_write, _real_iter = tracking.atomic_write_bytes, DeviceLoader.__iter__
def _counting_write(path, data):
    _real_write(path, data)
    if str(path).endswith("last.pt"):
        _saved["n"] += 1
def _signalled_iter(self):
    for i, batch in enumerate(_real_iter(self)):
        if self.train and _saved["n"] >= 1 and i == 2:
            os.kill(os.getpid(), signal.{name})
        yield batch
tracking.atomic_write_bytes = _counting_write
DeviceLoader.__iter__ = _signalled_iter
"""


#: Code for :func:`start_train`: SIGKILL the run at the third batch of its second epoch.
KILL_MID_EPOCH_2 = signal_mid_epoch_2("SIGKILL")


def interrupt_in_epoch_2(cfg, run_dir: Path, monkeypatch) -> None:
    """Run ``cfg`` in ``run_dir`` in this process and stop it with a KeyboardInterrupt in
    epoch 2's evaluation, after epoch 1's checkpoint (a kill at a fixed step, in-process)."""
    import pytest

    from flexexp import engine, trainer

    real_evaluate, calls = engine.evaluate, {"n": 0}

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_evaluate(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(engine, "evaluate", dying_evaluate)
        with pytest.raises(KeyboardInterrupt):
            trainer.run(cfg, run_dir)


def only_run_dir(runs: Path) -> Path:
    """The one run directory under ``runs`` (the folder of its ``cell.json``)."""
    dirs = [p.parent for p in runs.rglob("cell.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def start_train(args: list[str], cwd: Path, extra_code: str = "",
                module: str = "flexexp.train") -> subprocess.Popen:
    """Start ``python -m <module> args`` (flexexp.train, flexexp.tune) in the background,
    with ``extra_code`` run first in the same process (fault injection: see
    :data:`KILL_MID_EPOCH_2`)."""
    code = f"{extra_code}\nimport sys\nsys.argv = [{module!r}, *{args!r}]\n" \
           f"from {module} import main\nsys.exit(main())\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


#: Where Debian's package dataset-fashion-mnist puts the real files (the realdata tests').
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------- pools

#: Keyword arguments of the local pools that take some (conf/model/resnet20.yaml's values).
DOWN_ARGS = {"s3pool": {"grid": 2}}


def net(**kwargs) -> torch.nn.Module:
    """resnet20 with the local pool's arguments from DOWN_ARGS."""
    down = kwargs.get("downsample", "stride")
    return resnet20(downsample_kwargs=DOWN_ARGS.get(down), **kwargs)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def avg2(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2, 2, ceil_mode=True)


def max2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, 2, ceil_mode=True)


def avg2_bound(x: torch.Tensor) -> torch.Tensor:
    """Two 2x2 window means of ``x`` computed in different orders differ by at most
    twice the error bound of a 4-term sum and its division: ``2 gamma_5 mean|x|``."""
    return 2 * sum_error_bound(avg2(x.detach().abs().double()), 5, x.dtype)
