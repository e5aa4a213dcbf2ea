"""The training run: one cell of the grid, from config to ``result.json``.

Read top to bottom: :func:`run` takes the run directory (:mod:`flexexp.rundir`: lock,
claim, skip a completed cell), :func:`setup` builds data, model and the step
(:mod:`flexexp.engine`) and resumes from ``last.pt`` if there is one, then :func:`fit`
loops over epochs in a fixed order (train an epoch, evaluate, log, checkpoint). The
result record is written last, so a ``result.json`` with ``status: completed`` means
the run really finished. :func:`task` is the Hydra entry point.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flexexp import engine, rundir
from flexexp.config import cell_hash, validate
from flexexp.data.loader import DeviceLoader
from flexexp.data.sources import ImageArrays, load_arrays
from flexexp.engine import Counters, Dist, TrainStep
from flexexp.errors import DivergenceError, FlexexpError
from flexexp.models import build_model
from flexexp.tracking import CHECKPOINT_FILE, TensorBoardLogger, process_age

log = logging.getLogger(__name__)

__all__ = ["run", "setup", "fit", "task", "Loop"]
# The loop calls engine.learning_rate and engine.evaluate through the module, so a test
# that patches them there (monkeypatch.setattr(engine, "evaluate", ...)) reaches the loop.


@dataclass
class Loop:
    """Everything the epoch loop reads, and what it carries from epoch to epoch."""

    cfg: DictConfig
    run_dir: Path
    record: dict[str, Any]  # the run record: the loop adds startup_s at the first step
    dist: Dist
    step: TrainStep  # holds the model, optimiser, scaler, device and autocast
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    gen: torch.Generator  # the data order: checkpointed, so a resumed run sees the same
    t_start: float
    tb: TensorBoardLogger | None = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.trainer.epochs


# ---------------------------------------------------------------------------- the run


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train the cell ``cfg`` in ``run_dir``; return its result record.

    A completed run in ``run_dir`` is skipped; an interrupted one resumes from
    ``last.pt``. A failure writes ``status: failed`` with the error and re-raises.
    Under ``torchrun`` every rank trains its share of each batch and rank 0 alone writes.
    """
    validate(cfg)
    run_dir = Path(run_dir)
    cell = cell_hash(cfg)
    dist = engine.init_distributed(cfg.trainer.device)
    if not dist.main:
        record = _run_cell(cfg, run_dir, cell, dist)
    else:
        rundir.make_writable(run_dir)
        with rundir.exclusive(run_dir):
            rundir.claim(cfg, run_dir, cell)
            record = _run_cell(cfg, run_dir, cell, dist)
    if dist.world > 1:  # leave together: a rank that exits early aborts the others
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return record


def _run_cell(cfg: DictConfig, run_dir: Path, cell: str, dist: Dist) -> dict[str, Any]:
    previous = rundir.completed_record(run_dir)
    if previous is not None:
        log.info("%s already completed (test_acc %.2f); skipping", run_dir,
                 previous.get("test_acc") or float("nan"))
        return previous
    started = time.time()
    record = rundir.new_record(cfg, run_dir, cell)
    try:
        record.update(fit(setup(cfg, run_dir, record, dist)))
        record["status"] = "completed"
    except BaseException as exc:  # KeyboardInterrupt too: the record says what happened
        if not dist.main:
            raise
        rundir.write_failure(run_dir, record, exc, started)
        raise
    record["config"] = OmegaConf.to_container(cfg, resolve=True)
    if dist.main:
        rundir.write_result(run_dir, record)  # last: only a finished run has status completed
    return record


def setup(cfg: DictConfig, run_dir: Path, record: dict[str, Any], dist: Dist) -> Loop:
    """Device, data, model and step of the run, resumed from ``last.pt`` if there is one."""
    t = cfg.trainer
    device, amp_dtype = engine.prepare_device(t, dist)
    if amp_dtype == torch.float16 and device.type == "cpu":
        log.warning("trainer.precision=fp16 on the CPU is very slow (no fast fp16 kernels); "
                    "use bf16 or fp32 there")
    torch.manual_seed(cfg.seed)  # model initialisation: the same on every rank
    t_start = time.time()
    arrays = load_arrays(OmegaConf.to_object(cfg.dataset))
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    train_loader, gen = engine.make_train_loader(cfg, arrays, device, memory_format, dist)
    test_loader = engine.make_test_loader(cfg, arrays, device, memory_format)
    model = build_model(cfg).to(device, memory_format=memory_format)
    loop = Loop(cfg, run_dir, record, dist, TrainStep(cfg, model, device, amp_dtype, dist),
                train_loader, test_loader, gen, t_start)
    state = rundir.load_state(run_dir, record["cell"], dist)
    if state is not None:
        loop.start_epoch, loop.history, loop.train_time = rundir.restore(state, loop.step, gen)
        log.info("resuming %s from epoch %d/%d", run_dir, loop.start_epoch, t.epochs)
    loop.tb = TensorBoardLogger(run_dir / "tb" if dist.main else None)
    _describe(loop, arrays, amp_dtype)
    return loop


def _describe(loop: Loop, arrays: ImageArrays, amp_dtype: torch.dtype | None) -> None:
    """Add the model size and the machine to the record, and log them in one line."""
    cfg, record = loop.cfg, loop.record
    record.update(rundir.runtime_record(cfg.trainer, loop.step, loop.dist.world, amp_dtype))
    log.info("%s | %s %s sac=%s | %d params | %s x%d | %d train / %d test images | "
             "%d steps/epoch", loop.run_dir, cfg.dataset.name, cfg.pool.name, cfg.sac.name,
             record["num_params"], loop.step.device, loop.dist.world, len(arrays.y_train),
             len(arrays.y_test), loop.steps_per_epoch)


# ---------------------------------------------------------------------------- the loop


def fit(loop: Loop) -> dict[str, Any]:
    """Train from ``loop.start_epoch`` to the last epoch; return the record's results.

    Every epoch: train it, evaluate, log, checkpoint. Under torchrun every rank trains
    its share and rank 0 alone evaluates, logs and checkpoints.
    """
    try:
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
                                  loop.record["cell"])
    finally:
        loop.tb.close()
    return rundir.results(loop.history, loop.train_time, time.time() - loop.t_start)


def _train_epoch(loop: Loop, epoch: int, bar) -> dict[str, Any]:
    """Train one epoch; its history entry (loss, accuracy, learning rate, speed)."""
    cfg = loop.cfg
    loop.step.model.train()
    names = engine.head_names(loop.step.model)
    c = Counters.zeros(len(names), loop.step.device)
    lr, epoch_time = _train_steps(loop, epoch, c, bar)
    loop.train_time += epoch_time
    _check_finite(loop, c, epoch)
    seen = float(c.seen)
    head_loss = (c.loss / seen).tolist()
    weights = loop.step.head_weights
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": float(sum(w * h for w, h in zip(weights, head_loss, strict=True))),
        "train_loss_heads": dict(zip(names, head_loss, strict=True)),
        "train_acc": float(c.correct) * 100.0 / seen,
        "penalty": float(c.penalty) / loop.steps_per_epoch if cfg.pool.reg > 0 else None,
        "epoch_time_s": epoch_time,
        "images_per_s": seen / epoch_time,
    }


def _train_steps(loop: Loop, epoch: int, c: Counters, bar) -> tuple[float, float]:
    """The steps of one epoch, summed into ``c``; ``(last learning rate, seconds)``."""
    t, steps_per_epoch, device = loop.cfg.trainer, loop.steps_per_epoch, loop.step.device
    first_step = loop.start_epoch * steps_per_epoch
    t0 = time.time()
    for i, (x, y) in enumerate(loop.train_loader):
        step = epoch * steps_per_epoch + i
        lr = engine.learning_rate(loop.cfg, step, loop.total_steps)
        if step == first_step:
            loop.record["startup_s"] = process_age()
        out = loop.step.step(x, y, lr)
        c.update(step, y, out)
        if bar is not None:
            bar.update(1)
            if i % max(1, steps_per_epoch // 10) == 0 or i == steps_per_epoch - 1:
                elapsed = max(time.time() - t0, 1e-9)  # .item() below: a sync, 10x/epoch
                bar.set_postfix(loss=f"{out.loss.item():.3f}", lr=f"{lr:.2e}",
                                img_s=f"{(i + 1) * t.batch_size / elapsed:.0f}")
    c.all_reduce(loop.dist)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return lr, time.time() - t0


def _check_finite(loop: Loop, c: Counters, epoch: int) -> None:
    """A DivergenceError if a step of the epoch had a NaN or infinite loss."""
    bad_step = int(c.bad_step)
    if bad_step < 0:
        return
    kept = (f"the last good checkpoint (epoch {epoch}) is kept in "
            f"{loop.run_dir / CHECKPOINT_FILE}" if epoch > 0 else "no checkpoint was written")
    raise DivergenceError(
        f"the training loss became NaN or infinite at epoch {epoch + 1}, step "
        f"{bad_step} (lr {engine.learning_rate(loop.cfg, bad_step, loop.total_steps):.3g}); "
        f"{kept}. Lower optim.lr (or check the data) and start the run again."
    )


def _evaluate(loop: Loop, epoch: int, entry: dict[str, Any]) -> None:
    """Add the test accuracies to ``entry`` every ``eval_every`` epochs and at the last."""
    t = loop.cfg.trainer
    if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
        entry.update(engine.evaluate(loop.step.model, loop.test_loader, loop.step.autocast))


def _log_epoch(loop: Loop, e: dict[str, Any], bar, epoch: int) -> None:
    """The epoch on the progress bar, in TensorBoard and in one log line."""
    if bar is not None:
        bar.set_postfix(loss=f"{e['train_loss']:.3f}", acc=f"{e['train_acc']:.1f}",
                        test=f"{e.get('test_acc', float('nan')):.1f}",
                        img_s=f"{e['images_per_s']:.0f}")
        bar.close()
    loop.tb.epoch(e, loop.step.model, epoch)
    log.info(
        "epoch %d: loss %.4f train %.2f%% test %s lr %.2e %.0f img/s",
        epoch, e["train_loss"], e["train_acc"],
        f"{e['test_acc']:.2f}%" if "test_acc" in e else "-", e["lr"], e["images_per_s"],
    )


def _progress(loop: Loop, epoch: int):
    """The epoch's progress bar on stderr (rank 0, ``trainer.progress``), else None."""
    t = loop.cfg.trainer
    if not (t.progress and loop.dist.main):
        return None
    from tqdm import tqdm

    return tqdm(total=loop.steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


# ---------------------------------------------------------------------------- Hydra task


def task(cfg: DictConfig) -> float | None:
    """The ``@hydra.main`` task: run the cell in Hydra's output directory.

    In a single run a user-fixable error (bad config, missing data) is printed as one
    paragraph and the process exits with status 2; in a sweep it is raised so Hydra marks
    the cell failed and goes on with the others.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    try:
        record = run(cfg, hc.runtime.output_dir)
    except FlexexpError as exc:
        if hc.mode == RunMode.RUN:
            log.error("%s", exc)
            print(f"\nerror: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
    return record.get("test_acc")
