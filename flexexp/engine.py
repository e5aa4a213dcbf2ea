"""The pieces one training step needs, shared by the trainer and the benchmark.

Nothing here knows about run directories, records or epochs: the device and precision
a config asks for (:func:`prepare_device`: :func:`resolve_device`,
:func:`configure_process`, :func:`resolve_precision`; :func:`autocast_for`), the
data-parallel place of this process (:class:`Dist`), the one-cycle learning rate
(:func:`learning_rate`), the batches on the device (:func:`make_train_loader`,
:func:`make_test_loader`), the optimisation step itself (:class:`TrainStep`, which
returns a :class:`StepResult`; ``trainer.compile`` compiles its forward pass), the
on-device epoch sums (:class:`Counters`) and the test-set accuracy (:func:`evaluate`).
The loop that strings them together is :func:`flexexp.trainer.fit`; the benchmark
(:mod:`flexexp.bench`) times the same pieces.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from flexexp.data.loader import Augment, DeviceLoader
from flexexp.data.sources import ImageArrays
from flexexp.errors import ConfigError
from flexexp.models import CifarResNet
from flexexp.optim import build_optimizer
from flexexp.runtime import keep_heap

__all__ = ["onecycle_lr", "constant_lr", "SCHEDULES", "learning_rate", "resolve_device",
           "resolve_precision",
           "autocast_for", "configure_process", "prepare_device", "Dist", "init_distributed",
           "make_train_loader", "make_test_loader", "head_names",
           "evaluate", "Counters", "StepResult", "TrainStep"]


# ---------------------------------------------------------------------------- schedule


def onecycle_lr(
    step: int,
    total_steps: int,
    max_lr: float,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
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


def constant_lr(step: int, total_steps: int, max_lr: float) -> float:
    """The same learning rate at every step (sched=constant)."""
    return float(max_lr)


#: LR schedules by ``sched.name``: ``fn(step, total_steps, max_lr, **params)``, the params
#: being the sched section's other keys (validate() checks them against the signature).
SCHEDULES = {"onecycle": onecycle_lr, "constant": constant_lr}


def learning_rate(cfg: DictConfig, step: int, total_steps: int) -> float:
    """The learning rate of step ``step``: a pure function of the step and the config."""
    params = {k: v for k, v in cfg.sched.items() if k != "name"}
    return SCHEDULES[cfg.sched.name](step, total_steps, cfg.optim.lr, **params)


# ---------------------------------------------------------------------------- process


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


def prepare_device(t: DictConfig, dist: Dist) -> tuple[torch.device, torch.dtype | None]:
    """The device of this process (its own GPU under torchrun) with the process-wide
    settings applied, and the autocast dtype of ``trainer.precision`` (None = fp32)."""
    device = resolve_device(t.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    configure_process(t, device)
    return device, resolve_precision(t.precision, device)


# ---------------------------------------------------------------------------- data


def make_train_loader(cfg: DictConfig, arrays: ImageArrays, device: torch.device,
                      memory_format: torch.memory_format, dist: Dist = Dist()
                      ) -> tuple[DeviceLoader, torch.Generator]:
    """The training split on the device and its generator (checkpointed by the trainer).

    Batches are slices of a permutation drawn from the generator, the same on every
    rank; under torchrun each rank takes its share of every batch, augmented with a
    generator of its own.
    """
    t, d = cfg.trainer, cfg.dataset
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
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # same order on every rank
    aug_gen = (torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist.rank)
               if dist.world > 1 else None)
    aug = Augment(flip=d.flip, scale=(d.scale[0], d.scale[1]), translate=d.translate)
    loader = DeviceLoader(arrays.x_train, arrays.y_train, t.batch_size, d.mean, d.std, device,
                          train=True, aug=aug, generator=gen, memory_format=memory_format,
                          rank=dist.rank, world=dist.world, aug_generator=aug_gen,
                          drop_last=dist.world > 1)
    return loader, gen


def make_test_loader(cfg: DictConfig, arrays: ImageArrays, device: torch.device,
                     memory_format: torch.memory_format) -> DeviceLoader:
    """The test split on the device, in batches of at least 1000 (no gradients kept)."""
    t, d = cfg.trainer, cfg.dataset
    return DeviceLoader(arrays.x_test, arrays.y_test, max(t.batch_size, 1000), d.mean, d.std,
                        device, train=False, memory_format=memory_format)


# ---------------------------------------------------------------------------- evaluation


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


# ---------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`TrainStep.step` leaves on the device (nothing read to the host)."""

    loss: torch.Tensor  # () the weighted loss that was minimised, penalty included
    ce: torch.Tensor  # (heads,) cross-entropy of every head, the main head last
    main_logits: torch.Tensor  # (batch, classes) the main head's logits
    penalty: torch.Tensor | None  # () the pool regulariser, None when pool.reg is 0


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

    def update(self, step: int, y: torch.Tensor, out: StepResult) -> None:
        """Add one step's numbers; device ops only, so the step never waits on the host."""
        self.seen += y.shape[0]
        self.loss += out.ce * y.shape[0]
        self.correct += (out.main_logits.argmax(1) == y).sum()
        if out.penalty is not None:
            self.penalty += out.penalty
        self.bad_step = torch.where(~torch.isfinite(out.loss) & (self.bad_step < 0), step,
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


class _AllHeads(torch.nn.Module):
    """``forward = model.forward_heads``, so DDP (which wraps ``forward``) syncs every head."""

    def __init__(self, model: CifarResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_heads(x)


def _forward_module(model: CifarResNet, device: torch.device, dist: Dist,
                    compile: bool) -> torch.nn.Module:
    """Every head's forward pass, wrapped in DDP under torchrun and compiled on request."""
    forward: torch.nn.Module = _AllHeads(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if compile else forward


class TrainStep:
    """One optimisation step, shared by the trainer and the benchmark.

    ``step(x, y, lr)`` runs the forward pass of every head under autocast, the loss
    ``sum_h w_h CE(h) + reg * penalty``, backward and the optimiser step, and returns a
    :class:`StepResult` of device tensors without reading them back to the host.
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
        self.forward = _forward_module(model, device, dist, bool(cfg.trainer.compile))

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> StepResult:
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
        return StepResult(loss.detach(), ce.detach(), logits[-1].detach(),
                          penalty.detach() if penalty is not None else None)
