"""The run directory of one cell: who may write it, which config it holds, what it keeps.

One directory per cell of the grid (:func:`flexexp.config.cell_name`), holding

- ``.lock``: the pid of the process training the cell (:func:`exclusive`);
- ``cell.json`` and ``config.yaml``: the cell's hash and config (:func:`claim`), so a
  directory never mixes two configs;
- ``last.pt``: the checkpoint of the last finished epoch (:func:`save_state`,
  :func:`load_state`, :func:`restore`), with the RNG states that make a resumed run
  identical to an uninterrupted one;
- ``result.json``: the run record (:func:`new_record`, :func:`runtime_record`,
  :func:`results`), written last with ``status: completed`` (:func:`write_result`) or,
  with the traceback in ``error.txt``, ``status: failed`` (:func:`write_failure`).

The trainer's TensorBoard logger writes ``tb/`` next to them. Files are written
atomically (:mod:`flexexp.tracking`), so a kill at any moment leaves a readable directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flexexp.config import cell_config
from flexexp.engine import Dist, TrainStep
from flexexp.errors import ConfigError, FlexexpError
from flexexp.files import diff_keys  # torch-free: the report uses it too
from flexexp.runtime import heap_kept
from flexexp.tracking import (
    CELL_FILE,
    CHECKPOINT_FILE,
    RESULT_FILE,
    atomic_write_text,
    git_commit,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)

log = logging.getLogger(__name__)

__all__ = ["make_writable", "exclusive", "check_cell", "claim", "hydra_files", "remove_unclaimed",
           "diff_keys", "completed_record", "check_same_data",
           "new_record", "runtime_record", "summary", "results", "write_failure", "write_result",
           "load_state", "restore", "save_state"]


# ---------------------------------------------------------------------------- ownership


def make_writable(run_dir: Path) -> None:
    """Create ``run_dir``; a ConfigError naming ``paths.runs`` if it cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the run directory {run_dir} ({exc.strerror}): choose a writable "
            "root with paths.runs=DIR."
        ) from None


@contextlib.contextmanager
def exclusive(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``run_dir/.lock`` so two processes never train the same cell at once.

    A cell another process holds is an error, or, with ``wait`` (a sweep: two sweeps
    that share cells), waited for: the cell is then usually complete, and skipped.
    """
    import fcntl

    with open(run_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            if not wait:
                raise FlexexpError(
                    f"another process (pid {holder}) is training {run_dir} right now; wait "
                    "for it, or stop it before starting this cell again.") from None
            log.info("%s: waiting for pid %s, which is training this cell", run_dir, holder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_cell(cfg: DictConfig, run_dir: Path, cell: str) -> None:
    """Refuse a directory that holds another cell (reads only)."""
    cell_path = run_dir / CELL_FILE
    if not cell_path.exists():
        return
    try:
        held = read_json(cell_path)
    except (OSError, ValueError):
        held = None
    if not isinstance(held, dict):
        raise ConfigError(f"{cell_path} is not a cell record (unreadable, or not a JSON "
                          "object): move it away, or delete the run directory to start fresh.")
    if held.get("hash") != cell:
        diff = diff_keys(held.get("config", {}), cell_config(cfg))
        raise ConfigError(
            f"the run directory {run_dir} holds a run of a different config (differs in: "
            f"{', '.join(diff) or 'unknown keys'}). Refusing to mix two configs in one "
            "directory: use another paths.runs, or delete that directory to start fresh."
        )


def claim(cfg: DictConfig, run_dir: Path, cell: str,
          hydra_files: dict[str, str] | None = None) -> None:
    """Record the cell of ``run_dir`` (``cell.json``, ``config.yaml`` and Hydra's record
    in ``.hydra/``) for a run that starts; never called for one that is skipped, so a
    completed run's files keep saying what produced them."""
    check_cell(cfg, run_dir, cell)
    write_json(run_dir / CELL_FILE, {"hash": cell, "config": cell_config(cfg)})
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for name, text in (hydra_files or {}).items():
        atomic_write_text(run_dir / ".hydra" / name, text)


def hydra_files(cfg: DictConfig, hydra_cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes into ``.hydra/`` (``hydra.output_subdir``, off in conf/config.yaml
    so that a skipped rerun does not overwrite it): the config, Hydra's own, the overrides."""
    return {"config.yaml": OmegaConf.to_yaml(cfg),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task)}


def remove_unclaimed(run_dir: Path, root: Path) -> None:
    """Remove a run directory that Hydra made for a run refused before it started (nothing
    in it but Hydra's ``train.log`` and the lock), and its empty parents below ``root``."""
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - {"train.log", ".lock"}:
        return
    for name in ("train.log", ".lock"):
        (run_dir / name).unlink(missing_ok=True)
    root = root.resolve()
    d = run_dir.resolve()
    while d != root and root in d.parents:
        try:
            d.rmdir()
        except OSError:  # not empty: another run lives there
            break
        d = d.parent


# ---------------------------------------------------------------------------- the record


def completed_record(run_dir: Path) -> dict[str, Any] | None:
    """The record of a run that already completed in ``run_dir``; None for any other.

    A ``result.json`` that is not a readable JSON object (a folder, a list, broken JSON;
    flexexp writes records atomically, so it never leaves one) is refused rather than
    replaced: nothing already written is lost.
    """
    result_path = run_dir / RESULT_FILE
    if not result_path.exists() and not result_path.is_symlink():
        return None
    try:
        previous = read_json(result_path)
        if not isinstance(previous, dict):
            raise ValueError(f"a JSON {type(previous).__name__}, not an object")
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{result_path} is not a run record ({why}): move it away, or "
                          "delete the run directory to start this cell fresh.") from None
    return previous if previous.get("status") == "completed" else None


def check_same_data(previous: dict[str, Any], data: str, run_dir: Path) -> None:
    """A completed run is the same cell only on the same data: refuse to count a run on
    other data (test fixtures, another download) as this one."""
    held = previous.get("data_fingerprint")
    if held != data:
        was = held or "none: an older record"
        raise ConfigError(
            f"{run_dir} holds a completed run on other data (data fingerprint {was}, now "
            f"{data}): its result does not stand for this data. Use another paths.runs, or "
            "delete that directory to train it again.")


def new_record(cfg: DictConfig, run_dir: Path, cell: str) -> dict[str, Any]:
    """The record of a run that starts now: the cell and where it runs (provenance)."""
    return {
        "dataset": cfg.dataset.name,
        "pool": cfg.pool.name,
        "sac": bool(cfg.sac.enabled),
        "seed": int(cfg.seed),
        "epochs": int(cfg.trainer.epochs),
        "status": "running",
        "cell": cell,
        "run_dir": str(run_dir),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }


def runtime_record(t: DictConfig, step: TrainStep, world: int,
                   gpu_chosen: bool) -> dict[str, Any]:
    """The record's fields on how the run runs: model size, machine, the speed settings
    as resolved for the device (:class:`~flexexp.engine.Speed`), determinism."""
    device = step.device
    return {
        "num_params": sum(p.numel() for p in step.model.parameters()),
        "device": str(device),
        "world_size": world,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        **step.speed.record(),  # fused_optimizer: what the optimiser really does
        "fused_optimizer": any(bool(g.get("fused")) for g in step.optimizer.param_groups),
        "deterministic": bool(t.deterministic),
        "gpu_policy": str(t.gpu_policy) if gpu_chosen else None,
        "keep_heap": heap_kept(),
    }


def summary(record: dict[str, Any], cfg: DictConfig, n_train: int, n_test: int,
            steps: int) -> str:
    """One log line on a run that starts: cell, model size, machine, speed settings."""
    reused = [k for k, v in record["setup_reused"].items() if v]
    speed = (f"{record['precision']} {'NHWC' if record['channels_last'] else 'NCHW'} "
             f"compile={record['compile']}" + (f" (reused: {', '.join(reused)})" if reused
                                               else ""))
    return (f"{record['run_dir']} | {cfg.dataset.name} {cfg.pool.name} sac={cfg.sac.name} | "
            f"{record['num_params']} params | {record['device']} x{record['world_size']} "
            f"{speed} | {n_train} train / {n_test} test images | {steps} steps/epoch")


def results(history: list[dict[str, Any]], train_time: float,
            wall_time: float) -> dict[str, Any]:
    """The record's results: the last epoch's accuracies, the history and the times."""
    final = history[-1]
    total_images = sum(h["images_per_s"] * h["epoch_time_s"] for h in history)
    return {
        "test_acc": final.get("test_acc"),
        "test_acc_aux": final.get("test_acc_aux", {}),
        **{k: final[k] for k in ("test_top5", "test_top5_aux") if k in final},
        # dataset.val_fraction > 0: the held-out training images (what flexexp.tune optimises)
        **{k: final[k] for k in ("val_acc", "val_loss", "val_acc_aux") if k in final},
        "history": history,
        "wall_time_s": wall_time,
        "train_time_s": train_time,
        "images_per_s": total_images / train_time if train_time > 0 else None,
    }


def write_failure(run_dir: Path, record: dict[str, Any], exc: BaseException,
                  started: float) -> None:
    """Mark ``record`` failed (``interrupted`` for a signal or Ctrl-C) with ``exc`` and
    write it, the traceback in ``error.txt``.

    Call it from the ``except`` block that caught ``exc``: the traceback is that one.
    """
    from flexexp.signals import Interrupted

    stopped = isinstance(exc, Interrupted | KeyboardInterrupt)
    record["status"] = "interrupted" if stopped else "failed"
    why = str(exc) if isinstance(exc, Interrupted) else f"{type(exc).__name__}: {exc}"
    record["error"] = (f"{why}; the checkpoint of the last finished epoch (if one ended) is "
                       "kept: run the same command to resume" if stopped else why)
    record["wall_time_s"] = time.time() - started
    atomic_write_text(run_dir / "error.txt", traceback.format_exc())
    write_json(run_dir / RESULT_FILE, record)
    exc.flexexp_recorded = True  # the task does not write a second record for it


def write_result(run_dir: Path, record: dict[str, Any]) -> None:
    """Write the record of a finished run; last, so only a finished run reads completed.
    The traceback of an earlier, interrupted attempt goes: it no longer describes the run."""
    write_json(run_dir / RESULT_FILE, record)
    (run_dir / "error.txt").unlink(missing_ok=True)


# ---------------------------------------------------------------------------- checkpoint


def load_state(run_dir: Path, cell: str, dist: Dist) -> dict[str, Any] | None:
    """The checkpoint to resume from (the same on every rank), or None to start fresh.

    A checkpoint of another cell is a ConfigError; an unreadable one is moved aside by
    :func:`flexexp.tracking.load_checkpoint` and the run starts fresh.
    """
    state = load_checkpoint(run_dir / CHECKPOINT_FILE) if dist.main else None
    if dist.world > 1:  # rank 0 read (and vetted) the checkpoint; the others take its copy
        import torch.distributed as tdist

        box = [state]
        tdist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is not None and state.get("cell") != cell:
        raise ConfigError(
            f"{run_dir / CHECKPOINT_FILE} belongs to another config or other data (its key "
            f"{state.get('cell')!r}, this run's {cell!r}); delete it to start this run fresh."
        )
    return state


def restore(state: dict[str, Any], step: TrainStep,
            gen: torch.Generator) -> tuple[int, list[dict[str, Any]], float]:
    """Load a checkpoint into the step's model, optimiser and scaler and into the RNGs.

    Returns ``(epochs done, history, training seconds so far)``.
    """
    ran = state.get("ran_on")  # where and how the checkpoint was trained
    here = {"device": step.device.type, "precision": step.speed.record()["precision"]}
    if ran is not None and ran != here:
        raise ConfigError(
            f"last.pt was trained on {ran['device']} at {ran['precision']}, this run is on "
            f"{here['device']} at {here['precision']} (trainer.device and trainer.precision "
            "auto follow the machine): resuming would mix the two in one run. Resume it where "
            "it started (or set trainer.precision and trainer.device to what it used), or "
            "delete last.pt to train this cell again here.")
    step.model.load_state_dict(state["model"])
    fused = [g.get("fused") for g in step.optimizer.param_groups]
    step.optimizer.load_state_dict(state["optimizer"])
    for g, f in zip(step.optimizer.param_groups, fused, strict=True):
        g["fused"] = f  # a speed setting of this machine, not of the checkpoint's (SGD)
    step.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    gen.set_state(state["rng_data"].to(gen.get_state().device))
    if step.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], step.device)
    return int(state["epoch"]), list(state["history"]), float(state["train_time_s"])


def save_state(run_dir: Path, step: TrainStep, gen: torch.Generator, epoch: int,
               steps_per_epoch: int, history: list[dict[str, Any]], train_time: float,
               cell: str) -> None:
    """Atomically checkpoint the end of epoch ``epoch`` (1-based) for :func:`restore`.

    Only finite weights are kept: a model with a NaN or infinite parameter or buffer is a
    :class:`~flexexp.errors.DivergenceError`, and the checkpoint before it stays.
    """
    from flexexp.errors import DivergenceError

    device = step.device
    state = step.model.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise DivergenceError(
            f"after epoch {epoch} the model holds non-finite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): the run diverged; the checkpoint of epoch "
            f"{epoch - 1} is kept. Lower optim.lr and start the run again.")
    save_checkpoint(run_dir / CHECKPOINT_FILE, {
        "model": state,
        "ran_on": {"device": device.type, "precision": step.speed.record()["precision"]},
        "optimizer": step.optimizer.state_dict(),
        "scaler": step.scaler.state_dict(),
        "epoch": epoch,
        "step": epoch * steps_per_epoch,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "rng_data": gen.get_state().cpu(),
        "history": history,
        "train_time_s": train_time,
        "cell": cell,
    })
