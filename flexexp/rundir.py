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

__all__ = ["make_writable", "exclusive", "claim", "diff_keys", "completed_record",
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
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` so two processes never train the same cell at once."""
    import fcntl

    with open(run_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise FlexexpError(
                f"another process (pid {lock.read().strip() or '?'}) is training {run_dir} right "
                "now; wait for it, or stop it before starting this cell again."
            ) from None
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


def claim(cfg: DictConfig, run_dir: Path, cell: str) -> None:
    """Record the cell of ``run_dir``; refuse a directory that holds another cell."""
    cell_path = run_dir / CELL_FILE
    wanted = cell_config(cfg)
    if cell_path.exists():
        try:
            held = read_json(cell_path)
        except ValueError:
            held = None
        if held is not None and held.get("hash") != cell:
            diff = diff_keys(held.get("config", {}), wanted)
            raise ConfigError(
                f"the run directory {run_dir} holds a run of a different config (differs in: "
                f"{', '.join(diff) or 'unknown keys'}). Refusing to mix two configs in one "
                "directory: use another paths.runs, or delete that directory to start fresh."
            )
    write_json(cell_path, {"hash": cell, "config": wanted})
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two nested dicts differ, sorted (``["trainer.epochs"]``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------- the record


def completed_record(run_dir: Path) -> dict[str, Any] | None:
    """The record of a run that already completed in ``run_dir``; None for any other."""
    result_path = run_dir / RESULT_FILE
    if not result_path.exists():
        return None
    try:
        previous = read_json(result_path)
    except ValueError:
        previous = {}
    return previous if previous.get("status") == "completed" else None


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
        **step.speed.record(),
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
        "history": history,
        "wall_time_s": wall_time,
        "train_time_s": train_time,
        "images_per_s": total_images / train_time if train_time > 0 else None,
    }


def write_failure(run_dir: Path, record: dict[str, Any], exc: BaseException,
                  started: float) -> None:
    """Mark ``record`` failed with ``exc`` and write it, the traceback in ``error.txt``.

    Call it from the ``except`` block that caught ``exc``: the traceback is that one.
    """
    record["status"] = "failed"
    record["error"] = f"{type(exc).__name__}: {exc}"
    record["wall_time_s"] = time.time() - started
    atomic_write_text(run_dir / "error.txt", traceback.format_exc())
    write_json(run_dir / RESULT_FILE, record)


def write_result(run_dir: Path, record: dict[str, Any]) -> None:
    """Write the record of a finished run; last, so only a finished run reads completed."""
    write_json(run_dir / RESULT_FILE, record)


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
            f"{run_dir / CHECKPOINT_FILE} belongs to another config; delete it to start "
            "this run fresh."
        )
    return state


def restore(state: dict[str, Any], step: TrainStep,
            gen: torch.Generator) -> tuple[int, list[dict[str, Any]], float]:
    """Load a checkpoint into the step's model, optimiser and scaler and into the RNGs.

    Returns ``(epochs done, history, training seconds so far)``.
    """
    step.model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    step.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    gen.set_state(state["rng_data"].to(gen.get_state().device))
    if step.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], step.device)
    return int(state["epoch"]), list(state["history"]), float(state["train_time_s"])


def save_state(run_dir: Path, step: TrainStep, gen: torch.Generator, epoch: int,
               steps_per_epoch: int, history: list[dict[str, Any]], train_time: float,
               cell: str) -> None:
    """Atomically checkpoint the end of epoch ``epoch`` (1-based) for :func:`restore`."""
    device = step.device
    save_checkpoint(run_dir / CHECKPOINT_FILE, {
        "model": step.model.state_dict(),
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
