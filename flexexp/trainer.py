"""The training run: one cell of the grid, from config to ``result.json``.

Read top to bottom: :func:`run` checks the config and the run directory, builds data
and model, resumes from ``last.pt`` if there is one, then loops over epochs in a fixed
order (train, evaluate, log, checkpoint) and writes the result record last, so a
``result.json`` with ``status: completed`` means the run really finished.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from flexexp.config import cell_config, cell_hash, validate
from flexexp.data.loader import Augment, DeviceLoader
from flexexp.data.sources import load_arrays
from flexexp.errors import ConfigError, DivergenceError, FlexexpError
from flexexp.models import CifarResNet, build_model
from flexexp.optim import build_optimizer
from flexexp.runtime import heap_kept, keep_heap
from flexexp.tracking import (
    CELL_FILE,
    CHECKPOINT_FILE,
    RESULT_FILE,
    TensorBoardLogger,
    atomic_write_text,
    git_commit,
    load_checkpoint,
    process_age,
    read_json,
    save_checkpoint,
    write_json,
)

log = logging.getLogger(__name__)

__all__ = ["run", "task", "onecycle_lr", "resolve_device", "evaluate", "TrainStep",
           "Dist", "configure_process", "autocast_for"]


# ---------------------------------------------------------------------------- pieces


def onecycle_lr(
    step: int,
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """Learning rate at ``step`` of a cosine one-cycle schedule (as torch's OneCycleLR).

    Warm-up from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of the
    steps, then annealing to ``max_lr / (div_factor * final_div_factor)`` at the last step.
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    warm_end = float(pct_start * total_steps) - 1
    last = total_steps - 1

    def cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= warm_end:
        return cos(initial, max_lr, step / warm_end) if warm_end > 0 else max_lr
    span = last - warm_end
    return cos(max_lr, final, (step - warm_end) / span) if span > 0 else final


def learning_rate(cfg: DictConfig, step: int, total_steps: int) -> float:
    """The learning rate of step ``step``: a pure function of the step and the config."""
    if cfg.sched.name == "onecycle":
        return onecycle_lr(step, total_steps, cfg.optim.lr, cfg.sched.pct_start,
                           cfg.sched.div_factor, cfg.sched.final_div_factor)
    return float(cfg.optim.lr)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.device={name} but no GPU is visible to PyTorch "
            "(torch.cuda.is_available() is False): use trainer.device=auto or trainer.device=cpu."
        )
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``trainer.precision`` (None = fp32, no autocast)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast_for(device: torch.device,
                 amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context of a precision (a no-op for fp32)."""
    return (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
            else contextlib.nullcontext())


def configure_process(t: DictConfig, device: torch.device) -> None:
    """Apply the process-wide ``trainer`` settings: CPU threads, heap, determinism."""
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    if t.keep_heap and device.type == "cpu":
        keep_heap()
    # the call imports torch._inductor (~2 s): make it only when the setting changes
    if bool(t.deterministic) != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(bool(t.deterministic), warn_only=True)


def head_names(model: CifarResNet) -> list[str]:
    """``["stage1", "stage2", "main"]`` with SAC, ``["main"]`` without."""
    return [f"stage{i + 1}" for i in model.head_stages[:-1]] + ["main"]


@torch.no_grad()
def evaluate(
    model: CifarResNet, loader: DeviceLoader, autocast: contextlib.AbstractContextManager
) -> dict[str, Any]:
    """Top-1 (and top-5 for more than 10 classes) of every head on ``loader``, in percent."""
    model.eval()
    names = head_names(model)
    k5 = model.num_classes > 10
    correct = torch.zeros(2 if k5 else 1, len(names), device=loader.device)  # (top-k, heads)
    for x, y in loader:
        with autocast:
            logits = model.forward_heads(x)
        for h, out in enumerate(logits):
            correct[0, h] += (out.argmax(1) == y).sum()
            if k5:
                correct[1, h] += (out.topk(5, dim=1).indices == y[:, None]).any(1).sum()
    n = loader.num_images  # counts are exact integers: divide in float64 on the host
    acc = [[100.0 * c / n for c in row] for row in correct.tolist()]  # one host sync
    out: dict[str, Any] = {
        "test_acc": acc[0][-1],
        "test_acc_aux": dict(zip(names[:-1], acc[0][:-1], strict=True)),
    }
    if k5:
        out["test_top5"] = acc[1][-1]
        out["test_top5_aux"] = dict(zip(names[:-1], acc[1][:-1], strict=True))
    return out


@dataclass
class Counters:
    """Per-epoch sums kept on the device; read once at the end of the epoch."""

    loss: torch.Tensor  # (heads,) sum of per-head CE times batch size
    penalty: torch.Tensor  # () sum of the regulariser over steps
    correct: torch.Tensor  # () main-head correct predictions
    bad_step: torch.Tensor  # () first step with a non-finite loss, -1 if none
    seen: torch.Tensor  # () training images processed

    @classmethod
    def zeros(cls, heads: int, device: torch.device) -> Counters:
        z = torch.zeros((), device=device)
        return cls(torch.zeros(heads, device=device), z.clone(), z.clone(),
                   torch.full((), -1, device=device, dtype=torch.long), z.clone())

    def update(self, step: int, y: torch.Tensor, loss: torch.Tensor, ce: torch.Tensor,
               main_logits: torch.Tensor, penalty: torch.Tensor | None) -> None:
        """Add one step's numbers; device ops only, so the step never waits on the host."""
        self.seen += y.shape[0]
        self.loss += ce * y.shape[0]
        self.correct += (main_logits.argmax(1) == y).sum()
        if penalty is not None:
            self.penalty += penalty
        self.bad_step = torch.where(~torch.isfinite(loss) & (self.bad_step < 0), step,
                                    self.bad_step)

    def all_reduce(self, dist: Dist) -> None:
        """Sum the counters over the ranks of a data-parallel job (bad_step: the max)."""
        if dist.world == 1:
            return
        import torch.distributed as tdist

        for t in (self.loss, self.correct, self.seen):
            tdist.all_reduce(t)
        tdist.all_reduce(self.bad_step, op=tdist.ReduceOp.MAX)
        # the penalty depends on the shared weights only: every rank holds the same value


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
    dist = init_distributed(cfg.trainer.device)
    if not dist.main:
        record = _run_locked(cfg, run_dir, cell, dist)
    else:
        _make_writable_dir(run_dir)
        with _exclusive(run_dir):
            _claim_run_dir(cfg, run_dir, cell)
            record = _run_locked(cfg, run_dir, cell, dist)
    if dist.world > 1:  # leave together: a rank that exits early aborts the others
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return record


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel job (``world == 1``: a plain run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        use_nccl = device_name != "cpu" and torch.cuda.is_available()
        tdist.init_process_group("nccl" if use_nccl else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def _exclusive(run_dir: Path):
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


def _run_locked(cfg: DictConfig, run_dir: Path, cell: str, dist: Dist) -> dict[str, Any]:
    result_path = run_dir / RESULT_FILE
    if result_path.exists():
        try:
            previous = read_json(result_path)
        except ValueError:
            previous = {}
        if previous.get("status") == "completed":
            log.info("%s already completed (test_acc %.2f); skipping", run_dir,
                     previous.get("test_acc") or float("nan"))
            return previous

    started = time.time()
    record: dict[str, Any] = {
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
    try:
        record.update(_train(cfg, run_dir, record, dist))
        record["status"] = "completed"
    except BaseException as exc:  # KeyboardInterrupt too: the record says what happened
        if not dist.main:
            raise
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["wall_time_s"] = time.time() - started
        atomic_write_text(run_dir / "error.txt", traceback.format_exc())
        write_json(result_path, record)
        raise
    record["config"] = OmegaConf.to_container(cfg, resolve=True)
    if dist.main:
        write_json(result_path, record)  # last: only a finished run has status completed
    return record


def _make_writable_dir(run_dir: Path) -> None:
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


def _claim_run_dir(cfg: DictConfig, run_dir: Path, cell: str) -> None:
    """Record the cell of ``run_dir``; refuse a directory that holds another cell."""
    cell_path = run_dir / CELL_FILE
    wanted = cell_config(cfg)
    if cell_path.exists():
        try:
            held = read_json(cell_path)
        except ValueError:
            held = None
        if held is not None and held.get("hash") != cell:
            diff = _diff_keys(held.get("config", {}), wanted)
            raise ConfigError(
                f"the run directory {run_dir} holds a run of a different config (differs in: "
                f"{', '.join(diff) or 'unknown keys'}). Refusing to mix two configs in one "
                "directory: use another paths.runs, or delete that directory to start fresh."
            )
    write_json(cell_path, {"hash": cell, "config": wanted})
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class _AllHeads(torch.nn.Module):
    """``forward = model.forward_heads``, so DDP (which wraps ``forward``) syncs every head."""

    def __init__(self, model: CifarResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_heads(x)


class TrainStep:
    """One optimisation step, shared by the trainer and the benchmark.

    ``step(x, y, lr)`` runs the forward pass of every head under autocast, the loss
    ``sum_h w_h CE(h) + reg * penalty``, backward and the optimiser step, and returns
    device tensors ``(loss, ce per head, main-head logits, penalty or None)`` without
    reading them back to the host.
    """

    def __init__(self, cfg: DictConfig, model: CifarResNet, device: torch.device,
                 amp_dtype: torch.dtype | None, dist: Dist = Dist()) -> None:
        self.model, self.device = model, device
        self.optimizer = build_optimizer(cfg, model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.autocast = autocast_for(device, amp_dtype)
        weights = list(cfg.sac.weights) if cfg.sac.enabled else [1.0]
        self.head_weights = weights
        self.head_w = torch.tensor(weights, device=device)
        self.reg = float(cfg.pool.reg)
        forward: torch.nn.Module = _AllHeads(model)
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(forward) if cfg.trainer.compile else forward

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with self.autocast:
            logits = self.forward(x)
            ce = torch.stack([F.cross_entropy(o.float(), y) for o in logits])
            loss = (self.head_w * ce).sum()
            penalty = self.model.regularization() if self.reg > 0 else None
            if penalty is not None:
                loss = loss + self.reg * penalty
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), ce.detach(), logits[-1].detach(), (
            penalty.detach() if penalty is not None else None)


def _train(cfg: DictConfig, run_dir: Path, record: dict[str, Any], dist: Dist) -> dict[str, Any]:
    t = cfg.trainer
    device = resolve_device(t.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    configure_process(t, device)
    amp_dtype = resolve_precision(t.precision, device)
    if amp_dtype == torch.float16 and device.type == "cpu":
        log.warning("trainer.precision=fp16 on the CPU is very slow (no fast fp16 kernels); "
                    "use bf16 or fp32 there")
    torch.manual_seed(cfg.seed)  # model initialisation: the same on every rank
    t_start = time.time()

    # ---- data: whole splits on the device, batches are slices of a permutation
    arrays = load_arrays(OmegaConf.to_object(cfg.dataset))
    n_train = len(arrays.y_train)
    if t.batch_size > n_train:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is larger than the {n_train} training images "
            f"of dataset={cfg.dataset.name}: use trainer.batch_size<={n_train}."
        )
    if t.batch_size % dist.world:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is not divisible by the {dist.world} processes "
            "of this torchrun job: each takes an equal share of every batch."
        )
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # same order on every rank
    aug_gen = (torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist.rank)
               if dist.world > 1 else None)
    d = cfg.dataset
    aug = Augment(flip=d.flip, scale=(d.scale[0], d.scale[1]), translate=d.translate)
    train_loader = DeviceLoader(arrays.x_train, arrays.y_train, t.batch_size, d.mean, d.std,
                                device, train=True, aug=aug, generator=gen,
                                memory_format=memory_format, rank=dist.rank, world=dist.world,
                                aug_generator=aug_gen, drop_last=dist.world > 1)
    test_loader = DeviceLoader(arrays.x_test, arrays.y_test, max(t.batch_size, 1000), d.mean,
                               d.std, device, train=False, memory_format=memory_format)

    # ---- model and optimiser
    model = build_model(cfg).to(device, memory_format=memory_format)
    trainer_step = TrainStep(cfg, model, device, amp_dtype, dist)
    optimizer, scaler = trainer_step.optimizer, trainer_step.scaler
    names = head_names(model)
    weights = trainer_step.head_weights
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * t.epochs
    num_params = sum(p.numel() for p in model.parameters())

    # ---- resume
    start_epoch, history, train_time = 0, [], 0.0
    state = load_checkpoint(run_dir / CHECKPOINT_FILE) if dist.main else None
    if dist.world > 1:  # rank 0 read (and vetted) the checkpoint; the others take its copy
        import torch.distributed as tdist

        box = [state]
        tdist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is not None:
        if state.get("cell") != record["cell"]:
            raise ConfigError(
                f"{run_dir / CHECKPOINT_FILE} belongs to another config; delete it to start "
                "this run fresh."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        gen.set_state(state["rng_data"].to(gen.get_state().device))
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        train_time = float(state["train_time_s"])
        log.info("resuming %s from epoch %d/%d", run_dir, start_epoch, t.epochs)

    tb = TensorBoardLogger(run_dir / "tb" if dist.main else None)
    record.update(num_params=num_params, device=str(device), world_size=dist.world,
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else platform.processor() or platform.machine(),
                  precision=str(amp_dtype or torch.float32).replace("torch.", ""),
                  channels_last=bool(t.channels_last), compile=bool(t.compile),
                  keep_heap=heap_kept())
    log.info("%s | %s %s sac=%s | %d params | %s x%d | %d train / %d test images | "
             "%d steps/epoch", run_dir, cfg.dataset.name, cfg.pool.name, cfg.sac.name,
             num_params, device, dist.world, n_train, len(arrays.y_test), steps_per_epoch)
    first_step = start_epoch * steps_per_epoch

    try:
        for epoch in range(start_epoch, t.epochs):
            # ---- train one epoch
            model.train()
            c = Counters.zeros(len(names), device)
            bar = _progress(t.progress and dist.main, steps_per_epoch, epoch, t.epochs)
            t0 = time.time()
            for i, (x, y) in enumerate(train_loader):
                step = epoch * steps_per_epoch + i
                lr = learning_rate(cfg, step, total_steps)
                if step == first_step:
                    record["startup_s"] = process_age()
                out = trainer_step.step(x, y, lr)
                c.update(step, y, *out)
                if bar is not None:
                    bar.update(1)
                    if i % max(1, steps_per_epoch // 10) == 0 or i == steps_per_epoch - 1:
                        elapsed = max(time.time() - t0, 1e-9)  # .item() below: a sync, 10x/epoch
                        bar.set_postfix(loss=f"{out[0].item():.3f}", lr=f"{lr:.2e}",
                                        img_s=f"{(i + 1) * t.batch_size / elapsed:.0f}")
            c.all_reduce(dist)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.time() - t0
            train_time += epoch_time
            bad_step = int(c.bad_step)
            if bad_step >= 0:
                kept = (f"the last good checkpoint (epoch {epoch}) is kept in "
                        f"{run_dir / CHECKPOINT_FILE}" if epoch > 0
                        else "no checkpoint was written")
                raise DivergenceError(
                    f"the training loss became NaN or infinite at epoch {epoch + 1}, step "
                    f"{bad_step} (lr {learning_rate(cfg, bad_step, total_steps):.3g}); {kept}. "
                    "Lower optim.lr (or check the data) and start the run again."
                )
            seen = float(c.seen)
            head_loss = (c.loss / seen).tolist()
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": float(sum(w * h for w, h in zip(weights, head_loss, strict=True))),
                "train_loss_heads": dict(zip(names, head_loss, strict=True)),
                "train_acc": float(c.correct) * 100.0 / seen,
                "penalty": float(c.penalty) / steps_per_epoch if cfg.pool.reg > 0 else None,
                "epoch_time_s": epoch_time,
                "images_per_s": seen / epoch_time,
            }
            if not dist.main:
                history.append(entry)
                continue  # rank 0 evaluates, logs and checkpoints
            # ---- evaluate
            if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
                entry.update(evaluate(model, test_loader, trainer_step.autocast))
            if bar is not None:
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}",
                                acc=f"{entry['train_acc']:.1f}",
                                test=f"{entry.get('test_acc', float('nan')):.1f}",
                                img_s=f"{entry['images_per_s']:.0f}")
                bar.close()
            history.append(entry)
            _log_epoch(tb, entry, model, epoch + 1)
            # ---- checkpoint (atomic; the RNG states make the resumed run identical)
            save_checkpoint(run_dir / CHECKPOINT_FILE, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "step": (epoch + 1) * steps_per_epoch,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "rng_data": gen.get_state().cpu(),
                "history": history,
                "train_time_s": train_time,
                "cell": record["cell"],
            })
    finally:
        tb.close()

    final = history[-1]
    total_images = sum(h["images_per_s"] * h["epoch_time_s"] for h in history)
    return {
        "test_acc": final.get("test_acc"),
        "test_acc_aux": final.get("test_acc_aux", {}),
        **{k: final[k] for k in ("test_top5", "test_top5_aux") if k in final},
        "history": history,
        "wall_time_s": time.time() - t_start,
        "train_time_s": train_time,
        "images_per_s": total_images / train_time if train_time > 0 else None,
    }


def _progress(enabled: bool, total: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def _log_epoch(tb: TensorBoardLogger, e: dict[str, Any], model: CifarResNet, epoch: int) -> None:
    scalars = {
        "train/loss": e["train_loss"],
        "train/acc": e["train_acc"],
        "train/lr": e["lr"],
        "train/penalty": e["penalty"],
        "train/images_per_s": e["images_per_s"],
        **{f"train/loss_{h}": v for h, v in e["train_loss_heads"].items()},
    }
    if "test_acc" in e:
        scalars["test/acc_main"] = e["test_acc"]
        scalars.update({f"test/acc_{h}": v for h, v in e["test_acc_aux"].items()})
        scalars["test/top5_main"] = e.get("test_top5")
        scalars.update({f"test/top5_{h}": v for h, v in e.get("test_top5_aux", {}).items()})
        tb.flex_weights(model.flex_pools(), epoch)
    tb.scalars(scalars, epoch)
    log.info(
        "epoch %d: loss %.4f train %.2f%% test %s lr %.2e %.0f img/s",
        epoch, e["train_loss"], e["train_acc"],
        f"{e['test_acc']:.2f}%" if "test_acc" in e else "-", e["lr"], e["images_per_s"],
    )


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
