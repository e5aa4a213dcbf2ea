"""Trackers (flexexp.trackers, the config group ``logger``): what each one holds after a
run, a failed run and a killed-and-resumed sweep, read back from its own files or store."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    KILL_MID_EPOCH_2,
    TINY,
    interrupt_in_epoch_2,
    make_cfg,
    only_run_dir,
    run_cli,
    start_train,
)

from flexexp import trackers, trainer
from flexexp.config import cell_name
from flexexp.errors import ConfigError
from flexexp.tracking import read_json


@pytest.fixture(autouse=True)
def _own_wandb_service():
    """Each test's W&B runs talk to a service of their own: wandb keeps the service of
    this process in ``WANDB_SERVICE``, which the subprocesses of a later test would inherit
    and share (a run killed there would stay open in this process's service)."""
    yield
    import wandb

    wandb.teardown()


def test_scalars_name_every_number_of_an_epoch():
    entry = {"epoch": 3, "lr": 0.1, "beta1": 0.9, "train_loss": 2.0, "train_acc": 50.0,
             "train_loss_heads": {"stage1": 2.5, "main": 1.5}, "penalty": None,
             "images_per_s": 10.0, "test_acc": 60.0, "test_acc_aux": {"stage1": 40.0},
             "test_top5": 90.0, "val_acc": 55.0, "val_acc_aux": {"stage1": 35.0},
             "flag": True}
    assert trackers.scalars(entry) == {
        "train/lr": 0.1, "train/beta1": 0.9, "train/loss": 2.0, "train/acc": 50.0,
        "train/loss_stage1": 2.5, "train/loss_main": 1.5, "train/images_per_s": 10.0,
        "test/acc_main": 60.0, "test/acc_stage1": 40.0, "test/top5_main": 90.0,
        "val/acc_main": 55.0, "val/acc_stage1": 35.0}


def test_logger_group_takes_one_tracker_or_a_list():
    assert trackers.chosen(make_cfg([])) == ["tensorboard"]
    assert trackers.chosen(make_cfg(["logger=none"])) == []
    several = make_cfg(["logger=[wandb,csv,mlflow]"])
    assert trackers.chosen(several) == ["csv", "mlflow", "wandb"]
    assert several.logger.mode == "offline" and several.logger.experiment == "flexexp"
    assert trackers.mlflow_uri(make_cfg(["logger=mlflow", "paths.runs=/x/runs"])) == \
        "sqlite:////x/mlflow.db"


@pytest.mark.parametrize("overrides, words", [
    (["logger=wandb", "logger.mode=onlin"], "not a W&B mode"),
    (["logger=mlflow", "logger.experiment='  '"], "must name the mlflow experiment"),
])
def test_bad_logger_settings_are_refused(overrides, words):
    from flexexp.config import validate

    with pytest.raises(ConfigError, match=words):
        validate(make_cfg(overrides))


def test_cli_names_the_tracker_a_setting_belongs_to(tmp_path):
    proc = run_cli([*TINY, "logger=csv", "logger.mode=online"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "it is a setting of logger=wandb" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli([*TINY, "logger=[csv,mlfow]"], cwd=tmp_path)
    assert proc.returncode == 2 and "Did you mean 'mlflow'" in proc.stderr


def test_csv_holds_one_row_per_epoch_equal_to_the_history(tmp_path):
    cfg = make_cfg([*TINY, "trainer.epochs=3", "sac=on", "pool=flex_reg", "logger=csv",
                    "trainer.eval_every=2"])
    rec = trainer.run(cfg, tmp_path / "run")
    table = pd.read_csv(tmp_path / "run" / trackers.METRICS_FILE)
    assert list(table.epoch) == [1, 2, 3]
    for row, e in zip(table.to_dict("records"), rec["history"], strict=True):
        want = trackers.scalars(e)
        # the CSV prints floats with repr: exact
        assert {k: row[k] for k in want} == want
        assert pd.isna(row["test/acc_main"]) == ("test_acc" not in e)  # epoch 1: no test
    assert not (tmp_path / "run" / "tb").exists()  # TensorBoard was not chosen


def _mlflow_runs(uri: str, experiment: str = "flexexp"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def _assert_mlflow_run(client, run, rec: dict, cell: str) -> None:
    """One MLflow run holds the cell: name, params, every epoch once, artifact, status."""
    assert run.info.run_name == cell and run.info.status == "FINISHED"
    assert run.data.tags["flexexp.status"] == "completed"
    assert run.data.params["pool.name"] == rec["pool"] and run.data.params["seed"] == \
        str(rec["seed"])
    for key in ("train/loss", "train/lr", "test/acc_main"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist] == [e["epoch"] for e in rec["history"]], key
        assert [m.value for m in hist] == [trackers.scalars(e)[key] for e in rec["history"]]
    art = Path(client.download_artifacts(run.info.run_id, "result.json"))
    assert json.loads(art.read_text()) == json.loads(
        (Path(rec["run_dir"]) / "result.json").read_text())


def test_mlflow_file_store_holds_one_finished_run_per_cell(tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = make_cfg([*TINY, "trainer.epochs=2", "logger=mlflow", f"logger.tracking_uri={uri}"])
    rec = trainer.run(cfg, tmp_path / "run")
    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1
    _assert_mlflow_run(client, runs[0], rec, cell_name(cfg))
    # a second start skips the completed cell: no second MLflow run
    trainer.run(cfg, tmp_path / "run")
    assert len(_mlflow_runs(uri)[1]) == 1


def test_mlflow_default_store_sits_beside_the_runs_and_a_failed_cell_ends_failed(tmp_path):
    from flexexp.errors import DivergenceError

    runs = tmp_path / "runs"
    cfg = make_cfg([*TINY, "logger=mlflow", f"paths.runs={runs}", "optim.lr=1e5"])
    with pytest.raises(DivergenceError):
        trainer.run(cfg, runs / "cell")
    assert (tmp_path / "mlflow.db").is_file() and not list(runs.rglob("*.db"))
    client, found = _mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(found) == 1 and found[0].info.status == "FAILED"
    assert found[0].data.tags["flexexp.status"] == "failed"
    art = Path(client.download_artifacts(found[0].info.run_id, "result.json"))
    assert read_json(art)["status"] == "failed"
    assert found[0].info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (no other network), stopped afterwards."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health in 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_mlflow_server_on_localhost_receives_the_cell(tmp_path, mlflow_server):
    runs = tmp_path / "runs"
    args = [*TINY, "trainer.epochs=2", "logger=mlflow", f"logger.tracking_uri={mlflow_server}",
            "logger.experiment=served", f"paths.runs={runs}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = read_json(only_run_dir(runs) / "result.json")
    client, found = _mlflow_runs(mlflow_server, "served")
    assert len(found) == 1
    _assert_mlflow_run(client, found[0], rec, cell_name(make_cfg(args)))


def test_unreachable_mlflow_server_stops_the_cell_before_training(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli([*TINY, "logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:"
                    f"{_free_port()}", f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not start this cell's run" in proc.stderr
    assert not list(runs.rglob("last.pt"))  # nothing was trained


# ---------------------------------------------------------------------------- W&B


def read_wandb(run_dir: Path) -> list[dict]:
    """Every record of every offline W&B run in ``run_dir/wandb``, in order: the
    transaction log's 32 KiB blocks of CRC'd chunks (``:W&B`` header, 7 bytes), each
    record a ``wandb_internal_pb2.Record``. As ``{"kind": ..., ...}`` dicts."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for data in _wandb_chunks(path.read_bytes()):
            r = pb.Record()
            r.ParseFromString(data)
            kind = r.WhichOneof("record_type")
            item = {"kind": kind, "file": path.parent.name}
            if kind == "run":
                item.update(id=r.run.run_id, name=r.run.display_name)
            elif kind == "history":
                item.update(step=r.history.step.num, values={
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item})
            elif kind == "summary":
                item.update(values={i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in r.summary.update})
            elif kind == "exit":
                item.update(exit_code=r.exit.exit_code)
            out.append(item)
    return out


def _wandb_chunks(raw: bytes, block: int = 32768):
    assert raw[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield buf
            buf = b""


def _wandb_history(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r["values"][key]) for r in records
            if r["kind"] == "history" and key in r["values"]]


def test_wandb_offline_run_holds_every_epoch_and_the_end_status(tmp_path):
    cfg = make_cfg([*TINY, "trainer.epochs=2", "logger=wandb"])
    rec = trainer.run(cfg, tmp_path / "run")
    records = read_wandb(tmp_path / "run")
    (run,) = [r for r in records if r["kind"] == "run"]
    assert run["id"] == read_json(tmp_path / "run" / trackers.STATE_FILE)["wandb"]["run_id"]
    assert run["name"] == cell_name(cfg)
    assert _wandb_history(records, "train/loss") == [
        (e["epoch"], e["train_loss"]) for e in rec["history"]]
    summary = {k: v for r in records if r["kind"] == "summary" for k, v in r["values"].items()}
    assert summary["status"] == "completed" and summary["test_acc"] == rec["test_acc"]
    assert [r["exit_code"] for r in records if r["kind"] == "exit"] == [0]

    failed = make_cfg([*TINY, "logger=wandb", "optim.lr=1e5"])
    with pytest.raises(Exception, match="diverged"):
        trainer.run(failed, tmp_path / "failed")
    records = read_wandb(tmp_path / "failed")
    assert [r["exit_code"] for r in records if r["kind"] == "exit"] == [1]


# ---------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_sweep_killed_mid_cell_continues_one_tracker_run_per_cell(tmp_path):
    """A sweep SIGKILLed in epoch 2 of its first cell, then run again: one MLflow run per
    cell with every epoch once, one W&B run id per cell, a CSV row per epoch."""
    runs = tmp_path / "runs"
    args = ["-m", *TINY, "trainer.epochs=3", "seed=0,1", f"paths.runs={runs}",
            "logger=[tensorboard,csv,mlflow,wandb]"]
    proc = start_train(args, tmp_path, KILL_MID_EPOCH_2)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    killed = [p.parent for p in runs.rglob("cell.json")]
    assert len(killed) == 1 and not (killed[0] / "result.json").exists()
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    recs = {r["seed"]: r for r in (read_json(p) for p in runs.rglob("result.json"))}
    assert sorted(recs) == [0, 1] and recs[0]["resumed_from_epoch"] == 1

    client, found = _mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cells = {_cell(runs, r): r for r in recs.values()}
    assert sorted(r.info.run_name for r in found) == sorted(cells)  # one run per cell
    for run in found:
        _assert_mlflow_run(client, run, cells[run.info.run_name], run.info.run_name)
    cut = Path(recs[0]["run_dir"])
    records = read_wandb(cut)
    ids = {r["id"] for r in records if r["kind"] == "run"}
    assert ids == {read_json(cut / trackers.STATE_FILE)["wandb"]["run_id"]}
    files = sorted(p.name for p in (cut / "wandb").glob("offline-run-*"))
    assert len(files) == 2 and {f.rsplit("-", 1)[1] for f in files} == ids  # one run id
    # what the killed process had not written died with it: the resumed one sends it all
    last = [r for r in records if r["file"] == files[-1]]
    assert [s for s, _ in _wandb_history(last, "train/loss")] == [1, 2, 3]
    assert list(pd.read_csv(cut / trackers.METRICS_FILE).epoch) == [1, 2, 3]
    _assert_tensorboard_steps(cut, "train/loss", [1, 2, 3])


def _cell(runs: Path, rec: dict) -> str:
    """The cell's name (its folder below paths.runs), as the trackers name its runs."""
    return Path(rec["run_dir"]).relative_to(runs).as_posix()


def _assert_tensorboard_steps(run_dir: Path, tag: str, steps: list[int]) -> None:
    """Every event file of ``run_dir/tb`` together logs ``tag`` at ``steps``, once each."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen = [ev.step for events in sorted((run_dir / "tb").glob("events.*"))
            for ev in EventFileLoader(str(events)).Load()
            for v in ev.summary.value if v.tag == tag]
    assert sorted(seen) == steps, seen


def _fail_once(monkeypatch, method: str, exc: Exception) -> dict:
    """Make ``CsvTracker.<method>`` raise ``exc`` at its first call, then work; the
    returned ``{"n": calls}`` counts the calls."""
    real, calls = getattr(trackers.CsvTracker, method), {"n": 0}

    def once(self, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise exc
        real(self, *args)

    monkeypatch.setattr(trackers.CsvTracker, method, once)
    return calls


def test_a_tracker_that_fails_mid_run_gets_the_missed_epochs_later(tmp_path, monkeypatch,
                                                                   caplog):
    _fail_once(monkeypatch, "history", ConnectionError("tracker away"))
    rec = trainer.run(make_cfg([*TINY, "trainer.epochs=2", "logger=csv"]), tmp_path / "run")
    assert rec["status"] == "completed"  # training never stops for a tracker
    assert "csv: could not log epoch 1 (ConnectionError: tracker away)" in caplog.text
    assert list(pd.read_csv(tmp_path / "run" / trackers.METRICS_FILE).epoch) == [1, 2]


def test_ending_a_tracker_run_is_tried_again_when_the_store_is_busy(tmp_path, monkeypatch):
    calls = _fail_once(monkeypatch, "finish", OSError("database is locked"))
    monkeypatch.setattr(trackers.time, "sleep", lambda s: None)
    trainer.run(make_cfg([*TINY, "logger=csv"]), tmp_path / "run")
    assert calls["n"] == 2  # the second try ended it


def test_wandb_disabled_mode_trains_and_writes_no_wandb_files(tmp_path):
    rec = trainer.run(make_cfg([*TINY, "logger=wandb", "logger.mode=disabled"]),
                      tmp_path / "run")
    assert rec["status"] == "completed"
    assert not list((tmp_path / "run").glob("wandb/offline-run-*"))


def test_a_cell_that_starts_again_from_scratch_gets_new_tracker_runs(tmp_path, monkeypatch,
                                                                     caplog):
    """Its checkpoint unreadable, a cell trains from epoch 0 again: the tracker run holding
    the old epoch 1 ends KILLED and a new run gets the new training, so no run mixes two."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = make_cfg([*TINY, "trainer.epochs=3", "logger=[mlflow,csv]",
                    f"logger.tracking_uri={uri}"])
    run_dir = tmp_path / "run"
    interrupt_in_epoch_2(cfg, run_dir, monkeypatch)  # the trackers hold epoch 1
    old = read_json(run_dir / trackers.STATE_FILE)["mlflow"]["run_id"]
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")  # moved aside: a fresh start
    rec = trainer.run(cfg, run_dir)
    assert rec["resumed_from_epoch"] is None
    assert "trains again from epoch 0 but its run" in caplog.text
    client, found = _mlflow_runs(uri)
    runs = {r.info.run_id: r for r in found}
    assert set(runs) == {old, read_json(run_dir / trackers.STATE_FILE)["mlflow"]["run_id"]}
    assert runs[old].info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(old, "train/loss")] == [1]
    new = next(r for r in found if r.info.run_id != old)
    _assert_mlflow_run(client, new, rec, cell_name(cfg))
    assert list(pd.read_csv(run_dir / trackers.METRICS_FILE).epoch) == [1, 2, 3]
