"""The training run: one cell of the grid, from config to ``result.json``.

Read top to bottom: :func:`run` takes the run directory (:mod:`flexexp.rundir`: lock,
claim, skip a completed cell), :func:`setup` builds data, model and the step
(:mod:`flexexp.engine`) and resumes from ``last.pt`` if there is one, then :func:`fit`
loops over epochs in a fixed order (train an epoch, evaluate, log, checkpoint). The
result record is written last, so a ``result.json`` with ``status: completed`` means
the run really finished. The Hydra task that calls :func:`run` is :mod:`flexexp.task`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flexexp import console, engine, gpus, reuse, rundir, signals
from flexexp.config import cell_hash, cell_name, validate
from flexexp.data.loader import DeviceLoader
from flexexp.data.sources import load_arrays
from flexexp.engine import Counters, Dist, StepResult, TrainStep
from flexexp.errors import DivergenceError
from flexexp.models import build_model
from flexexp.trackers import Trackers
from flexexp.tracking import CHECKPOINT_FILE, startup_age

log = logging.getLogger(__name__)

__all__ = ["run", "setup", "fit", "Loop"]
# The loop calls engine.learning_rate, engine.momentum and engine.evaluate through the
# module, so a test that patches them there reaches the loop.


@dataclass
class Loop:
    """Everything the epoch loop reads, and what it carries from epoch to epoch."""

    cfg: DictConfig
    run_dir: Path
    record: dict[str, Any]  # the run record: the loop adds setup_s, first_step_s
    dist: Dist
    step: TrainStep  # holds the model, optimiser, scaler, device and autocast
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    gen: torch.Generator  # the data order: checkpointed, so a resumed run sees the same
    t_start: float  # the cell's start: setup_s is measured from it
    trackers: Trackers | None = None  # logger=...: TensorBoard, CSV, MLflow, W&B
    val_loader: DeviceLoader | None = None  # dataset.val_fraction's held-out training images
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def checkpoint_key(self) -> str:
        """The cell and its data: a checkpoint resumes only the same cell on the same data."""
        return f"{self.record['cell']}/{self.record.get('data_fingerprint')}"

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.trainer.epochs


# ---------------------------------------------------------------------------- the run


def run(cfg: DictConfig, run_dir: str | Path, job_num: int = 0,
        hydra_files: dict[str, str] | None = None, wait: bool = False) -> dict[str, Any]:
    """Train the cell ``cfg`` in ``run_dir``; return its result record.

    A completed run on the same data is skipped; an interrupted one resumes from
    ``last.pt``. A failure writes ``status: failed`` (a signal: ``interrupted``) and
    re-raises. Under ``torchrun`` every rank trains its share and rank 0 alone writes.
    With several GPUs it takes one (:mod:`flexexp.gpus`; ``job_num``: its sweep number);
    ``wait``: wait for a cell another process trains (sweeps) instead of failing.
    """
    startup_age()  # the process's start-up, before its first cell
    validate(cfg)
    run_dir = Path(run_dir)
    cell = cell_hash(cfg)
    dist = engine.init_distributed(cfg.trainer.device)
    if not dist.main:
        record = _run_cell(cfg, run_dir, cell, dist, None)
    else:
        engine.resolve_device(cfg.trainer.device)  # no GPU for cuda: refused before any write
        rundir.make_writable(run_dir)
        with (rundir.exclusive(run_dir, wait),
              gpus.hold_gpu(cfg.trainer.device, cfg.trainer.gpu_policy, job_num) as gpu,
              signals.catch(dist.world == 1)):
            record = _run_cell(cfg, run_dir, cell, dist, gpu, hydra_files)
    if dist.world > 1:  # leave together: a rank that exits early aborts the others
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return record


def _run_cell(cfg: DictConfig, run_dir: Path, cell: str, dist: Dist, gpu: int | None,
              hydra_files: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.time()
    if dist.main:
        rundir.check_cell(cfg, run_dir, cell)
    data = reuse.arrays(cfg.dataset, load_arrays)
    fingerprint = reuse.data_fingerprint(data[0])
    previous = rundir.completed_record(run_dir)
    if previous is not None:  # on the same data only; its files are left as they are
        rundir.check_same_data(previous, fingerprint, run_dir)
        log.info("%s", console.done_line(previous, skipped=True))
        return previous
    if dist.main:
        rundir.claim(cfg, run_dir, cell, hydra_files)
    record = rundir.new_record(cfg, run_dir, cell)
    record.update(data_fingerprint=fingerprint, data_root=str(Path(cfg.dataset.root).resolve()))
    trackers = Trackers(cfg, run_dir, cell_name(cfg), dist.main)  # resumed: the same runs
    try:
        trackers.open()
        record.update(fit(setup(cfg, run_dir, record, dist, gpu, data, started, trackers)))
        record["status"] = "completed"
    except BaseException as exc:  # KeyboardInterrupt too: the record says what happened
        if not dist.main:
            raise
        rundir.write_failure(run_dir, record, exc, started)
        trackers.finish(record["status"], record)
        raise
    record["config"] = OmegaConf.to_container(cfg, resolve=True)
    if dist.main:
        rundir.write_result(run_dir, record)  # last: only a finished run has status completed
        trackers.finish("completed", record)
        log.info("%s", console.done_line(record))
    return record


def setup(cfg: DictConfig, run_dir: Path, record: dict[str, Any], dist: Dist,
          gpu: int | None = None, data: tuple[Any, bool] | None = None,
          t_start: float | None = None, trackers: Trackers | None = None) -> Loop:
    """Device, data, model and step of the run, resumed from ``last.pt`` if there is one.
    In a sweep, the data and the compiled model come from the cell before when the same
    (:mod:`flexexp.reuse`)."""
    t_start = t_start or time.time()
    device, speed = engine.prepare_device(cfg.trainer, dist, gpu)
    arrays, data_reused = data or reuse.arrays(cfg.dataset, load_arrays)
    fmt = speed.memory_format
    train_loader, gen = engine.make_train_loader(cfg, arrays, device, fmt, dist)
    test_loader = engine.make_test_loader(cfg, arrays, device, fmt)
    model, forward, model_reused = reuse.model_and_forward(cfg, build_model, device, speed,
                                                           dist)
    step = TrainStep(cfg, model, device, speed, dist, forward)
    loop = Loop(cfg, run_dir, record, dist, step, train_loader, test_loader, gen, t_start)
    loop.val_loader = engine.make_val_loader(cfg, arrays, device, fmt)
    state = rundir.load_state(run_dir, loop.checkpoint_key, dist)
    if state is not None:
        loop.start_epoch, loop.history, loop.train_time = rundir.restore(state, loop.step, gen)
        log.info("resuming %s from epoch %d/%d", run_dir, loop.start_epoch, cfg.trainer.epochs)
    record.update(rundir.runtime_record(cfg.trainer, step, dist.world, gpu is not None),
                  resumed_from_epoch=loop.start_epoch or None,
                  setup_reused={"data": data_reused, "model": model_reused})
    loop.trackers = trackers or Trackers(cfg, run_dir, "", on=False)
    log.info("%s", rundir.summary(record, cfg, len(arrays.y_train), len(arrays.y_test),
                                  loop.steps_per_epoch))
    return loop


# ---------------------------------------------------------------------------- the loop


def fit(loop: Loop) -> dict[str, Any]:
    """Train from ``loop.start_epoch`` to the last epoch; return the record's results.

    Every epoch: train it, evaluate, log, checkpoint. Under torchrun every rank trains
    its share and rank 0 alone evaluates, logs and checkpoints.
    """
    for epoch in range(loop.start_epoch, loop.cfg.trainer.epochs):
        bar = _progress(loop, epoch)
        entry = _train_epoch(loop, epoch, bar)
        if loop.dist.main:
            _evaluate(loop, epoch, entry)
        loop.history.append(entry)
        if loop.dist.main:
            _log_epoch(loop, entry, bar, epoch + 1)
            rundir.save_state(loop.run_dir, loop.step, loop.gen, epoch + 1,
                              loop.steps_per_epoch, loop.history, loop.train_time,
                              loop.checkpoint_key)
            loop.trackers.epochs(loop.history, loop.step.model)  # after the checkpoint
    return rundir.results(loop.history, loop.train_time, time.time() - loop.t_start)


def _train_epoch(loop: Loop, epoch: int, bar) -> dict[str, Any]:
    """Train one epoch; its history entry (loss, accuracy, learning rate and momentum of
    the epoch's last step, speed)."""
    cfg = loop.cfg
    loop.step.model.train()
    names = engine.head_names(loop.step.model)
    c = Counters.zeros(len(names), loop.step.device)
    lr, m, epoch_time = _train_steps(loop, epoch, c, bar)
    loop.train_time += epoch_time
    seen = float(c.seen)
    head_loss = (c.loss / seen).tolist()
    _check_diverged(loop, c, dict(zip(names, head_loss, strict=True)), epoch)
    weights, m_key = loop.step.head_weights, engine.momentum_key(cfg.optim)
    return {
        "epoch": epoch + 1,
        "lr": lr,
        **({m_key: m} if m_key else {}),  # beta1 (Adam) or momentum (SGD)
        "train_loss": float(sum(w * h for w, h in zip(weights, head_loss, strict=True))),
        "train_loss_heads": dict(zip(names, head_loss, strict=True)),
        "train_acc": float(c.correct) * 100.0 / seen,
        "penalty": float(c.penalty) / loop.steps_per_epoch if cfg.pool.reg > 0 else None,
        "epoch_time_s": epoch_time,
        "images_per_s": seen / epoch_time,
    }


def _train_steps(loop: Loop, epoch: int, c: Counters, bar) -> tuple[float, float | None, float]:
    """The steps of one epoch, summed into ``c``; ``(last lr, last momentum, seconds)``."""
    t, steps_per_epoch, device = loop.cfg.trainer, loop.steps_per_epoch, loop.step.device
    first_step = loop.start_epoch * steps_per_epoch
    t0 = time.time()
    for i, (x, y) in enumerate(loop.train_loader):
        step = epoch * steps_per_epoch + i
        lr = engine.learning_rate(loop.cfg, step, loop.total_steps)
        m = engine.momentum(loop.cfg, step, loop.total_steps)
        out = (_first_step(loop, x, y, lr, m) if step == first_step
               else loop.step.step(x, y, lr, m))
        c.update(step, y, out)
        signals.check()  # SIGTERM/SIGUSR1: stop here (flexexp.signals)
        if bar is not None:
            bar.update(1)
            if i % max(1, steps_per_epoch // 10) == 0 or i == steps_per_epoch - 1:
                elapsed = max(time.time() - t0, 1e-9)  # .item() below: a sync, 10x/epoch
                bar.set_postfix(loss=f"{out.loss.item():.3f}", lr=f"{lr:.2e}",
                                img_s=f"{(i + 1) * t.batch_size / elapsed:.0f}")
    c.all_reduce(loop.dist)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return lr, m, time.time() - t0


def _first_step(loop: Loop, x: torch.Tensor, y: torch.Tensor, lr: float,
                m: float | None) -> StepResult:
    """The run's first step, timed: ``setup_s`` up to it, ``first_step_s`` its duration
    (compilation and graph capture included), ``startup_s`` the process's start-up."""
    loop.record.update(setup_s=time.time() - loop.t_start, startup_s=startup_age())
    t0 = time.time()
    out = loop.step.step(x, y, lr, m)
    if loop.step.device.type == "cuda":
        torch.cuda.synchronize(loop.step.device)
    loop.record["first_step_s"] = time.time() - t0
    return out


def _check_diverged(loop: Loop, c: Counters, head_loss: dict[str, float], epoch: int) -> None:
    """A DivergenceError if a step of the epoch had a NaN or infinite loss, or a head's
    mean cross-entropy is far above chance (:func:`flexexp.engine.diverged`)."""
    bad_step, k = int(c.bad_step), loop.step.model.num_classes
    last = epoch + 1 == loop.cfg.trainer.epochs
    high = engine.diverged(head_loss, k, last)
    if bad_step < 0 and not high:
        return
    kept = (f"the last good checkpoint (epoch {epoch}) is kept in "
            f"{loop.run_dir / CHECKPOINT_FILE}" if epoch > 0 else "no checkpoint was written")
    what = (f"the training loss became NaN or infinite at step {bad_step} (lr "
            f"{engine.learning_rate(loop.cfg, bad_step, loop.total_steps):.3g})" if bad_step >= 0
            else f"the mean training loss of {', '.join(f'{h} ({v:.3g})' for h, v in high)} is "
            f"over {engine.FINAL_FACTOR if last else engine.DIVERGED_FACTOR:g} x chance level "
            f"ln({k}) = {math.log(k):.3g} (README, Failure policy)")
    raise DivergenceError(f"the run diverged in epoch {epoch + 1}: {what}; {kept}. Lower "
                          "optim.lr (or check the data) and start the run again.")


def _evaluate(loop: Loop, epoch: int, entry: dict[str, Any]) -> None:
    """Add test (and val) accuracies to ``entry`` every ``eval_every`` epochs and at the last."""
    t, step = loop.cfg.trainer, loop.step
    if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
        entry.update(engine.evaluate_splits(step.model, step.autocast, loop.test_loader,
                                            loop.val_loader))


def _log_epoch(loop: Loop, e: dict[str, Any], bar, epoch: int) -> None:
    """The epoch on the progress bar and in one log line (trackers: after its checkpoint)."""
    if bar is not None:
        bar.close()
    log.info("%s", console.epoch_line(e, epoch, loop.cfg.trainer.epochs))


def _progress(loop: Loop, epoch: int):
    """The epoch's progress bar on a terminal (rank 0, ``trainer.progress``), else None."""
    t = loop.cfg.trainer
    return console.progress_bar(bool(t.progress and loop.dist.main), loop.steps_per_epoch,
                                f"epoch {epoch + 1}/{t.epochs}")
