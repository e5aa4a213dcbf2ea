"""Process-level speed settings (flexexp.runtime): what they change, and what they must not."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from helpers import TINY, run_cli

from flexexp.tracking import read_json

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# RSS of a fresh process around freeing a 64 MiB tensor, with and without keep_heap(),
# then over repeated cycles of the same allocations (as training steps make them)
_PROBE = """
import json, os, sys, torch
from flexexp.runtime import heap_kept, keep_heap
kept = keep_heap() if sys.argv[1] == "keep" else False
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
x = torch.ones(2**24)  # 64 MiB, touched
before = rss()
del x
freed = before - rss()
cycles = []
for _ in range(8):
    a = torch.ones(2**24); b = torch.ones(2**23); del a; c = torch.ones(2**24); del b, c
    cycles.append(rss())
print(json.dumps({"kept": kept, "heap_kept": heap_kept(), "freed_mb": freed,
                  "cycles_mb": cycles}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_keep_heap_keeps_freed_large_blocks_for_reuse():
    default, kept = _probe("default"), _probe("keep")
    assert default["kept"] is False and default["heap_kept"] is False
    assert kept["kept"] is True and kept["heap_kept"] is True
    # glibc's default: a 64 MiB block is its own mapping, unmapped (RSS drops) on free
    assert default["freed_mb"] > 60
    # kept: the block stays with the process ...
    assert kept["freed_mb"] < 4
    # ... and is reused: after a few cycles of the same allocations the RSS stops growing
    last = kept["cycles_mb"][-4:]
    assert max(last) - min(last) < 1.0, kept["cycles_mb"]


@pytest.mark.slow
def test_keep_heap_changes_speed_not_results(tmp_path):
    recs = {}
    for flag in ("true", "false"):
        runs = tmp_path / flag
        proc = run_cli([*TINY, "trainer.epochs=2", f"trainer.keep_heap={flag}",
                        f"paths.runs={runs}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (result,) = runs.rglob("result.json")
        recs[flag] = read_json(result)
    on, off = recs["true"], recs["false"]
    assert on["keep_heap"] is GLIBC and off["keep_heap"] is False
    timing = {"epoch_time_s", "images_per_s", "eval_time_s"}
    numbers = [[{k: v for k, v in h.items() if k not in timing} for h in r["history"]]
               for r in (on, off)]
    assert numbers[0] == numbers[1] and len(numbers[0]) == 2
    assert on["test_acc"] == off["test_acc"]
    # a runtime key: both runs have the same cell, hence the same run-directory name
    assert on["cell"] == off["cell"]
