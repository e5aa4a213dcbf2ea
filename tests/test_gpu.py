"""The GPU tier: training on CUDA in every precision and compile mode, the defaults a GPU
gets, exact resume under ``trainer.deterministic``, the benchmark's record and the reuse
of the compiled model in a sweep.

Every test is marked ``gpu`` and skips where PyTorch sees no CUDA GPU (CI). On a GPU
machine ``bash scripts/gpu_check.sh`` runs them (``python -m pytest -q -m gpu
tests/test_gpu.py``); the sizes are small (ResNet8 on 16x16 images, a few steps an
epoch), so the tier takes a few minutes, most of it compilation.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from helpers import KILL_MID_EPOCH_2, make_cfg, run_cli, start_train
from omegaconf import OmegaConf

from flexexp.engine import resolve_speed
from flexexp.tracking import read_json

pytestmark = pytest.mark.gpu

#: A small heaviest cell on the GPU: FlexPool with its penalty and dropout, SAC heads.
#: 256 training images at batch 64: 4 steps an epoch (KILL_MID_EPOCH_2 kills at the third
#: of epoch 2); every batch the same shape, so nothing is compiled twice.
GPU_SMALL = [
    "dataset=synthetic",
    "dataset.image_size=16",
    "dataset.train_size=256",
    "dataset.test_size=128",
    "trainer.batch_size=64",
    "trainer.epochs=2",
    "trainer.progress=false",
    "trainer.device=cuda",
    "model.depth=8",
    "pool=flex_reg_dropout",
    "sac=on",
]
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}  # trainer.precision -> record
COMPILE_MODES = ["none", "default", "reduce-overhead", "max-autotune"]


def records(runs: Path) -> list[tuple[dict, dict]]:
    """``(config, result record)`` of every run under ``runs``: the config from the run
    directory's config.yaml (there from the start, also for a failed run)."""
    out = []
    for path in sorted(runs.rglob("result.json")):
        cfg = OmegaConf.to_container(OmegaConf.load(path.parent / "config.yaml"))
        out.append((cfg, read_json(path)))
    return out


def assert_completed(rec: dict) -> None:
    assert rec["status"] == "completed", rec.get("error")
    losses = [h["train_loss"] for h in rec["history"]]
    assert len(losses) == rec["epochs"] and all(math.isfinite(v) for v in losses), losses
    assert rec["device"].startswith("cuda") and rec["test_acc"] is not None


# ---------------------------------------------------------------- precision x compile


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """The 8 cells, one Hydra sweep in one process: ``(precision, compile) -> record``."""
    root = tmp_path_factory.mktemp("matrix")
    proc = run_cli(["-m", *GPU_SMALL, f"trainer.precision={','.join(PRECISIONS)}",
                    f"trainer.compile={','.join(COMPILE_MODES)}", f"paths.runs={root}"],
                   cwd=root, timeout=900)
    found = {(c["trainer"]["precision"], c["trainer"]["compile"]): r for c, r in records(root)}
    if not found:
        pytest.fail(f"the sweep wrote no records:\n{proc.stderr[-3000:]}")
    return found


@pytest.mark.parametrize("compile_mode", COMPILE_MODES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_each_precision_and_compile_mode_trains(matrix, precision, compile_mode):
    rec = matrix.get((precision, compile_mode))
    assert rec is not None, f"no record for {precision} {compile_mode}: {sorted(matrix)}"
    assert_completed(rec)
    assert rec["precision"] == PRECISIONS[precision]
    assert rec["compile"] == compile_mode
    assert rec["channels_last"] is True and rec["fused_optimizer"] is True
    assert rec["first_step_s"] > 0 and rec["setup_s"] > 0


# ---------------------------------------------------------------- defaults


def test_defaults_on_cuda_are_the_fast_settings():
    speed = resolve_speed(make_cfg(["trainer.device=cuda"]).trainer, torch.device("cuda"))
    bf16 = torch.cuda.is_bf16_supported()
    assert speed.amp_dtype == (torch.bfloat16 if bf16 else None)
    assert speed.channels_last is True and speed.compile == "reduce-overhead"
    assert speed.fused_optimizer is True and speed.cudnn_benchmark is True
    plain = resolve_speed(make_cfg(["trainer=plain", "trainer.device=cuda"]).trainer,
                          torch.device("cuda"))
    assert (plain.amp_dtype, plain.channels_last, plain.compile) == (None, False, "none")
    det = resolve_speed(make_cfg(["trainer.deterministic=true"]).trainer, torch.device("cuda"))
    assert det.cudnn_benchmark is False


# ---------------------------------------------------------------- exact resume


def _model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=True, map_location="cpu")["model"]


def test_deterministic_run_killed_after_epoch_1_resumes_bit_identical(tmp_path):
    args = [*GPU_SMALL, "trainer.deterministic=true"]  # the GPU defaults otherwise
    ref_runs, cut_runs = tmp_path / "ref", tmp_path / "cut"
    # the uninterrupted run and the one killed in epoch 2 at the same time
    ref = start_train([*args, f"paths.runs={ref_runs}"], tmp_path)
    cut = start_train([*args, f"paths.runs={cut_runs}"], tmp_path, KILL_MID_EPOCH_2)
    _, cut_err = cut.communicate(timeout=400)
    _, ref_err = ref.communicate(timeout=400)
    assert ref.returncode == 0, ref_err[-3000:]
    assert cut.returncode == -signal.SIGKILL, cut_err[-3000:]
    run_dir = next(cut_runs.rglob("cell.json")).parent
    assert not (run_dir / "result.json").exists()
    again = run_cli([*args, f"paths.runs={cut_runs}"], cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = read_json(run_dir / "result.json")
    ref_dir = next(ref_runs.rglob("result.json")).parent
    assert_completed(rec)
    assert rec["deterministic"] is True and rec["resumed_from_epoch"] == 1
    assert read_json(ref_dir / "result.json")["resumed_from_epoch"] is None
    wa, wb = _model_weights(ref_dir), _model_weights(run_dir)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:5]}"


# ---------------------------------------------------------------- benchmark

BENCH_THROUGHPUTS = ["harness_img_s", "compute_bound_img_s", "reference_img_s",
                     "harness_over_compute", "harness_over_reference"]
BENCH_KEYS = [*BENCH_THROUGHPUTS, "flex_overhead", "sac_overhead", "startup_s", "peak_rss_mb",
              "variant_overhead", "precision", "channels_last", "compile"]


def test_bench_json_at_the_gpu_settings_is_complete(tmp_path):
    bench_args = ["--rounds", "2", "--steps", "1", "--warmup", "2", "--workers", "2",
                  "--startup-probes", "1", "--variants", "flex,avg+sac"]
    proc = run_cli([*bench_args, *GPU_SMALL[:-2]], cwd=tmp_path, module="flexexp.bench",
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = [k for k in BENCH_KEYS if result.get(k) is None]
    assert not missing, f"missing or null: {missing}"
    for key in [*BENCH_THROUGHPUTS, "startup_s", "peak_rss_mb", "peak_gpu_mb"]:
        assert result[key] > 0, (key, result[key])
    assert set(result["variant_overhead"]) == {"flex", "avg+sac"}
    assert result["device"].startswith("cuda")
    bf16 = torch.cuda.is_bf16_supported()
    assert result["precision"] == ("bfloat16" if bf16 else "float32")
    assert result["channels_last"] is True and result["compile"] == "reduce-overhead"


# ---------------------------------------------------------------- sweep reuse


def test_sweep_of_three_seeds_reuses_the_compiled_model(tmp_path):
    proc = run_cli(["-m", *GPU_SMALL, "seed=0,1,2", "trainer.compile=reduce-overhead",
                    f"paths.runs={tmp_path}"], cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = sorted((r for _, r in records(tmp_path)), key=lambda r: r["seed"])
    assert [r["seed"] for r in recs] == [0, 1, 2]
    for rec in recs:
        assert_completed(rec)
        assert rec["compile"] == "reduce-overhead"
    reused = [r["setup_reused"] for r in recs]
    assert reused[0] == {"data": False, "model": False}
    assert all(r["model"] and r["data"] for r in reused[1:]), reused
    # a fresh initialisation per seed: the seeds train to different weights
    assert recs[1]["history"][-1]["train_loss"] != recs[2]["history"][-1]["train_loss"]
