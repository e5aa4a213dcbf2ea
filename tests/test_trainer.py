"""flexexp.trainer: runs that survive kills, bad numbers and bad input (SIGKILL, NaN, the
bad-input catalogue, random overrides)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from helpers import KILL_MID_EPOCH_2, TINY, make_cfg, only_run_dir, run_cli, start_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexexp import engine, trainer
from flexexp.config import check_overrides, validate
from flexexp.errors import ConfigError, FlexexpError
from flexexp.tracking import read_json

LONG = [*TINY, "pool=flex_reg_dropout", "sac=on", "trainer.epochs=6", "dataset.train_size=512"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read_json(a / "result.json"), read_json(b / "result.json")
    assert ra["status"] == rb["status"] == "completed"
    assert ra["test_acc"] == rb["test_acc"]
    assert [h["train_loss"] for h in ra["history"]] == [h["train_loss"] for h in rb["history"]]
    assert [(h["lr"], h["beta1"]) for h in ra["history"]] == [(h["lr"], h["beta1"])
                                                              for h in rb["history"]]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run the killed ones must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("ref")
    proc = run_cli([*LONG, f"paths.runs={root}"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return only_run_dir(root)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_identical(tmp_path, reference):
    runs = tmp_path / "runs"
    proc = start_train([*LONG, f"paths.runs={runs}"], tmp_path, KILL_MID_EPOCH_2)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    run_dir = only_run_dir(runs)
    done = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert done == 1  # killed in epoch 2, after epoch 1's checkpoint
    assert not (run_dir / "result.json").exists()
    again = run_cli([*LONG, f"paths.runs={runs}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run_dir} from epoch {done}/6" in again.stdout + again.stderr
    assert_same_run(reference, run_dir)


KILL_IN_SECOND_CHECKPOINT = """
import os, signal
import flexexp.tracking as tracking
_real = tracking.atomic_write_bytes
_calls = {"n": 0}
def _dying_write(path, data):
    if str(path).endswith("last.pt"):
        _calls["n"] += 1
        if _calls["n"] == 2:  # half of epoch 2's checkpoint reaches the disk, then SIGKILL
            tmp = os.path.join(os.path.dirname(path), ".last.pt.killed.tmp")
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return _real(path, data)
tracking.atomic_write_bytes = _dying_write
"""


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, reference):
    runs = tmp_path / "runs"
    proc = start_train([*LONG, f"paths.runs={runs}"], tmp_path, KILL_IN_SECOND_CHECKPOINT)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    run_dir = only_run_dir(runs)
    assert (run_dir / ".last.pt.killed.tmp").exists()
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1  # intact, epoch 1
    again = run_cli([*LONG, f"paths.runs={runs}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (run_dir / ".last.pt.killed.tmp").exists()  # the half-written file is cleaned
    assert_same_run(reference, run_dir)


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = make_cfg([*TINY, "trainer.epochs=3"])
    steps = -(-256 // 64)
    real_lr = engine.learning_rate
    # an absurd learning rate from epoch 2 on: the loss overflows
    monkeypatch.setattr(engine, "learning_rate",
                        lambda c, step, total: 1e30 if step >= steps else real_lr(c, step, total))
    with pytest.raises(FlexexpError, match="diverged in epoch 2: the training loss became NaN "
                                           "or infinite at step"):
        trainer.run(cfg, tmp_path / "run")
    rec = read_json(tmp_path / "run" / "result.json")
    assert rec["status"] == "failed" and "DivergenceError" in rec["error"]
    assert "last good checkpoint (epoch 1)" in rec["error"]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("overrides,key,cycled", [
    ([], "beta1", True), (["sched.cycle_momentum=false"], "beta1", False),
    (["optim=sgd"], "momentum", True), (["optim=sgd", "sched=constant"], "momentum", False),
])
def test_history_records_the_momentum_of_each_epochs_last_step(tmp_path, overrides, key,
                                                              cycled):
    cfg = make_cfg([*TINY, "trainer.epochs=3", *overrides])
    steps = -(-256 // 64)
    rec = trainer.run(cfg, tmp_path / "run")
    total = 3 * steps
    for e, h in enumerate(rec["history"]):
        last = (e + 1) * steps - 1
        assert h["lr"] == engine.learning_rate(cfg, last, total)
        assert h[key] == engine.momentum(cfg, last, total)
        assert {"beta1", "momentum"} & h.keys() == {key}  # the optimiser's own only
    values = [h[key] for h in rec["history"]]
    configured = cfg.optim.betas[0] if key == "beta1" else cfg.optim.momentum
    if cycled:  # the LR peaks in epoch 1 (0.85 there), back at 0.95 at the last step
        assert values[0] < values[1] < values[2] == cfg.sched.max_momentum
    else:
        assert values == [configured] * 3
    # the optimiser used it: the checkpoint's groups hold the last step's value
    group = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"][
        "param_groups"][0]
    assert (group["betas"][0] if key == "beta1" else group["momentum"]) == values[-1]


@pytest.mark.slow
def test_nan_cell_fails_and_the_sweep_goes_on(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(["-m", *TINY, "sched=constant", "optim.lr=1e6,0.01", f"paths.runs={runs}"],
                   cwd=tmp_path)
    assert proc.returncode != 0  # the sweep reports its failure at the end ...
    recs = sorted((read_json(p) for p in runs.rglob("result.json")),
                  key=lambda r: r["config"]["optim"]["lr"] if "config" in r else 1e6)
    by_status = {r["status"]: r for r in recs}
    assert set(by_status) == {"failed", "completed"}  # ... after running the next cell
    assert "DivergenceError: the run diverged in epoch 1" in by_status["failed"]["error"]


# ---------------------------------------------------------------------------- bad input

CATALOGUE = [
    (["dataset=cifar"], "Unknown option 'cifar' for group 'dataset'", "cifar10"),
    (["pool=flexpool"], "Unknown option 'flexpool' for group 'pool'", "flex_reg"),
    (["sac=yes"], "Unknown option 'yes' for group 'sac'", "on"),
    (["trainer.epoch=3"], "Unknown key 'trainer.epoch'", "Did you mean 'epochs'"),
    (["trainer.epochs=ten"], "trainer.epochs='ten' must be an integer", "trainer.epochs=10"),
    (["trainer.epochs=0"], "trainer.epochs=0 is outside its range [1, inf)", "trainer.epochs=100"),
    (["trainer.epochs=-2"], "trainer.epochs=-2 is outside its range [1, inf)",
     "trainer.epochs=100"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is outside its range [1, inf)",
     "batch_size=1000"),
    (["optim.lr=-0.1"], "optim.lr=-0.1 is outside its range (0, 1e+06]", "optim.lr=0.1"),
    (["sac=on", "sac.weights=[0.3,0.7]"], "sac.weights=[0.3, 0.7] must have 3 entries",
     "[0.1,0.2,0.7]"),
    (["sac=on", "sac.weights=[0.1,-0.2,0.7]"], "sac.weights[1]=-0.2 is outside its range",
     "[0.1,0.2,0.7]"),
    (["trainer.batch_size=100000"], "trainer.batch_size=100000 is larger than the 256",
     "trainer.batch_size<=256"),
    (["dataset.image_size=3"], "dataset.image_size=3: image_size 3 is too small", "at least 4"),
    (["+trainer.epochz=3"], "bypasses the schema", "drop the '+'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,problem,fix", CATALOGUE,
                         ids=[" ".join(c[0]) for c in CATALOGUE])
def test_bad_input_catalogue(tmp_path, overrides, problem, fix):
    proc = run_cli([*TINY, *overrides, f"paths.runs={tmp_path / 'runs'}"], cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert problem in proc.stderr and fix in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tmp_path):
    proc = run_cli([*TINY, "trainer.device=cuda", f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.device=cuda but no GPU is visible" in proc.stderr
    assert "trainer.device=auto" in proc.stderr


# ---------------------------------------------------------------------------- property test

KEYS = ["trainer.epochs", "trainer.batch_size", "optim.lr", "sac.weights", "pool.dropout",
        "pool.reg", "dataset.image_size", "trainer.device", "trainer.precision", "model.depth",
        "trainer.epoch", "optim.lrr", "seed", "dataset.scale", "trainer.progress", "pool", "sac",
        "dataset", "optim", "sched", "nonsense.key", "pool.normalize", "optim.betas",
        "optim.no_decay", "optim.weight_decay", "sched.pct_start", "model.downsample",
        "model.local_pool_args.s3pool.grid"]
VALUES = st.one_of(
    st.integers(-5, 5000).map(str),
    st.floats(-10, 10, allow_nan=False).map(lambda f: f"{f:.3g}"),
    st.sampled_from(["abc", "true", "false", "null", "cuda", "cpu", "auto", "bf16", "on", "off",
                     "flex", "avg", "cifar10", "digits", "[0.1,0.2,0.7]", "[1,2]", "[]",
                     "[0.5,x]", "1e-3", "''"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_random_overrides_never_give_an_unexplained_error(pairs):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        check_overrides(overrides)
        validate(make_cfg(overrides))
    except ConfigError as exc:
        assert any(k in str(exc) for k, _ in pairs) or "group" in str(exc), str(exc)
    except (HydraException, OmegaConfBaseException) as exc:
        # Hydra's own composition errors name the key they reject
        assert any(k.split(".")[-1] in str(exc) for k, _ in pairs), str(exc)
    except UserWarning:
        pass
