"""The failure catalogue (README "Failure policy"): bad inputs and faults, one test each,
grouped by class. Each test's name says the case and what must happen; a reader can scan
this file as a table. Every case checks that nothing wrong is recorded or reported as
right, and that the message names the problem and the fix.

Classes: 1 divergence, 3 provenance, 4 values outside their meaning, 5 signals,
7 sweep bookkeeping, 8 output a person reads. Classes 2 (report integrity) and 6 (files
and disks) are in tests/test_failures_report.py.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    TINY,
    interrupt_in_epoch_2,
    make_cfg,
    only_run_dir,
    run_cli,
    signal_mid_epoch_2,
    start_train,
)

from flexexp import engine, reuse, rundir, trainer
from flexexp.config import validate
from flexexp.data import sources
from flexexp.errors import ConfigError, DivergenceError
from flexexp.ranges import RANGES
from flexexp.tracking import read_json

LN10 = math.log(10)


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but its log and lock, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("train.log", ".lock") and "tb" not in p.parts}


# ==================================================================== 1. divergence


def test_adam_at_lr_1e3_is_recorded_as_diverged_not_completed(tmp_path):
    cfg = make_cfg([*TINY, "trainer.epochs=3", "optim.lr=1000"])
    with pytest.raises(DivergenceError, match="the run diverged in epoch .*Lower optim.lr"):
        trainer.run(cfg, tmp_path / "run")
    rec = read_json(tmp_path / "run" / "result.json")
    assert rec["status"] == "failed" and "diverged" in rec["error"]
    if (tmp_path / "run" / "last.pt").exists():  # what is kept is finite
        state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
        assert all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("heads,last,flagged", [
    ({"main": 2.0}, True, []),  # learning: fine
    ({"main": LN10 * 1.05}, True, []),  # at chance at the end (a too-short run): a result
    ({"stage1": 33.6, "main": 2.0}, False, []),  # a SAC head's spike that recovers
    ({"stage1": 33.6, "main": 2.0}, True, []),  # ... also in the last epoch: the main head
    ({"main": 101 * LN10}, False, ["main"]),  # exploding, any epoch
    ({"stage1": 101 * LN10, "main": 2.0}, False, ["stage1"]),
    ({"main": 11 * LN10}, True, ["main"]),  # ends far above chance: diverged
    ({"main": 11 * LN10}, False, []),  # ... the same mid-run may still come down
    ({"main": math.nan}, False, ["main"]),
])
def test_the_divergence_rule(heads, last, flagged):
    assert [h for h, _ in engine.diverged(heads, 10, last)] == flagged


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    cfg = make_cfg(TINY)
    trainer.run(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    record = rundir.new_record(cfg, tmp_path / "other", "x")
    loop = trainer.setup(cfg, tmp_path / "other", record, engine.Dist())
    with torch.no_grad():
        next(loop.step.model.parameters()).view(-1)[0] = math.inf
    with pytest.raises(DivergenceError, match="non-finite values .*checkpoint of epoch 1 is kept"):
        rundir.save_state(tmp_path / "run", loop.step, loop.gen, 2, 1, [], 0.0, "x")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


# ==================================================================== 3. provenance


def _other_synthetic(monkeypatch):
    """The synthetic source with one label changed: the same config, other data."""
    real = sources.DATASETS["synthetic"]

    def other(spec):
        arrays = real(spec)
        arrays.y_train = arrays.y_train.clone()
        arrays.y_train[0] = (arrays.y_train[0] + 1) % spec.num_classes
        return arrays

    monkeypatch.setitem(sources.DATASETS, "synthetic", other)
    reuse.clear()


def test_the_record_names_the_data_it_trained_on(tmp_path):
    cfg = make_cfg(TINY)
    reuse.clear()
    rec = trainer.run(cfg, tmp_path / "run")
    from omegaconf import OmegaConf

    arrays = sources.load_arrays(OmegaConf.to_object(cfg.dataset))
    assert rec["data_fingerprint"] == sources.fingerprint(arrays)
    assert len(rec["data_fingerprint"]) == 16 and rec["data_root"]


def test_a_completed_cell_is_not_skipped_for_other_data(tmp_path, monkeypatch):
    cfg = make_cfg(TINY)
    reuse.clear()
    trainer.run(cfg, tmp_path / "run")
    kept = files_of(tmp_path / "run")
    _other_synthetic(monkeypatch)
    with pytest.raises(ConfigError, match="holds a completed run on other data .*another "
                                          "paths.runs, or delete"):
        trainer.run(cfg, tmp_path / "run")
    assert files_of(tmp_path / "run") == kept  # the completed run is left as it was


def test_a_checkpoint_of_other_data_is_not_resumed(tmp_path, monkeypatch):
    cfg = make_cfg([*TINY, "trainer.epochs=2"])
    reuse.clear()
    interrupt_in_epoch_2(cfg, tmp_path / "run", monkeypatch)
    _other_synthetic(monkeypatch)
    with pytest.raises(ConfigError, match="belongs to another config or other data"):
        trainer.run(cfg, tmp_path / "run")


def test_a_skipped_rerun_rewrites_none_of_the_run_files(tmp_path):
    runs = tmp_path / "runs"
    first = run_cli([*TINY, f"paths.runs={runs}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = only_run_dir(runs)
    kept = files_of(run_dir)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
            "config.yaml", "cell.json", "result.json", "last.pt"} <= kept.keys()
    # trainer.keep_heap is not part of the cell: the same cell, skipped
    again = run_cli([*TINY, "trainer.keep_heap=false", f"paths.runs={runs}"], cwd=tmp_path)
    assert again.returncode == 0 and "already completed, skipped" in again.stdout + again.stderr
    assert files_of(run_dir) == kept
    assert "keep_heap" not in (run_dir / ".hydra" / "overrides.yaml").read_text()


# ==================================================================== 4. values


@pytest.mark.parametrize("overrides,message", [
    (["sched.pct_start=1.5"], r"sched.pct_start=1.5 is outside its range \(0, 1\)"),
    (["optim.betas=[1.5,0.999]"], r"optim.betas\[0\]=1.5 is outside its range \[0, 1\)"),
    (["pool=flex_reg", "pool.reg=nan"], r"pool.reg=nan is outside its range \[0, inf\)"),
    (["optim.lr=inf"], r"optim.lr=inf is outside its range \(0, 1e\+06\]"),
    (["sac=on", "sac.weights=[0,0,0]"], r"the main head's weight \(the last\) must be positive"),
    (["pool.dropout=-0.1"], r"pool.dropout=-0.1 is outside its range \[0, 1\)"),
    (["dataset.std=[0]"], r"dataset.std\[0\]=0(\.0)? is outside its range \(0, inf\)"),
    (["trainer.eval_every=0"], r"trainer.eval_every=0 is outside its range \[1, inf\)"),
    (["optim=sgd", "optim.momentum=1.0"], r"optim.momentum=1.0 is outside its range \[0, 1\)"),
    (["sched.div_factor=0.5"], r"sched.div_factor=0.5 is outside its range \[1, inf\)"),
    (["dataset.mean=[1.5]"], r"dataset.mean\[0\]=1.5 is outside its range \[0, 1\]"),
    (["optim.lr=true"], r"optim.lr=True must be a number"),
])
def test_a_value_outside_its_meaning_is_refused_with_its_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(overrides))


def test_every_key_of_the_ranges_table_is_a_config_key():
    # a renamed key would leave its range unchecked: every entry names a real key
    cfgs = [make_cfg([]), make_cfg(["optim=sgd"]), make_cfg(["sac=on"])]
    from omegaconf import OmegaConf

    for key in RANGES:
        base = key.removesuffix("[]")
        assert any(OmegaConf.select(c, base, default="absent") != "absent" for c in cfgs), key


def test_a_refused_value_leaves_no_run_directory(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = run_cli([*TINY, "pool=flex_reg", "pool.reg=nan", f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 2 and "pool.reg=nan is outside its range" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(runs.iterdir()) == []  # Hydra's folder for it is gone again


# ==================================================================== 5. signals

LONG = [*TINY, "trainer.epochs=3", "dataset.train_size=512", "pool=flex_reg", "sac=on"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_scheduler_signal_records_interrupted_and_the_rerun_resumes_exactly(tmp_path, name):
    ref_runs, runs = tmp_path / "ref", tmp_path / "runs"
    ref = run_cli([*LONG, f"paths.runs={ref_runs}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = start_train([*LONG, f"paths.runs={runs}"], tmp_path,
                       signal_mid_epoch_2(name))
    _, err = proc.communicate(timeout=300)
    signum = getattr(signal, name)
    assert proc.returncode == -signum, err[-2000:]  # ended by the signal: a requeue sees it
    run_dir = only_run_dir(runs)
    rec = read_json(run_dir / "result.json")
    assert rec["status"] == "interrupted" and f"stopped by {name}" in rec["error"]
    assert "run the same command to resume" in rec["error"] and rec.get("test_acc") is None
    assert f"stopped by {name}" in err and "Traceback" not in err
    again = run_cli([*LONG, f"paths.runs={runs}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    done, want = read_json(run_dir / "result.json"), read_json(only_run_dir(ref_runs)
                                                                / "result.json")
    assert done["status"] == "completed" and done["resumed_from_epoch"] == 1
    assert [h["train_loss"] for h in done["history"]] == \
        [h["train_loss"] for h in want["history"]]


# ==================================================================== 6. run files
# (the report's and the data's files: tests/test_failures_report.py)


@pytest.mark.parametrize("kind", ["a JSON list", "a folder", "broken JSON"])
def test_a_result_json_of_another_kind_is_refused_and_kept(tmp_path, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "result.json"
    if kind == "a folder":
        path.mkdir()
    else:
        path.write_text("[1, 2]" if kind == "a JSON list" else '{"status": "compl')
    with pytest.raises(ConfigError, match="result.json is not a run record .*move it away"):
        trainer.run(make_cfg(TINY), run_dir)
    assert path.is_dir() if kind == "a folder" else path.read_text() in ("[1, 2]",
                                                                        '{"status": "compl')


FULL_DISK_AT_EPOCH_2 = """
import errno
import flexexp.tracking as tracking
_real, _n = tracking.atomic_write_bytes, {"n": 0}
def _full(path, data):
    if str(path).endswith("last.pt"):
        _n["n"] += 1
        if _n["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return _real(path, data)
tracking.atomic_write_bytes = _full
"""


def test_a_full_disk_is_one_paragraph_and_keeps_the_last_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    proc = start_train([*TINY, "trainer.epochs=3", f"paths.runs={runs}"], tmp_path,
                       FULL_DISK_AT_EPOCH_2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "No space left on device" in err and "Free space" in err and "Traceback" not in err
    run_dir = only_run_dir(runs)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    rec = read_json(run_dir / "result.json")
    assert rec["status"] == "failed" and "No space left on device" in rec["error"]


def test_a_runs_root_that_cannot_be_written_is_one_paragraph(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli([*TINY, f"paths.runs={blocker}"], cwd=tmp_path)
    assert proc.returncode == 2 and "paths.runs" in proc.stderr
    assert "Traceback" not in proc.stderr and blocker.read_text() == "not a folder"


# ==================================================================== 7. sweeps


def test_a_sweep_records_and_lists_every_failed_cell(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(["-m", *TINY, "pool=flex_reg_dropout", "pool.dropout=0.1,1.5,2.0",
                    f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    recs = {r["error"] if r["status"] == "failed" else "ok": r
            for r in map(read_json, runs.rglob("result.json"))}
    assert len(recs) == 3 and "ok" in recs  # the good cell ran after (or before) the bad ones
    failed = [p.parent for p in runs.rglob("result.json") if read_json(p)["status"] == "failed"]
    assert len(failed) == 2 and all((d / "error.txt").exists() for d in failed)
    summary = proc.stderr[proc.stderr.index("sweep: 3 cells"):]
    assert "1 completed, 2 not" in summary
    for value in ("1.5", "2.0"):
        assert f"pool.dropout={value} is outside its range" in summary
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_sweeps_sharing_cells_both_succeed(tmp_path):
    runs = tmp_path / "runs"
    args = ["-m", *TINY, "seed=0,1", f"paths.runs={runs}"]
    env_cmd = [sys.executable, "-m", "flexexp.train", *args]
    procs = [subprocess.Popen(env_cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    recs = [read_json(p) for p in runs.rglob("result.json")]
    assert len(recs) == 2 and all(r["status"] == "completed" for r in recs)


# ==================================================================== 8. output


def test_an_error_is_printed_once_and_kept_in_the_log(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli([*TINY, "sched=constant", "optim.lr=1e6", f"paths.runs={runs}"],
                   cwd=tmp_path)  # diverges in its first epoch, after the cell was claimed
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[-1].removeprefix("error: ")[:60]
    assert "diverged" in first and text.count(first) == 1, text[-2000:]
    logs = list(runs.rglob("train.log"))
    assert len(logs) == 1 and logs[0].read_text().count(first) == 1


def test_the_log_has_no_progress_bars_and_ends_with_the_result(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli([*TINY, "trainer.epochs=2", "trainer.progress=true", f"paths.runs={runs}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "\r" not in text and "it/s" not in text  # not a terminal: no bars
    run_dir = only_run_dir(runs)
    acc = read_json(run_dir / "result.json")["test_acc"]
    last = [ln for ln in text.splitlines() if "done: synthetic avg sac=off seed 0" in ln]
    assert len(last) == 1 and f"test_acc {acc:.2f}%" in last[0] and str(run_dir) in last[0]
    assert "epoch 2/2: loss" in text


def test_help_names_every_command():
    proc = run_cli(["--help"], cwd=REPO)
    assert proc.returncode == 0
    for command in ("flexexp.report", "flexexp.data", "flexexp.bench", "flexexp.probe"):
        assert command in proc.stdout, command


# ==================================================================== found by a tester's run
# (a catalogue of 107 further bad inputs run against the CLI; these were the ones that
# recorded something wrong or ended in a raw traceback)


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=1e308"], r"optim.lr=1e\+308 is outside its range \(0, 1e\+06\]"),
    (["seed=99999999999999999999"], r"seed=.* is outside its range \[0, 4.29497e\+09\]"),
    (["model.width=100000"], r"model.width=100000 is outside its range \[1, 64\]"),
    (["dataset.translate=16"], r"dataset.translate=16 shifts images by their whole size"),
])
def test_values_that_overflow_or_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg([*TINY, *overrides]))


def test_an_empty_runs_root_is_refused(tmp_path):
    proc = run_cli([*TINY, "paths.runs="], cwd=tmp_path)
    assert proc.returncode == 2 and "paths.runs= is empty" in proc.stderr


def test_a_sweep_with_an_unknown_option_is_refused_before_it_starts(tmp_path):
    proc = run_cli(["-m", *TINY, "pool=avg,flx", f"paths.runs={tmp_path / 'runs'}"],
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Did you mean 'flex'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_a_gpu_that_is_not_there_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        trainer.run(make_cfg([*TINY, "trainer.device=cuda:7"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_completed_resume_drops_the_old_traceback(tmp_path, monkeypatch):
    cfg = make_cfg([*TINY, "trainer.epochs=2"])
    interrupt_in_epoch_2(cfg, tmp_path / "run", monkeypatch)
    assert (tmp_path / "run" / "error.txt").exists()
    assert trainer.run(cfg, tmp_path / "run")["status"] == "completed"
    assert not (tmp_path / "run" / "error.txt").exists()


def test_ctrl_c_is_one_line_and_the_record_says_interrupted(tmp_path):
    runs = tmp_path / "runs"
    code = signal_mid_epoch_2("SIGINT")
    proc = start_train([*LONG, f"paths.runs={runs}"], tmp_path, code)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert read_json(only_run_dir(runs) / "result.json")["status"] == "interrupted"


def test_the_data_command_checks_ranges_and_names_unknown_commands(tmp_path):
    proc = run_cli(["info", "dataset=synthetic", "dataset.image_size=-3"], cwd=tmp_path,
                   module="flexexp.data")
    assert proc.returncode == 2 and "dataset.image_size=-3 is outside its range" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(["frob", "dataset=digits"], cwd=tmp_path, module="flexexp.data")
    assert proc.returncode == 2 and "unknown command 'frob'" in proc.stderr


# ==================================================================== found by a review


def test_a_batch_of_one_with_gfgps_batchnorm_is_refused_before_training(tmp_path):
    # 256 images in batches of 85: the last batch holds one image
    cfg = make_cfg([*TINY, "pool=gfgp", "trainer.batch_size=85"])
    with pytest.raises(ConfigError, match="leave a batch of one image.*guide=simple"):
        trainer.run(cfg, tmp_path / "run")
    assert trainer.run(make_cfg([*TINY, "pool=gfgp", "pool.guide=simple",
                                 "trainer.batch_size=85"]), tmp_path / "ok")["status"] \
        == "completed"


def test_a_checkpoint_of_another_device_or_precision_is_not_resumed(tmp_path, monkeypatch):
    cfg = make_cfg([*TINY, "trainer.epochs=2"])
    interrupt_in_epoch_2(cfg, tmp_path / "run", monkeypatch)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["ran_on"] == {"device": "cpu", "precision": "float32"}
    ckpt["ran_on"] = {"device": "cuda", "precision": "bfloat16"}  # as a GPU run leaves it
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(ConfigError, match="trained on cuda at bfloat16, this run is on cpu at "
                                          "float32.*delete last.pt"):
        trainer.run(cfg, tmp_path / "run")


def test_a_gpu_index_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="this machine has 2 GPU"):
        engine.resolve_device("cuda:5")
    with pytest.raises(ConfigError, match="is not a device"):
        validate(make_cfg(["trainer.device=cuda:abc"]))


def test_a_refused_run_leaves_no_folder_even_after_taking_its_lock(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(["dataset=cifar10", f"dataset.root={tmp_path / 'none'}",
                    "dataset.download=false", "trainer.device=cpu", f"paths.runs={runs}"],
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert [p for p in runs.rglob("*") if p.is_file()] == [] or not runs.exists()
