"""python -m flexexp.tune: a search on the validation split that never reads the test split.

The studies are tiny (depth-8 width-1 ResNets, 2 epochs on the embedded digits, 3 trials):
what is tested is the bookkeeping (the SQLite study, the run directories, resume after a
kill, the best trial's command line) and that the objective is the validation accuracy.
"""

from __future__ import annotations

import dataclasses
import shlex
import signal
from pathlib import Path

import optuna
import pytest
import torch
from helpers import TINY, make_cfg, run_cli, signal_mid_epoch_2, start_train
from optuna.trial import FixedTrial, TrialState

from flexexp import engine, trainer, tune
from flexexp.errors import DivergenceError
from flexexp.tracking import read_json

#: A tiny study: 3 trials of a depth-8 width-1 model for 2 epochs on digits.
TUNE = ["experiment=tune_reg", "trainer.epochs=2", "model.depth=8", "model.width=1",
        "trainer.device=cpu", "trainer.progress=false", "trainer.threads=1", "tune.n_trials=3"]


def load(runs: Path, name: str = "tune_reg") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'tune' / f'{name}.db'}")


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE,))


def weights_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    text = next(o for o in trial.user_attrs["overrides"] if o.startswith("sac.weights="))
    return [float(w) for w in text.split("=", 1)[1].strip("[]").split(",")]


def cell_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.rglob("cell.json"))


def mtimes(runs: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in runs.rglob("last.pt")}


def check_values_are_the_records(study: optuna.Study) -> None:
    """Each complete trial's value is its cell's val_acc, read back from result.json."""
    for t in complete(study):
        rec = read_json(Path(t.user_attrs["run_dir"]) / "result.json")
        assert rec["status"] == "completed"
        assert t.value == rec["val_acc"] == rec["history"][-1]["val_acc"]


# ---------------------------------------------------------------------------- the CLI


def test_tiny_study_writes_sqlite_prints_the_best_command_and_reruns_nothing(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli([*TUNE, f"paths.runs={runs}"], cwd=tmp_path, module="flexexp.tune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (runs / "tune" / "tune_reg.db").is_file()
    study = load(runs)
    assert len(study.trials) == 3 and len(complete(study)) == 3
    check_values_are_the_records(study)
    for t in study.trials:
        l1, l2, l3 = weights_of(t)
        assert 0 < l1 < l2 < l3 and l1 + l2 + l3 == pytest.approx(1, abs=3e-4)  # 4 digits each
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.parent.parent == runs / "digits" / "flex_reg_dropout"
        assert t.user_attrs["trained"] is True
    assert len(cell_dirs(runs)) == 3
    # the table, and the best trial's command line, which finds its cell completed
    assert "trial  state" in proc.stdout and proc.stdout.count("COMPLETE") == 3
    line = next(s for s in proc.stdout.splitlines() if "python -m flexexp.train" in s)
    args = shlex.split(line)[3:]
    assert "experiment=tune_reg" in args and not any(a.startswith("tune.") for a in args)
    assert set(study.best_trial.user_attrs["overrides"]) <= set(args)
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already completed" in again.stdout + again.stderr
    # the same study again: complete, nothing trained, nothing new
    before = mtimes(runs)
    rerun = run_cli([*TUNE, f"paths.runs={runs}"], cwd=tmp_path, module="flexexp.tune")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert mtimes(runs) == before and len(load(runs).trials) == 3
    assert "done:" not in rerun.stderr  # no cell ran, not even to be read


def test_more_trials_read_done_cells_and_train_only_new_ones(tmp_path):
    """A deleted study replays its seeded draws: the cells are read, not trained again."""
    runs = tmp_path / "runs"
    args = [*TUNE, "trainer.epochs=1", "tune.n_trials=2", f"paths.runs={runs}"]
    assert tune.main(args) == 0
    before = mtimes(runs)
    (runs / "tune" / "tune_reg.db").unlink()
    assert tune.main(args) == 0
    study = load(runs)
    assert [t.user_attrs["trained"] for t in study.trials] == [False, False]
    assert mtimes(runs) == before
    check_values_are_the_records(study)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM"])
def test_a_killed_study_resumes_its_cell_and_ends_with_n_trials(tmp_path, name):
    runs = tmp_path / "runs"
    args = [*TUNE, f"paths.runs={runs}"]
    proc = start_train(args, tmp_path, signal_mid_epoch_2(name), module="flexexp.tune")
    assert proc.wait(timeout=300) == -getattr(signal, name), proc.stderr.read()[-3000:]
    cut = load(runs).trials
    # SIGKILL leaves the trial RUNNING (the next run requeues it); SIGTERM stops it cleanly:
    # failed, and its parameters queued again at once
    if name == "SIGKILL":
        assert [t.state for t in cut] == [TrialState.RUNNING]
    else:
        assert [t.state for t in cut] == [TrialState.FAIL, TrialState.WAITING]
        assert cut[1].system_attrs["fixed_params"] == cut[0].params
        assert read_json(Path(cut[0].user_attrs["run_dir"]) / "result.json")["status"] == \
            "interrupted"
    killed_dir = Path(cut[0].user_attrs["run_dir"])
    assert (killed_dir / "last.pt").is_file()

    rerun = run_cli(args, cwd=tmp_path, module="flexexp.tune")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = load(runs)
    done = complete(study)
    assert len(done) == 3
    assert study.trials[0].state == TrialState.FAIL
    resumed = [t for t in done if t.user_attrs.get("resumes_trial") == 0]
    assert len(resumed) == 1
    assert resumed[0].user_attrs["overrides"] == cut[0].user_attrs["overrides"]
    assert resumed[0].user_attrs["run_dir"] == str(killed_dir)
    assert read_json(killed_dir / "result.json")["resumed_from_epoch"] == 1
    # one directory per complete trial, each completed: no orphaned cell
    assert cell_dirs(runs) == sorted(Path(t.user_attrs["run_dir"]) for t in done)
    check_values_are_the_records(study)


# ---------------------------------------------------------------------------- the objective


def test_the_objective_never_reads_the_test_split(tmp_path, monkeypatch):
    """The same study with the test labels shuffled: the same trials, the same values;
    only the records' test accuracies change."""
    args = [*TUNE, "tune.n_trials=2"]
    assert tune.main([*args, f"paths.runs={tmp_path / 'a'}"]) == 0
    real = engine.make_test_loader

    def shuffled(cfg, arrays, device, fmt):
        perm = torch.randperm(len(arrays.y_test), generator=torch.Generator().manual_seed(1))
        return real(cfg, dataclasses.replace(arrays, y_test=arrays.y_test[perm]), device, fmt)

    monkeypatch.setattr(engine, "make_test_loader", shuffled)
    assert tune.main([*args, f"paths.runs={tmp_path / 'b'}"]) == 0
    a, b = load(tmp_path / "a").trials, load(tmp_path / "b").trials
    assert [t.user_attrs["overrides"] for t in a] == [t.user_attrs["overrides"] for t in b]
    assert [t.value for t in a] == [t.value for t in b]
    tests = [[read_json(Path(t.user_attrs["run_dir"]) / "result.json")["test_acc"] for t in s]
             for s in (a, b)]
    assert tests[0] != tests[1]  # the test split did change


def test_a_diverged_cell_fails_its_trial_not_the_study(tmp_path, monkeypatch, capsys):
    real, calls = trainer.run, {"n": 0}

    def diverging_once(cfg, run_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise DivergenceError("the run diverged in epoch 1: simulated")
        return real(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(trainer, "run", diverging_once)
    runs = tmp_path / "runs"
    assert tune.main([*TUNE, "trainer.epochs=1", "tune.n_trials=2", f"paths.runs={runs}"]) == 0
    study = load(runs)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                               TrialState.COMPLETE]
    assert "simulated" in study.trials[0].user_attrs["error"]
    assert "FAIL" in capsys.readouterr().out


def test_a_run_records_validation_beside_test_only_with_a_split(tmp_path):
    with_val = trainer.run(make_cfg([*TINY, "dataset.val_fraction=0.25"]), tmp_path / "a")
    for rec in (with_val, with_val["history"][-1]):
        assert 0 <= rec["val_acc"] <= 100 and rec["val_loss"] > 0 and "test_acc" in rec
    plain = trainer.run(make_cfg(TINY), tmp_path / "b")
    assert not any(k.startswith("val_") for k in plain) and "val_acc" not in plain["history"][0]


# ---------------------------------------------------------------------------- the space


@pytest.mark.parametrize("r12,r23", [(0.05, 0.05), (0.95, 0.95), (0.5, 0.2 / 0.7),
                                     (0.9999, 0.9999), (0.123456, 0.987654)])
def test_sac_weights_increase_by_construction(r12, r23):
    text = tune.sac_weights(r12, r23)
    l1, l2, l3 = (float(w) for w in text)
    assert 0 < l1 < l2 < l3
    assert l1 + l2 + l3 == pytest.approx(1, abs=3 * 0.5 * 10 ** -3)  # 4 significant digits


def test_a_trial_composes_a_valid_cell_from_the_preset():
    from flexexp.config import validate

    p = tune.plan(TUNE)
    assert [x.key for x in p.space] == ["pool.reg", "pool.dropout", "sac.weights"]
    trial = FixedTrial({"pool.reg": 1e-4, "pool.dropout": 0.5, "sac.weights:l1/l2": 0.95,
                        "sac.weights:l2/l3": 0.05})
    overrides = tune.overrides_for(trial, p.space)
    assert overrides[:2] == ["pool.reg=0.0001", "pool.dropout=0.5"]
    cfg = make_cfg([*TUNE, *overrides])
    validate(cfg)
    assert cfg.pool.reg == 1e-4 and list(cfg.sac.weights) == sorted(cfg.sac.weights)
    # the tune section is not part of the cell
    from flexexp.config import cell_hash
    assert cell_hash(cfg) == cell_hash(make_cfg([*TUNE, *overrides, "tune.n_trials=99"]))


@pytest.mark.parametrize("extra,message", [
    (["dataset.val_fraction=0"], "tuning on the test split is not allowed: "
                                 "dataset.val_fraction=0"),
    (["tune.metric=test_acc"], "tuning on the test split is not allowed: tune.metric=test_acc"),
    (["+tune.params.pool.regg={type:float,low:0.1,high:1}"], "no key 'pool.regg'. Did you "
                                                             "mean 'pool.reg'?"),
    (["tune.params.pool.dropout.high=1.5"], "tune.params.pool.dropout.high=1.5 is outside"),
    (["+tune.params.paths.runs={type:categorical,choices:[a,b]}"], "does not change what"),
    (["tune.params.sac.weights.high=1.0"], "0 < low < high < 1"),
    (["sac=off"], "sac=off has no auxiliary heads"),
    (["tune.direction=up"], "tune.direction='up' must be maximize or minimize"),
    (["trainer.epochs=0"], "trainer.epochs=0 is outside its range"),
    (["tune.study=../x"], "tune.study='../x' must be a plain name"),
    (["tune.metric=val_top5"], "tune.metric=val_top5 is not a metric of the run record"),
    (["tune.direction=minimize"], "would pick the worst val_acc: use tune.direction=maximize"),
    (["+tune.params.pool.reg.step=0.1"], "a log range takes no step"),
    (["+tune.params.pool.dropout.step=0"], "step=0 must be a number > 0"),
    (["+tune.params.model.depth={type:int,low:8,high:20.5}"], "an int range needs whole"),
])
def test_bad_settings_exit_2_with_one_paragraph(tmp_path, capsys, extra, message):
    runs = tmp_path / "runs"
    assert tune.main([*TUNE, *extra, f"paths.runs={runs}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not runs.exists()  # refused before anything was written


def test_a_study_of_another_base_config_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert tune.main([*TUNE, "trainer.epochs=1", "tune.n_trials=1", f"paths.runs={runs}"]) == 0
    # another search space or trial count is fine; another base cell is not
    assert tune.main([*TUNE, "trainer.epochs=1", "tune.n_trials=1", f"paths.runs={runs}",
                      "tune.params.pool.dropout.high=0.4"]) == 0
    capsys.readouterr()
    assert tune.main([*TUNE, "trainer.epochs=2", "tune.n_trials=1", f"paths.runs={runs}"]) == 2
    assert "searched another base config (differs in: trainer.epochs)" in capsys.readouterr().err


def test_signal_blocks_nest_and_put_back_what_they_found():
    """The study's block holds the cells' blocks: a signal in either stops both, and the
    handlers of before are back once both have ended."""
    import os

    from flexexp import signals

    before = signal.getsignal(signal.SIGTERM)
    with signals.catch():
        os.kill(os.getpid(), signal.SIGUSR1)  # between two trials
        with signals.catch():
            with pytest.raises(signals.Interrupted):
                signals.check()  # the inner block kept the outer one's flag
        assert signals.pending() == signal.SIGUSR1
        signals._state["signum"] = None
    assert signal.getsignal(signal.SIGTERM) is before
