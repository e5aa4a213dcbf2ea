"""End-to-end training: the CLI, the run record, TensorBoard, determinism, resume, skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_cfg, run_cli
from helpers import unit_roundoff

from flexexp import engine, trainer
from flexexp.config import cell_name
from flexexp.tracking import read_json

RESULT_KEYS = {
    "dataset", "pool", "sac", "seed", "epochs", "status", "test_acc", "test_acc_aux", "history",
    "num_params", "wall_time_s", "images_per_s", "device", "torch_version", "git_commit",
}


def only_run_dir(runs: Path) -> Path:
    dirs = [p.parent for p in runs.rglob("cell.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_cli_one_epoch_writes_complete_record_and_tensorboard(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli([*TINY, "pool=flex_reg", "sac=on", f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = only_run_dir(runs)
    # the directory names the cell
    assert run_dir.relative_to(runs).as_posix().startswith("synthetic/flex_reg/sac_on/seed0-")
    rec = read_json(run_dir / "result.json")
    assert RESULT_KEYS <= rec.keys()
    assert rec["status"] == "completed"
    assert (rec["dataset"], rec["pool"], rec["sac"], rec["epochs"]) == ("synthetic", "flex_reg",
                                                                        True, 1)
    assert set(rec["test_acc_aux"]) == {"stage1", "stage2"}
    assert 0 <= rec["test_acc"] <= 100 and len(rec["history"]) == 1
    assert rec["history"][0]["penalty"] is not None
    assert rec["device"] == "cpu" and rec["torch_version"] == torch.__version__
    assert (run_dir / "config.yaml").exists() and (run_dir / "last.pt").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train.log").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/penalty", "train/loss_stage1", "test/acc_main",
                "test/acc_stage2"):
        assert tag in tags["scalars"], tag
    # TensorBoard stores float32: one rounding of the record's float64
    assert acc.Scalars("test/acc_main")[0].value == pytest.approx(
        rec["test_acc"], rel=unit_roundoff(torch.float32), abs=0)
    assert any(t.startswith("flexpool/") for t in tags["images"])

    # a second start of the same cell skips it
    again = run_cli([*TINY, "pool=flex_reg", "sac=on", f"paths.runs={runs}"], cwd=tmp_path)
    assert again.returncode == 0
    assert "already completed" in again.stdout + again.stderr
    assert read_json(run_dir / "result.json")["wall_time_s"] == rec["wall_time_s"]


def test_top5_for_many_classes(tmp_path):
    cfg = make_cfg([*TINY, "dataset.num_classes=20", "sac=on"])
    rec = trainer.run(cfg, tmp_path / "run")
    assert 0 <= rec["test_acc"] <= rec["test_top5"] <= 100
    for head in ("stage1", "stage2"):
        assert rec["test_acc_aux"][head] <= rec["test_top5_aux"][head] <= 100


def test_same_seed_gives_identical_results(tmp_path):
    cfg = make_cfg([*TINY, "pool=flex", "trainer.epochs=2"])
    a = trainer.run(cfg, tmp_path / "a")
    b = trainer.run(cfg, tmp_path / "b")
    assert a["test_acc"] == b["test_acc"]
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    c = trainer.run(make_cfg([*TINY, "pool=flex", "trainer.epochs=2", "seed=1"]), tmp_path / "c")
    assert c["history"][-1]["train_loss"] != a["history"][-1]["train_loss"]


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    cfg = make_cfg([*TINY, "pool=flex_reg_dropout", "sac=on", "trainer.epochs=3"])
    ref = trainer.run(cfg, tmp_path / "ref")
    ref_state = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)

    calls = {"n": 0}
    real_evaluate = engine.evaluate

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # dies during epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg, tmp_path / "cut")
    rec = read_json(tmp_path / "cut" / "result.json")
    assert rec["status"] == "failed" and "simulated kill" in rec["error"]
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1

    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    resumed = trainer.run(cfg, tmp_path / "cut")
    assert resumed["status"] == "completed"
    assert resumed["test_acc"] == ref["test_acc"]
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in ref_state["model"].items():
        assert torch.equal(v, state["model"][k]), k


def test_run_dir_of_another_config_is_refused(tmp_path):
    trainer.run(make_cfg(TINY), tmp_path / "run")
    with pytest.raises(Exception, match="different config .*trainer.epochs"):
        trainer.run(make_cfg([*TINY, "trainer.epochs=2"]), tmp_path / "run")
    assert read_json(tmp_path / "run" / "result.json")["status"] == "completed"


def test_corrupt_checkpoint_is_moved_aside(tmp_path):
    cfg = make_cfg(TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")
    rec = trainer.run(cfg, run_dir)
    assert rec["status"] == "completed"
    aside = list(run_dir.glob("last.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"not a checkpoint"


def test_bad_config_on_cli_exits_2_with_one_paragraph(tmp_path):
    proc = run_cli([*TINY, "trainer.epochs=0", f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.epochs=0 must be positive" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(["pool=flexx"], cwd=tmp_path)
    assert proc.returncode == 2 and "Did you mean 'flex'" in proc.stderr


def test_cell_name_matches_run_dir(tmp_path):
    cfg = make_cfg([*TINY, "pool=flex"])
    proc = run_cli([*TINY, "pool=flex", f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / cell_name(cfg) / "result.json").exists()
    json.loads((tmp_path / cell_name(cfg) / "cell.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sac", ["off", "on"])
@pytest.mark.parametrize("pool", ["avg", "flex", "flex_reg", "flex_reg_dropout", "flex_softmax"])
def test_every_variant_learns_digits(tmp_path, pool, sac):
    cfg = make_cfg([f"pool={pool}", f"sac={sac}", "trainer.epochs=8", "trainer.progress=false",
                    "trainer.device=cpu"])
    rec = trainer.run(cfg, tmp_path / "run")
    assert rec["test_acc"] > 80.0, rec["history"][-1]  # chance is 10%
