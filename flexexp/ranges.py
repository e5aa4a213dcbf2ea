"""The valid range of every numeric config key, checked before a run creates anything.

:data:`RANGES` is the one table: a key (``optim.betas[]`` means every entry of a list),
its kind (an integer or a real number) and its interval. A value outside it, NaN or
infinite, or of the wrong type is a :class:`~flexexp.errors.ConfigError` naming the key,
the value and the range; a key absent from the config (``optim.momentum`` under Adam)
is not checked. :func:`flexexp.config.validate` calls :func:`check_ranges` first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from flexexp.errors import ConfigError

__all__ = ["Range", "RANGES", "check_ranges"]

INF = math.inf


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float = INF
    lo_open: bool = False  # (lo, ...] rather than [lo, ...
    hi_open: bool = True  # [..., hi) rather than ..., hi]
    integer: bool = False
    why: str = ""  # what the range means, for the message
    eg: str = ""  # a valid value, for the message

    def __str__(self) -> str:
        hi = "inf" if self.hi == INF else f"{self.hi:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {hi}{')' if self.hi_open else ']'}"

    def holds(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below


def _int(lo: int, why: str = "", eg: str = "") -> Range:
    return Range(lo, integer=True, why=why, eg=eg)


#: Every numeric key and its valid range.
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1, hi_open=False, integer=True, why="a 32-bit seed"),
    "trainer.epochs": _int(1, eg="100"),
    "trainer.batch_size": _int(1, eg="1000"),
    "trainer.eval_every": _int(1, eg="1"),
    "trainer.threads": _int(0, "0 = torch's default"),
    "dataset.num_classes": _int(2),
    "dataset.in_channels": _int(1),
    "dataset.image_size": _int(1),
    "dataset.batch_size": _int(1),
    "dataset.train_size": _int(1, "null = every image"),
    "dataset.test_size": _int(1, "null = every image"),
    "dataset.data_seed": Range(0, 2**32 - 1, hi_open=False, integer=True, why="a 32-bit seed"),
    "dataset.val_fraction": Range(0.0, 1.0, why="the share of the training images held out "
                                  "for validation; 0 = none", eg="0.1"),
    "dataset.translate": _int(0, "pixels of random shift"),
    "dataset.mean[]": Range(0.0, 1.0, hi_open=False, why="pixel values are in [0, 1]"),
    "dataset.std[]": Range(0.0, lo_open=True),
    "dataset.scale[]": Range(0.0, lo_open=True, why="zoom factors; 1 = none"),
    "model.width": Range(1, 64, hi_open=False, integer=True,
                         why="a channel multiplier; 64 is already 4,096 channels", eg="1"),
    "pool.reg": Range(0.0, why="0 turns the penalty off", eg="0.01"),
    "pool.dropout": Range(0.0, 1.0, eg="0.25"),
    "sac.weights[]": Range(0.0, why="the loss weight of each head", eg="[0.1,0.2,0.7]"),
    "optim.lr": Range(0.0, 1e6, lo_open=True, hi_open=False,
                      why="the peak learning rate; beyond 1e6 nothing trains", eg="0.1"),
    "optim.weight_decay": Range(0.0),
    "optim.betas[]": Range(0.0, 1.0, eg="[0.9,0.999]"),
    "optim.momentum": Range(0.0, 1.0),
    "sched.pct_start": Range(0.0, 1.0, lo_open=True, why="the warm-up's share of the steps",
                             eg="0.3"),
    "sched.div_factor": Range(1.0, why="the first LR is optim.lr / div_factor"),
    "sched.final_div_factor": Range(1.0, why="the last LR is the first / final_div_factor"),
    "sched.base_momentum": Range(0.0, 1.0, why="beta1 (SGD: momentum) at the LR's peak",
                                 eg="0.85"),
    "sched.max_momentum": Range(0.0, 1.0, why="beta1 (SGD: momentum) at the first and last step",
                                eg="0.95"),
}


def _values(cfg: DictConfig, key: str) -> list[tuple[str, Any]]:
    """``(name, value)`` of ``key`` in ``cfg``; a list key gives one pair per entry."""
    base = key.removesuffix("[]")
    value = OmegaConf.select(cfg, base, default=None, throw_on_missing=False)
    if value is None:
        return []
    if key.endswith("[]"):
        if not isinstance(value, ListConfig | list):
            return [(base, value)]
        return [(f"{base}[{i}]", v) for i, v in enumerate(value)]
    return [(base, value)]


def check_ranges(cfg: DictConfig) -> None:
    """Raise a ConfigError for the first numeric value outside its range in :data:`RANGES`."""
    for key, r in RANGES.items():
        for name, v in _values(cfg, key):
            kind = "an integer" if r.integer else "a number"
            ok_type = isinstance(v, int) if r.integer else isinstance(v, int | float)
            if isinstance(v, bool) or not ok_type:
                raise ConfigError(f"{name}={v!r} must be {kind} in {r}"
                                  f"{f' ({r.why})' if r.why else ''}.")
            if not math.isfinite(v) or not r.holds(v):
                eg = f", e.g. {key.removesuffix('[]')}={r.eg}" if r.eg else ""
                raise ConfigError(
                    f"{name}={v!r} is outside its range {r}{f' ({r.why})' if r.why else ''}: "
                    f"give {kind} in that range{eg} (every key's range: flexexp/ranges.py).")
