"""Extending flexexp without editing it: a pool in the user's own package, its YAML in the
user's own config folder, found through hydra.searchpath (README "Extending")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, make_cfg

from flexexp.config import check_overrides, validate
from flexexp.errors import ConfigError

LSE = '''
import torch
from torch import nn


class LSEPool2d(nn.Module):
    """Log-sum-exp pooling: (1/r) log mean exp(r x) over the map, (B, C, H, W) -> (B, C)."""

    def __init__(self, channels, height, width, r):
        super().__init__()
        self.r = r

    def forward(self, x):
        n = x.shape[2] * x.shape[3]
        lse = torch.logsumexp(self.r * x.flatten(2), -1)
        return (lse - torch.log(torch.tensor(float(n)))) / self.r


class Mean2x2(nn.Module):
    """A local pool with a learnt scale per channel: 2x2 means at stride 2,
    (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)); no pool_pair, so the block pools the
    padded shortcut with it too."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return self.scale * nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True)
'''


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """<tmp>/mypkg/pools.py and <tmp>/conf/pool/lse.yaml, as a user writes them."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "pools.py").write_text(textwrap.dedent(LSE))
    (tmp_path / "conf" / "pool").mkdir(parents=True)
    (tmp_path / "conf" / "pool" / "lse.yaml").write_text(textwrap.dedent("""\
        name: lse
        layer: mypkg.pools.LSEPool2d
        reg: 0.0
        dropout: 0.0
        r: 4.0
    """))
    return tmp_path


def _env(user: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(user), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def test_a_user_pool_trains_and_is_reported_under_its_name(user_dir, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    search = f"hydra.searchpath=[file://{user_dir / 'conf'}]"
    cmd = [sys.executable, "-m", "flexexp.train", search, "pool=lse", *TINY,
           "model.downsample=mypkg.pools.Mean2x2", f"paths.runs={runs}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(user_dir), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = runs.rglob("result.json")
    rec = json.loads(result.read_text())
    assert rec["status"] == "completed" and rec["pool"] == "lse"
    assert rec["config"]["pool"] == {"name": "lse", "layer": "mypkg.pools.LSEPool2d",
                                     "reg": 0.0, "dropout": 0.0, "r": 4.0}
    assert result.parent.relative_to(runs).parts[:2] == ("synthetic", "lse")
    rep = subprocess.run([sys.executable, "-m", "flexexp.report", f"paths.runs={runs}",
                          f"out_dir={out}"], cwd=tmp_path, env=_env(user_dir),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert pd.read_csv(out / "runs.csv").variant.tolist() == ["lse"]
    table3 = pd.read_csv(out / "table3.csv")
    assert table3.pool.tolist() == ["lse"] and table3.downsample.tolist() == [
        "mypkg.pools.Mean2x2"]


def test_a_user_pool_is_checked_like_ours(user_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(user_dir))
    search = f"hydra.searchpath=[file://{user_dir / 'conf'}]"
    check_overrides([search, "pool=lse", "pool.r=2.0"])  # its own key, its own option
    with pytest.raises(ConfigError, match=r"pool=lse has no key 'radius'. Its keys are "
                                          r"dropout, layer, name, r, reg"):
        check_overrides([search, "pool=lse", "pool.radius=2.0"])
    with pytest.raises(ConfigError, match=r"Unknown option 'lse' for group 'pool'"):
        check_overrides(["pool=lse"])  # without the search path there is no such option
    cfg = make_cfg([search, "pool=lse"])
    validate(cfg)
    (user_dir / "conf" / "pool" / "lse.yaml").write_text(
        "name: lse\nlayer: mypkg.pools.LSEPool2d\nreg: 0.0\ndropout: 0.0\nradius: 4.0\n")
    with pytest.raises(ConfigError, match=r"with \{'radius': 4.0\}: global pool "
                                          r"'mypkg.pools.LSEPool2d': missing a required "
                                          r"argument: 'r'; it takes r"):
        validate(make_cfg([search, "pool=lse"]))
    (user_dir / "conf" / "pool" / "lse.yaml").write_text(
        "name: lse\nlayer: mypkg.nope.LSEPool2d\nreg: 0.0\ndropout: 0.0\n")
    with pytest.raises(ConfigError, match=r"registry name \(avg, flex, flex_softmax, gfgp, max\) "
                                          r"and importing it failed \(ModuleNotFoundError"):
        validate(make_cfg([search, "pool=lse"]))
