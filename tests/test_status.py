"""Sweep status: the ``[k/N]`` line a sweep prints per finished cell, and
``python -m flexexp.report --status`` (flexexp/status.py) on a runs folder in every state."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, make_cfg, run_cli
from omegaconf import OmegaConf

from flexexp import status
from flexexp.config import cell_name
from flexexp.tracking import read_json

#: ``[k/N] <cell> <outcome> | elapsed <d> | ETA <d>`` as the flexexp.task logger prints it
LINE = re.compile(r"\]\[flexexp\.task\]\[INFO\] - \[(\d+)/(\d+)\] (\S+) (.+) \| "
                  r"elapsed (\S+) \| ETA (\S+)$")
DURATION = re.compile(r"\d+s|\d+m\d\ds|\d+h\d\dm")


def progress(text: str) -> list[tuple[int, int, str, str, str, str]]:
    """The progress lines of a sweep's console output, in order."""
    out = []
    for line in text.splitlines():
        m = LINE.search(line)
        if m:
            k, n, cell, what, elapsed, eta = m.groups()
            out.append((int(k), int(n), cell, what, elapsed, eta))
    return out


def cells_of(runs: Path) -> dict[str, dict]:
    """``{cell name below runs: its record}`` for every record under ``runs``."""
    return {p.parent.relative_to(runs).as_posix(): read_json(p) for p in runs.rglob("result.json")}


# ---------------------------------------------------------------------------- formatting


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (0.4, "0s"), (45, "45s"), (59.4, "59s"), (59.6, "1m00s"), (60, "1m00s"),
    (83, "1m23s"), (190, "3m10s"), (3599, "59m59s"), (3600, "1h00m"), (3725, "1h02m"),
    (36000 + 59 * 60 + 59, "10h59m"), (-5, "0s"),
])
def test_human_durations(seconds, text):
    assert status.human_duration(seconds) == text


def row(cell: str, state: str = "completed", detail=97.2149, **extra) -> dict:
    return {"run_dir": f"/runs/{cell}", "cell": cell, "status": state, "detail": detail, **extra}


def test_progress_line_counts_and_estimates_from_the_cells_that_ran():
    rows = [row("a"), row("b", "failed", "ValueError: boom")]
    # 2 cells ran in 100 s: 50 s each, 3 left
    assert status.progress_line(rows, 1000.0, 5, 1100.0) == \
        "[2/5] b failed | elapsed 1m40s | ETA 2m30s"
    assert status.progress_line(rows[:1], 1000.0, 5, 1083.0) == \
        "[1/5] a test_acc 97.21 | elapsed 1m23s | ETA 5m32s"  # 83 x 4 = 332 s
    # a skipped cell takes no time: the pace is per cell that ran
    rows = [row("a", skipped=True), row("b"), row("c", "interrupted", "SIGTERM")]
    assert status.progress_line(rows, 0.0, 6, 60.0) == \
        "[3/6] c interrupted | elapsed 1m00s | ETA 1m30s"  # 60 / 2 x 3
    assert status.progress_line(rows[:1], 0.0, 6, 1.0).endswith(
        "a skipped (already completed) | elapsed 1s | ETA ?")
    # the last cell: nothing left; unknown N: no ETA
    assert status.progress_line([row("a"), row("b")], 0.0, 2, 7.0).endswith("| ETA 0s")
    assert status.progress_line([row("a")], 0.0, None, 7.0) == \
        "[1/?] a test_acc 97.21 | elapsed 7s | ETA ?"


# ---------------------------------------------------------------------------- N


@pytest.mark.parametrize("params,overrides,n", [
    (None, [], 1),
    (None, ["pool=avg,flex", "sac=off,on"], 4),
    (None, ["pool=avg,flex", "sac=off,on", "seed=0,1,2", "trainer.epochs=1"], 12),
    (None, ["seed=range(0,5)"], 5),
    (None, ["seed=range(0,10,3)", "pool=choice(avg,flex)"], 8),
    ({"pool": "avg,flex,flex_reg", "seed": "0,1,2"}, [], 9),
    # a key on both: the command line's values win
    ({"pool": "avg,flex,flex_reg", "seed": "0,1,2"}, ["seed=0,1,2,3,4", "sac=off,on"], 30),
])
def test_sweep_cells_expand_like_hydras_basic_sweeper(params, overrides, n):
    cells = status.sweep_cells(params, overrides)
    assert len(cells) == n
    assert len({tuple(c) for c in cells}) == n


def test_the_cells_override_lists_are_hydras():
    cells = status.sweep_cells({"seed": "0,1"}, ["seed=range(5,7)", "pool=avg,flex"])
    assert cells == [["seed=5", "pool=avg"], ["seed=5", "pool=flex"],
                     ["seed=6", "pool=avg"], ["seed=6", "pool=flex"]]


@pytest.mark.parametrize("overrides,n", [
    (["experiment=demo"], 24), (["experiment=demo", "seed=3"], 8),
    (["experiment=paper"], 96), (["experiment=table1"], 48), ([], 1),
])
def test_sweep_size_of_a_preset(overrides, n):
    assert status.sweep_size(make_cfg(overrides, return_hydra_config=True).hydra) == n


def test_sweep_size_takes_the_command_lines_comma_lists():
    hydra = make_cfg(["experiment=demo"], return_hydra_config=True).hydra
    hydra.overrides.task = ["experiment=demo", "seed=range(0,5)", "trainer.epochs=1"]
    assert status.sweep_size(hydra) == 40
    other = OmegaConf.create({"sweeper": {"_target_": "some.OtherSweeper", "n_trials": 7},
                              "overrides": {"task": []}})
    assert status.sweep_size(other) == 7  # another sweeper: its trial count, else unknown
    del other.sweeper.n_trials
    assert status.sweep_size(other) is None


def test_a_glob_over_a_group_needs_hydras_config_loader():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flexexp.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        loader = GlobalHydra.instance().config_loader()
        cells = status.sweep_cells(None, ["pool=glob(flex*)"], loader)
    assert cells == [[f"pool={p}"] for p in ("flex", "flex_reg", "flex_reg_dropout",
                                             "flex_softmax")]


# ---------------------------------------------------------------------------- a real sweep


#: a 2 x 2 sweep on the embedded digits, in seconds: 256 training images, one epoch, ResNet8
DIGITS = ["dataset=digits", "dataset.train_size=256", "dataset.test_size=128", "model.depth=8",
          *(o for o in TINY if o.startswith("trainer."))]
SWEEP = [*DIGITS, "pool=avg,flex", "sac=off,on"]


def test_a_sweep_prints_k_of_n_per_finished_cell(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(["-m", *SWEEP, f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = progress(proc.stdout + proc.stderr)
    records = cells_of(runs)
    assert len(records) == 4
    assert [k for k, *_ in lines] == [1, 2, 3, 4]  # once per cell, counted in order
    assert {n for _, n, *_ in lines} == {4}
    assert sorted(cell for _, _, cell, *_ in lines) == sorted(records)
    for _, _, cell, what, elapsed, eta in lines:
        assert what == f"test_acc {records[cell]['test_acc']:.2f}"
        assert DURATION.fullmatch(elapsed) and DURATION.fullmatch(eta)
    assert lines[-1][5] == "0s"
    # the names are flexexp.config.cell_name's
    names = {cell_name(make_cfg([*DIGITS, f"pool={p}", f"sac={s}"]))
             for p in ("avg", "flex") for s in ("off", "on")}
    assert names == set(records)

    again = run_cli(["-m", *SWEEP, f"paths.runs={runs}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = progress(again.stdout + again.stderr)
    assert [(k, n) for k, n, *_ in lines] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert {what for _, _, _, what, _, _ in lines} == {"skipped (already completed)"}
    assert lines[-1][5] == "0s"

    # report --status composes the same grid: every cell completed
    rep = run_cli(["--status", *SWEEP, f"paths.runs={runs}"], cwd=tmp_path,
                  module="flexexp.report")
    assert rep.returncode == 0, rep.stderr
    assert "4 completed, 0 running, 0 failed, 0 interrupted, 0 missing (of 4)" in rep.stdout
    assert "ETA 0s: every cell completed" in rep.stdout
    for cell, rec in records.items():
        assert f"  {cell}: test_acc {rec['test_acc']:.2f}" in rep.stdout


@pytest.mark.slow
def test_parallel_workers_count_each_cell_once(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *DIGITS,
                    "pool=avg,flex", "trainer.batch_size=64,100000", f"paths.runs={runs}"],
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # two cells failed
    lines = progress(proc.stdout + proc.stderr)
    assert sorted(k for k, *_ in lines) == [1, 2, 3, 4]
    assert {n for _, n, *_ in lines} == {4}
    records = cells_of(runs)
    assert sorted(cell for _, _, cell, *_ in lines) == sorted(records)
    outcomes = {cell: what for _, _, cell, what, _, _ in lines}
    for cell, rec in records.items():
        want = "failed" if rec["status"] == "failed" else f"test_acc {rec['test_acc']:.2f}"
        assert outcomes[cell] == want
    assert sorted(outcomes.values()).count("failed") == 2
    assert next(eta for k, *_, eta in lines if k == 4) == "0s"


# ---------------------------------------------------------------------------- report --status

GRID = ["dataset=synthetic", "pool=avg,flex,flex_reg", "sac=off,on"]


def write(run_dir: Path, **rec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(rec))


HOLD_LOCK = """
import fcntl, os, sys
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(sys.argv[2] if len(sys.argv) > 2 else str(os.getpid()))
f.flush()
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def runs_in_every_state(tmp_path):
    """A runs folder with the 6 cells of GRID: 2 completed (30 s, 90 s), failed, running
    (its lock held by a live process), running in the record but no lock held, missing."""
    runs = tmp_path / "runs"
    names = {(p, s): cell_name(make_cfg(["dataset=synthetic", f"pool={p}", f"sac={s}"]))
             for p in ("avg", "flex", "flex_reg") for s in ("off", "on")}
    d = {k: runs / v for k, v in names.items()}
    write(d["avg", "off"], status="completed", test_acc=97.2149, wall_time_s=30.0)
    write(d["avg", "on"], status="completed", test_acc=98.5, wall_time_s=90.0)
    write(d["flex", "off"], status="failed", wall_time_s=3.0,
          error="DataError: the digits are gone\nsecond line of the error")
    write(d["flex", "on"], status="running")
    write(d["flex_reg", "off"], status="running")
    (d["flex_reg", "off"] / ".lock").write_text(str(os.getpid()))  # a live pid, no lock
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(d["flex", "on"] / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield runs, names, holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_status_groups_every_cell(runs_in_every_state, capsys):
    runs, names, pid = runs_in_every_state
    root, cells = status.grid([*GRID, f"paths.runs={runs}"])
    assert root == runs and sorted(cells) == sorted(names.values())
    groups = status.collect(runs, cells)
    by_state = {s: {c: detail for c, detail, _ in groups[s]} for s in status.STATES}
    assert by_state["completed"] == {names["avg", "off"]: "test_acc 97.21",
                                     names["avg", "on"]: "test_acc 98.50"}
    assert by_state["failed"] == {names["flex", "off"]: "DataError: the digits are gone"}
    assert by_state["running"] == {names["flex", "on"]: f"pid {pid}"}
    assert list(by_state["interrupted"]) == [names["flex_reg", "off"]]
    assert "stale" in by_state["interrupted"][names["flex_reg", "off"]]
    assert list(by_state["missing"]) == [names["flex_reg", "on"]]

    assert status.main([*GRID, f"paths.runs={runs}"]) == 0
    out = capsys.readouterr().out
    assert "2 completed, 1 running, 1 failed, 1 interrupted, 1 missing (of 6)" in out
    assert f"  {names['flex', 'off']}: DataError: the digits are gone\n" in out
    assert "second line" not in out
    # the mean of 30 s and 90 s, times the 4 cells not completed
    assert "ETA 4m00s: 4 cells not completed x 1m00s per cell" in out
    sections = [ln for ln in out.splitlines() if not ln.startswith(" ") and ln.endswith("):")]
    assert sections == ["completed (2):", "running (1):", "failed (1):", "interrupted (1):",
                        "missing (1):"]


def test_status_after_the_lock_is_released(runs_in_every_state):
    runs, names, _ = runs_in_every_state
    for name in ("flex", "on"), ("flex_reg", "on"):
        write(runs / names[name], status="completed", test_acc=90.0, wall_time_s=60.0)
    write(runs / names["flex", "off"], status="interrupted", error="SIGTERM; resume")
    _, cells = status.grid([*GRID, f"paths.runs={runs}"])
    groups = status.collect(runs, cells)
    assert [len(groups[s]) for s in status.STATES] == [4, 0, 0, 2, 0]
    assert status.eta_line(groups).startswith("ETA 2m00s: 2 cells not completed x 1m00s")


def test_a_killed_run_with_only_a_checkpoint_is_interrupted(tmp_path):
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    assert status.cell_state(run_dir)[0] == "missing"
    (run_dir / "last.pt").write_bytes(b"x")
    assert status.cell_state(run_dir)[0] == "interrupted"


def test_report_status_of_a_preset_needs_no_torch(tmp_path):
    code = ("import sys; from flexexp.report import main; "
            f"assert main(['--status', 'experiment=demo', 'paths.runs={tmp_path}']) == 0; "
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "0 completed, 0 running, 0 failed, 0 interrupted, 24 missing (of 24)" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["experiment=nosuch"], "error: Unknown option 'nosuch' for group 'experiment'"),
    (["experiment=demo", "pool.nokey=1"], "error: cannot compose the sweep of experiment=demo "
                                          "pool.nokey=1: Could not override 'pool.nokey'"),
    (["nosuch"], "error: unknown argument 'nosuch'"),
])
def test_a_bad_status_request_is_one_paragraph_and_exit_2(tmp_path, args, message):
    proc = run_cli(["--status", *args], cwd=tmp_path, module="flexexp.report")
    assert proc.returncode == 2
    assert proc.stderr.startswith(message)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    if args != ["nosuch"]:  # (that one adds the usage after a blank line)
        assert proc.stderr.strip().count("\n") == 0


def test_status_help_names_the_command(tmp_path):
    proc = run_cli(["--status", "--help"], cwd=tmp_path, module="flexexp.report")
    assert proc.returncode == 0 and "report --status [experiment=NAME]" in proc.stdout
    proc = run_cli(["--help"], cwd=tmp_path, module="flexexp.report")
    assert proc.returncode == 0 and "--status" in proc.stdout


def test_a_cell_locked_from_another_host_is_running(tmp_path):
    """On a cluster the lock's holder runs elsewhere: its pid means nothing here (not a
    process of this machine), the held lock says running."""
    run_dir = tmp_path / "cell"
    write(run_dir, status="running")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / ".lock"),
                               "3999999"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert status.cell_state(run_dir)[:2] == ("running", "pid 3999999")
    finally:
        holder.kill()
        holder.wait()
    assert status.cell_state(run_dir)[0] == "interrupted"  # the holder is gone
