"""flexexp.reuse: a sweep's later cells take the decoded data and the compiled model of
the cell before, and compute exactly what they would have computed alone."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, make_cfg, run_cli

from flexexp import reuse, trainer
from flexexp.tracking import read_json


def weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def test_a_reused_cell_computes_what_a_fresh_one_does(tmp_path):
    cells = [*TINY, "trainer.epochs=2", "pool=flex_reg_dropout", "sac=on"]
    reuse.clear()
    first = trainer.run(make_cfg([*cells, "seed=0"]), tmp_path / "s0")
    second = trainer.run(make_cfg([*cells, "seed=1"]), tmp_path / "s1")
    assert first["setup_reused"] == {"data": False, "model": False}
    assert second["setup_reused"] == {"data": True, "model": True}
    reuse.clear()  # the same cell in a process of its own
    alone = trainer.run(make_cfg([*cells, "seed=1"]), tmp_path / "alone")
    assert alone["setup_reused"] == {"data": False, "model": False}
    assert [h["train_loss"] for h in second["history"]] == \
        [h["train_loss"] for h in alone["history"]]
    assert second["test_acc"] == alone["test_acc"]
    a, b = weights(tmp_path / "s1"), weights(tmp_path / "alone")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_what_changes_the_model_or_the_data_is_built_again(tmp_path):
    reuse.clear()
    trainer.run(make_cfg([*TINY, "pool=avg"]), tmp_path / "a")
    other_pool = trainer.run(make_cfg([*TINY, "pool=flex"]), tmp_path / "b")
    assert other_pool["setup_reused"] == {"data": True, "model": False}
    other_data = trainer.run(make_cfg([*TINY, "pool=flex", "dataset.data_seed=3"]),
                             tmp_path / "c")
    assert other_data["setup_reused"] == {"data": False, "model": True}
    same_model_other_weights = trainer.run(
        make_cfg([*TINY, "pool=flex", "model.local_pool_args.s3pool.grid=4"]), tmp_path / "d")
    # a key of a layer this model does not build changes its config, not its structure:
    # the key holds the model section, so it is built again (never wrongly reused)
    assert same_model_other_weights["setup_reused"]["model"] is False


def test_a_sweep_records_setup_times_and_one_startup(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(["-m", *TINY, "seed=0,1,2", f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = sorted((read_json(p) for p in runs.rglob("result.json")), key=lambda r: r["seed"])
    assert [r["setup_reused"]["model"] for r in recs] == [False, True, True]
    assert [r["setup_reused"]["data"] for r in recs] == [False, True, True]
    # the process's start-up before its first cell: one number, the same in every cell
    assert len({r["startup_s"] for r in recs}) == 1 and recs[0]["startup_s"] > 0
    for r in recs:
        assert r["setup_s"] > 0 and r["first_step_s"] > 0
        assert r["deterministic"] is False and r["resumed_from_epoch"] is None
        assert r["compile"] == "none" and r["gpu_policy"] is None


@pytest.mark.slow
def test_a_compiled_sweep_compiles_once(tmp_path, monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    reuse.clear()
    cells = [*TINY, "trainer.compile=default", "dataset.image_size=8", "model.depth=8"]
    recs, graphs = [], []
    for seed in range(3):
        recs.append(trainer.run(make_cfg([*cells, f"seed={seed}"]), tmp_path / f"s{seed}"))
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert [r["setup_reused"]["model"] for r in recs] == [False, True, True]
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0]
    assert all(r["status"] == "completed" and r["compile"] == "default" for r in recs)
    cost = [r["setup_s"] + r["first_step_s"] for r in recs]
    print(f"set-up + first step per cell: {', '.join(f'{c:.2f}' for c in cost)} s")
