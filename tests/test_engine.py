"""flexexp.engine: precisions, memory formats, compile, and data-parallel training on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, approx_f64, make_cfg

from flexexp import engine, reuse, trainer
from flexexp.data.loader import Augment, DeviceLoader
from flexexp.errors import ConfigError
from flexexp.models import build_model
from flexexp.speed import channels_last_setting, compile_setting
from flexexp.tracking import read_json


@pytest.mark.parametrize("opts", [
    ["trainer.precision=bf16"],
    ["trainer.channels_last=true"],
    ["trainer.precision=bf16", "trainer.channels_last=true", "pool=flex_reg", "sac=on"],
])
def test_precisions_and_formats_train_on_cpu(tmp_path, opts):
    rec = trainer.run(make_cfg([*TINY, *opts]), tmp_path / "run")
    assert rec["status"] == "completed" and 0 <= rec["test_acc"] <= 100
    expect = "bfloat16" if "trainer.precision=bf16" in opts else "float32"
    assert rec["precision"] == expect
    assert rec["channels_last"] == ("trainer.channels_last=true" in opts)


def test_precision_auto_is_fp32_on_cpu():
    assert engine.resolve_precision("auto", torch.device("cpu")) is None
    assert engine.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_compile_settings_and_their_aliases():
    assert [compile_setting(v) for v in (True, False, "true", "False", "auto", "max-autotune")] \
        == ["default", "none", "default", "none", "auto", "max-autotune"]
    for bad in ("fast", 1, None):
        with pytest.raises(ConfigError, match="trainer.compile=.* is unknown: use auto"):
            compile_setting(bad)
    assert [channels_last_setting(v) for v in (True, "false", "auto")] == [True, False, "auto"]
    with pytest.raises(ConfigError, match="trainer.channels_last='yes' is unknown"):
        channels_last_setting("yes")


def test_compile_modes_by_device(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no GPU needed to name one
    assert engine.resolve_compile("auto", cpu) == "none"
    assert engine.resolve_compile("auto", cuda) == "reduce-overhead"
    assert engine.resolve_compile("reduce-overhead", cuda) == "reduce-overhead"
    for mode in ("none", "default", "max-autotune"):
        assert engine.resolve_compile(mode, cpu) == engine.resolve_compile(mode, cuda) == mode
    with caplog.at_level("INFO", logger="flexexp.engine"):
        assert engine.resolve_compile("reduce-overhead", cpu) == "default"
    notice = [r.getMessage() for r in caplog.records]
    assert len(notice) == 1 and "CUDA graphs need a GPU" in notice[0]


def test_speed_defaults_by_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    t = make_cfg([]).trainer
    gpu = engine.resolve_speed(t, cuda)
    assert gpu == engine.Speed(torch.bfloat16, True, "reduce-overhead", True, True)
    assert gpu.memory_format == torch.channels_last
    assert gpu.record() == {"precision": "bfloat16", "channels_last": True,
                            "compile": "reduce-overhead", "cudnn_benchmark": True,
                            "fused_optimizer": True}
    assert engine.resolve_speed(t, cpu) == engine.Speed(None, False, "none", False, False)
    # trainer=plain: the comparison setting, the same on both devices but for the
    # device-only kernels (fused optimiser, cuDNN autotuning)
    plain = make_cfg(["trainer=plain"]).trainer
    assert engine.resolve_speed(plain, cuda) == engine.Speed(None, False, "none", True, True)
    assert engine.resolve_speed(plain, cpu) == engine.resolve_speed(t, cpu)
    exact = make_cfg(["trainer.deterministic=true"]).trainer
    assert engine.resolve_speed(exact, cuda).cudnn_benchmark is False  # autotuning is not


@pytest.mark.slow
@pytest.mark.parametrize("mode,used", [("max-autotune", "max-autotune"),
                                       ("reduce-overhead", "default")])
def test_compile_mode_trains_on_cpu(tmp_path, monkeypatch, mode, used):
    # inductor's kernels go to this test's own folder (removed when it passes), and the
    # ResNet8 has the ResNet20's layers but fewer blocks: a cold compile in ~25 s
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    reuse.clear()
    rec = trainer.run(make_cfg([*TINY, f"trainer.compile={mode}", "dataset.image_size=8",
                                "model.depth=8"]), tmp_path / "run")
    assert rec["status"] == "completed" and rec["compile"] == used
    assert list((tmp_path / "inductor").rglob("*.so"))  # inductor built C++ kernels for it


def test_train_step_takes_a_compiled_forward_from_an_earlier_cell():
    """A sweep's later cell passes the compiled forward it kept (flexexp.reuse): its truth
    value would ask the wrapped loss module for a length it does not have. Compiling is
    lazy, so nothing is compiled here."""
    cfg, cpu = make_cfg(TINY), torch.device("cpu")
    model = build_model(cfg)
    speed = engine.resolve_speed(cfg.trainer, cpu)
    forward = engine.forward_module(cfg, model, cpu, engine.Dist(), "default")
    assert engine.TrainStep(cfg, model, cpu, speed, forward=forward).forward is forward


def test_loader_shards_each_batch_across_ranks():
    x = torch.arange(40, dtype=torch.uint8).reshape(40, 1, 1, 1).expand(40, 1, 4, 4).clone()
    y = torch.arange(40)
    shards = []
    for rank in range(2):
        g = torch.Generator().manual_seed(3)
        loader = DeviceLoader(x, y, 16, [0.0], [1.0], torch.device("cpu"), train=True,
                              aug=Augment(), generator=g, rank=rank, world=2, drop_last=True)
        shards.append([yb for _, yb in loader])
    single = [yb for _, yb in DeviceLoader(x, y, 16, [0.0], [1.0], torch.device("cpu"),
                                           train=True, generator=torch.Generator().manual_seed(3),
                                           drop_last=True)]
    assert len(single) == len(shards[0]) == 2  # 40 // 16, the partial batch dropped
    for b, full in enumerate(single):
        a, c = shards[0][b], shards[1][b]
        assert len(a) == len(c) == 8
        assert sorted(torch.cat([a, c]).tolist()) == sorted(full.tolist())


@pytest.mark.slow
def test_ddp_two_processes_under_torchrun_write_one_run_directory(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flexexp.train", *TINY, "trainer.epochs=2", f"paths.runs={runs}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(runs.rglob("result.json"))
    assert len(results) == 1 and len(list(runs.rglob("cell.json"))) == 1
    rec = read_json(results[0])
    assert rec["status"] == "completed" and rec["world_size"] == 2
    assert len(rec["history"]) == 2
    # every image of the epoch was seen once across the two ranks: 256 // 64 full batches
    first = rec["history"][0]
    assert first["images_per_s"] * first["epoch_time_s"] == approx_f64(256, 2)  # (n / t) * t
    assert len(list(Path(results[0].parent, ".hydra").iterdir())) == 3  # rank 0 wrote it once
