"""The pieces one training step needs, shared by the trainer and the benchmark.

Nothing here knows about run directories, records or epochs: the device and precision
a config asks for (:func:`prepare_device`: :func:`resolve_device`,
:func:`configure_process`, :func:`resolve_precision`; :func:`autocast_for`), the
data-parallel place of this process (:class:`Dist`), the one-cycle learning rate
(:func:`learning_rate`) and momentum (:func:`momentum`), the batches on the device
(:func:`make_train_loader`, :func:`make_test_loader`, :func:`make_val_loader`), the
optimisation step itself (:class:`TrainStep`, which returns a :class:`StepResult`;
``trainer.compile`` compiles its forward pass), the on-device epoch sums
(:class:`Counters`) and the test-set and validation accuracy (:func:`evaluate`,
:func:`evaluate_splits`).
The loop that strings them together is :func:`flexexp.trainer.fit`; the benchmark
(:mod:`flexexp.bench`) times the same pieces.
"""

from __future__ import annotations

import contextlib
import logging
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
from flexexp.speed import COMPILE_MODES, channels_last_setting, compile_setting

log = logging.getLogger(__name__)

__all__ = ["onecycle_lr", "onecycle_momentum", "constant_lr", "SCHEDULES", "MOMENTUM_KEYS",
           "schedule_params", "learning_rate", "momentum_key", "momentum", "resolve_device",
           "resolve_precision", "COMPILE_MODES", "resolve_compile", "Speed", "resolve_speed",
           "autocast_for", "configure_process", "prepare_device", "Dist", "init_distributed",
           "make_train_loader", "make_test_loader", "head_names",
           "evaluate", "DIVERGED_FACTOR", "FINAL_FACTOR", "diverged", "Counters", "StepResult",
           "TrainStep", "head_weights", "forward_module"]


# ---------------------------------------------------------------------------- schedule


def _cos(start: float, end: float, pct: float) -> float:
    """torch's ``OneCycleLR._annealing_cos``: ``start`` at ``pct=0``, ``end`` at 1."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _one_cycle(step: int, total_steps: int, pct_start: float, start: float, peak: float,
               end: float) -> float:
    """torch's two OneCycleLR phases: ``start`` to ``peak`` over steps 0 to
    ``pct_start * total_steps - 1``, then ``peak`` to ``end`` at the last step, each a
    cosine annealing (pct as torch computes it: the step's share of its phase)."""
    warm_end = float(pct_start * total_steps) - 1
    last = total_steps - 1
    if step <= warm_end:
        return _cos(start, peak, step / warm_end) if warm_end > 0 else peak
    span = last - warm_end
    return _cos(peak, end, (step - warm_end) / span) if span > 0 else end


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
    return _one_cycle(step, total_steps, pct_start, initial, max_lr, final)


def onecycle_momentum(step: int, total_steps: int, pct_start: float, base_momentum: float,
                      max_momentum: float) -> float:
    """Adam's beta1 (SGD's momentum) at ``step`` as torch's OneCycleLR with
    ``cycle_momentum=True`` sets it: the LR's phases in reverse, ``max_momentum`` at the
    first step, ``base_momentum`` at the LR's peak, ``max_momentum`` at the last step."""
    return _one_cycle(step, total_steps, pct_start, max_momentum, base_momentum, max_momentum)


def constant_lr(step: int, total_steps: int, max_lr: float) -> float:
    """The same learning rate at every step (sched=constant)."""
    return float(max_lr)


#: LR schedules by ``sched.name``: ``fn(step, total_steps, max_lr, **params)``, the params
#: being the sched section's other keys (:func:`schedule_params`; validate() checks them
#: against the signature).
SCHEDULES = {"onecycle": onecycle_lr, "constant": constant_lr}
#: The keys of the momentum cycle (sched=onecycle only): not the LR function's arguments.
MOMENTUM_KEYS = ("cycle_momentum", "base_momentum", "max_momentum")


def schedule_params(sched: DictConfig) -> dict[str, Any]:
    """The LR function's keyword arguments: the sched keys but ``name`` (and, for
    sched=onecycle, the :data:`MOMENTUM_KEYS`)."""
    skip = ("name", *MOMENTUM_KEYS) if sched.get("name") == "onecycle" else ("name",)
    return {k: v for k, v in sched.items() if k not in skip}


def learning_rate(cfg: DictConfig, step: int, total_steps: int) -> float:
    """The learning rate of step ``step``: a pure function of the step and the config."""
    params = schedule_params(cfg.sched)
    return SCHEDULES[cfg.sched.name](step, total_steps, cfg.optim.lr, **params)


def momentum_key(optim: DictConfig) -> str | None:
    """The history's name of the optimiser's momentum: ``beta1`` (``optim.betas``, Adam),
    ``momentum`` (``optim.momentum``, SGD), None for an optimiser with neither."""
    return "beta1" if "betas" in optim else "momentum" if "momentum" in optim else None


def momentum(cfg: DictConfig, step: int, total_steps: int) -> float | None:
    """Adam's beta1 (SGD's momentum) of step ``step``: with ``sched.cycle_momentum`` the
    one-cycle value (:func:`onecycle_momentum`), else the optimiser's configured one; None
    for an optimiser with neither. A pure function of the step and the config."""
    s, key = cfg.sched, momentum_key(cfg.optim)
    if key is None:
        return None
    if s.get("cycle_momentum", False):
        return onecycle_momentum(step, total_steps, s.pct_start, s.base_momentum,
                                 s.max_momentum)
    return float(cfg.optim.betas[0] if key == "beta1" else cfg.optim.momentum)


# ---------------------------------------------------------------------------- process


def resolve_device(name: str, gpu: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ConfigError.

    ``gpu`` is the index a plain ``auto``/``cuda`` gets (:mod:`flexexp.gpus` picks it on a
    machine with several); ``cuda:K`` keeps its own.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.device={name} but no GPU is visible to PyTorch "
            "(torch.cuda.is_available() is False): use trainer.device=auto or trainer.device=cpu."
        )
    if name == "cuda" and gpu is not None:
        return torch.device("cuda", gpu)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"trainer.device={name} but this machine has {torch.cuda.device_count()} GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}): use one of them, or "
            "trainer.device=auto.")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``trainer.precision`` (None = fp32, no autocast)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_compile(value: Any, device: torch.device) -> str:
    """The torch.compile mode a run on ``device`` uses for ``trainer.compile`` (``none``:
    eager). CUDA graphs exist on GPUs only: ``reduce-overhead`` falls back to ``default``
    on a CPU, with a one-line notice."""
    mode = compile_setting(value)
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    if mode == "reduce-overhead" and device.type != "cuda":
        log.info("trainer.compile=reduce-overhead: CUDA graphs need a GPU; compiling with "
                 "mode default on %s", device)
        return "default"
    return mode


@dataclass(frozen=True)
class Speed:
    """How a run computes on its device: settings that change speed, chosen once.

    ``trainer.precision``, ``trainer.channels_last`` and ``trainer.compile`` may say
    ``auto``; here they are what this device gets (bf16, NHWC, CUDA graphs on a GPU with
    bf16; fp32, NCHW, eager on a CPU). ``fused_optimizer``: the optimiser's fused kernel
    (one launch for every parameter) on a GPU.
    """

    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: str  # one of COMPILE_MODES
    cudnn_benchmark: bool
    fused_optimizer: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def record(self) -> dict[str, Any]:
        """The run record's fields for these settings."""
        return {"precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
                "channels_last": self.channels_last, "compile": self.compile,
                "cudnn_benchmark": self.cudnn_benchmark,
                "fused_optimizer": self.fused_optimizer}


def resolve_speed(t: DictConfig, device: torch.device) -> Speed:
    """The :class:`Speed` of the ``trainer`` section on ``device``."""
    cuda = device.type == "cuda"
    channels_last = channels_last_setting(t.channels_last)
    return Speed(
        amp_dtype=resolve_precision(t.precision, device),
        channels_last=cuda if channels_last == "auto" else channels_last,
        compile=resolve_compile(t.compile, device),
        cudnn_benchmark=cuda and bool(t.cudnn_benchmark) and not t.deterministic,
        fused_optimizer=cuda,
    )


def autocast_for(device: torch.device,
                 amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context of a precision (a no-op for fp32)."""
    return (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
            else contextlib.nullcontext())


def configure_process(t: DictConfig, device: torch.device) -> None:
    """Apply the process-wide ``trainer`` settings: CPU threads, heap, determinism, cuDNN
    autotuning (on CUDA, ``trainer.cudnn_benchmark`` unless ``trainer.deterministic``)."""
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    if t.keep_heap and device.type == "cpu":
        keep_heap()
    # the call imports torch._inductor (~2 s): make it only when the setting changes
    if bool(t.deterministic) != torch.are_deterministic_algorithms_enabled():
        if t.deterministic and device.type == "cuda":
            # cuBLAS is deterministic only with a fixed workspace; read when CUDA starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(bool(t.deterministic), warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(t.cudnn_benchmark) and not t.deterministic


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


def prepare_device(t: DictConfig, dist: Dist, gpu: int | None = None
                   ) -> tuple[torch.device, Speed]:
    """The device of this process (its own GPU under torchrun, else GPU ``gpu`` when
    given) with the process-wide settings applied, and its :class:`Speed`."""
    device = resolve_device(t.device, gpu)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA graphs and cuDNN's handles follow the current one
    configure_process(t, device)
    speed = resolve_speed(t, device)
    if speed.amp_dtype == torch.float16 and device.type == "cpu":
        log.warning("trainer.precision=fp16 on the CPU is very slow (no fast fp16 kernels); "
                    "use bf16 or fp32 there")
    return device, speed


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
    if (t.batch_size == 1 or n_train % t.batch_size == 1) and _vector_batchnorm(cfg):
        raise ConfigError(
            f"{n_train} training images in batches of {t.batch_size} leave a batch of one "
            "image, and GFGP's guide (guide=original) has BatchNorm layers on one value per "
            "channel, which cannot train on a single image: choose trainer.batch_size so that "
            f"{n_train} % batch_size != 1, or the guide without BatchNorm (guide=simple).")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # same order on every rank
    aug_gen = (torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist.rank)
               if dist.world > 1 else None)
    aug = Augment(flip=d.flip, scale=(d.scale[0], d.scale[1]), translate=d.translate)
    loader = DeviceLoader(arrays.x_train, arrays.y_train, t.batch_size, d.mean, d.std, device,
                          train=True, aug=aug, generator=gen, memory_format=memory_format,
                          rank=dist.rank, world=dist.world, aug_generator=aug_gen,
                          drop_last=dist.world > 1)
    return loader, gen


def _vector_batchnorm(cfg: DictConfig) -> bool:
    """Whether the model has BatchNorm on pooled vectors (GFGP's original guide)."""
    local = (cfg.model.local_pool_args.get("gfgp") or {}).get("guide", "original")
    return ((cfg.pool.get("layer") == "gfgp" and cfg.pool.get("guide", "original") == "original")
            or (cfg.model.downsample == "gfgp" and local == "original"))


def make_test_loader(cfg: DictConfig, arrays: ImageArrays, device: torch.device,
                     memory_format: torch.memory_format) -> DeviceLoader:
    """The test split on the device, in batches of at least 1000 (no gradients kept)."""
    t, d = cfg.trainer, cfg.dataset
    return DeviceLoader(arrays.x_test, arrays.y_test, max(t.batch_size, 1000), d.mean, d.std,
                        device, train=False, memory_format=memory_format)


def make_val_loader(cfg: DictConfig, arrays: ImageArrays, device: torch.device,
                    memory_format: torch.memory_format) -> DeviceLoader | None:
    """The validation split (``dataset.val_fraction`` of the training images, held out by
    :func:`flexexp.data.sources.split_validation`) like the test split; None without one."""
    if arrays.x_val is None or arrays.y_val is None:
        return None
    t, d = cfg.trainer, cfg.dataset
    return DeviceLoader(arrays.x_val, arrays.y_val, max(t.batch_size, 1000), d.mean, d.std,
                        device, train=False, memory_format=memory_format)


# ---------------------------------------------------------------------------- evaluation


def head_names(model: CifarResNet) -> list[str]:
    """``["stage1", "stage2", "main"]`` with SAC, ``["main"]`` without."""
    return [f"stage{i + 1}" for i in model.head_stages[:-1]] + ["main"]


@torch.no_grad()
def evaluate(
    model: CifarResNet, loader: DeviceLoader, autocast: contextlib.AbstractContextManager,
    split: str = "test",
) -> dict[str, Any]:
    """Top-1 (and top-5 for more than 10 classes) of every head on ``loader``, in percent,
    as ``<split>_acc``, ...; ``split="val"`` adds the main head's mean cross-entropy
    (``val_loss``)."""
    model.eval()
    names = head_names(model)
    k5 = model.num_classes > 10
    correct = torch.zeros(2 if k5 else 1, len(names), device=loader.device)  # (top-k, heads)
    loss = torch.zeros((), dtype=torch.float64, device=loader.device)
    for x, y in loader:
        with autocast:
            logits = model.forward_heads(x)
        for h, out in enumerate(logits):
            correct[0, h] += (out.argmax(1) == y).sum()
            if k5:
                correct[1, h] += (out.topk(5, dim=1).indices == y[:, None]).any(1).sum()
        if split == "val":
            loss += F.cross_entropy(logits[-1].float(), y, reduction="sum").double()
    n = loader.num_images  # counts are exact integers: divide in float64 on the host
    acc = [[100.0 * c / n for c in row] for row in correct.tolist()]  # one host sync
    out: dict[str, Any] = {
        f"{split}_acc": acc[0][-1],
        f"{split}_acc_aux": dict(zip(names[:-1], acc[0][:-1], strict=True)),
    }
    if k5:
        out[f"{split}_top5"] = acc[1][-1]
        out[f"{split}_top5_aux"] = dict(zip(names[:-1], acc[1][:-1], strict=True))
    if split == "val":
        out["val_loss"] = float(loss) / n
    return out


def evaluate_splits(model: CifarResNet, autocast: contextlib.AbstractContextManager,
                    test_loader: DeviceLoader, val_loader: DeviceLoader | None
                    ) -> dict[str, Any]:
    """:func:`evaluate` on the test split and, when there is one, the validation split."""
    out = evaluate(model, test_loader, autocast)
    if val_loader is not None:
        out.update(evaluate(model, val_loader, autocast, "val"))
    return out


# ---------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`TrainStep.step` leaves on the device (nothing read to the host)."""

    loss: torch.Tensor  # () the weighted loss that was minimised, penalty included
    ce: torch.Tensor  # (heads,) cross-entropy of every head, the main head last
    main_logits: torch.Tensor  # (batch, classes) the main head's logits
    penalty: torch.Tensor | None  # () the pool regulariser, None when pool.reg is 0


#: The divergence rule. Chance level is ln K for K classes (the cross-entropy of a model
#: that knows nothing); training starts near it and falls. An epoch whose mean loss of any
#: head is over DIVERGED_FACTOR x ln K has diverged (exploding weights: Adam at lr 1e3 gives
#: ~4,000 x ln K; the paper's lr 0.1 on a tiny run was seen to spike a SAC head to 15 x ln K
#: in its first epoch and recover), and so has a run whose last epoch ends with the main
#: head's mean loss over FINAL_FACTOR x ln K (a run that learnt nothing ends near 1 x).
DIVERGED_FACTOR = 100.0
FINAL_FACTOR = 10.0


def diverged(head_loss: dict[str, float], num_classes: int,
             last: bool = False) -> list[tuple[str, float]]:
    """The heads (name, mean loss) past the divergence rule; ``last``: the run's last epoch,
    where the main head (the last entry) must also be under FINAL_FACTOR x ln K."""
    ln_k = math.log(num_classes)
    out = [(h, v) for h, v in head_loss.items() if not v <= DIVERGED_FACTOR * ln_k]
    main, loss = list(head_loss.items())[-1]
    if last and not loss <= FINAL_FACTOR * ln_k and (main, loss) not in out:
        out.append((main, loss))
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


class _Loss(torch.nn.Module):
    """The step's forward pass as one module, ``(x, y) -> (loss, ce, main logits,
    penalty)``: what torch.compile captures (the losses fuse with the heads) and what DDP
    wraps (it syncs every head and the pool parameters the penalty reads)."""

    def __init__(self, model: CifarResNet, head_weights: list[float], reg: float) -> None:
        super().__init__()
        self.model, self.reg = model, reg
        self.register_buffer("head_w", torch.tensor(head_weights), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = self.model.forward_heads(x)
        ce = torch.stack([F.cross_entropy(o.float(), y) for o in logits])
        loss = (self.head_w * ce).sum()
        penalty = self.model.regularization() if self.reg > 0 else None
        if penalty is not None:
            loss = loss + self.reg * penalty
        return loss, ce, logits[-1], penalty


def head_weights(cfg: DictConfig) -> list[float]:
    """The loss weight of every head, the main head last (``[1.0]`` without SAC)."""
    return [float(w) for w in cfg.sac.weights] if cfg.sac.enabled else [1.0]


def forward_module(cfg: DictConfig, model: CifarResNet, device: torch.device, dist: Dist,
                   compile_mode: str) -> torch.nn.Module:
    """The step's forward pass and losses (:class:`_Loss`), wrapped in DDP under torchrun
    and compiled with ``compile_mode`` (one of :data:`COMPILE_MODES`; ``none``: eager)."""
    forward: torch.nn.Module = _Loss(model, head_weights(cfg), float(cfg.pool.reg)).to(device)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode == "none":
        return forward
    return torch.compile(forward, mode=None if compile_mode == "default" else compile_mode)


class TrainStep:
    """One optimisation step, shared by the trainer and the benchmark.

    ``step(x, y, lr, momentum)`` sets the learning rate and (unless None) Adam's beta1
    or SGD's momentum of every group, runs the forward pass of every head under
    autocast, the loss ``sum_h w_h CE(h) + reg * penalty``, backward and the optimiser
    step, and returns a :class:`StepResult` of device tensors without reading them back
    to the host.
    ``forward`` is the (compiled) forward of ``model`` from :func:`forward_module`; a
    sweep passes the one it built for an earlier cell of the same model
    (:mod:`flexexp.reuse`), so nothing is compiled again.
    """

    def __init__(self, cfg: DictConfig, model: CifarResNet, device: torch.device,
                 speed: Speed, dist: Dist = Dist(),
                 forward: torch.nn.Module | None = None) -> None:
        self.model, self.device, self.speed = model, device, speed
        self.optimizer = build_optimizer(cfg, model, fused=speed.fused_optimizer)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=speed.amp_dtype == torch.float16)
        self.autocast = autocast_for(device, speed.amp_dtype)
        self.head_weights = head_weights(cfg)
        # `is None`, not `or`: a compiled module's truth value calls the wrapped
        # module's __len__, which a loss module does not have (TypeError)
        self.forward = (forward if forward is not None
                        else forward_module(cfg, model, device, dist, speed.compile))
        # CUDA graphs replay into the same output buffers: mark where a step begins
        self._graphs = speed.compile == "reduce-overhead" and device.type == "cuda"

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float,
             momentum: float | None = None) -> StepResult:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if momentum is not None:  # as torch's OneCycleLR sets it (engine.momentum)
                if "betas" in g:
                    g["betas"] = (momentum, *g["betas"][1:])
                else:
                    g["momentum"] = momentum
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            loss, ce, main_logits, penalty = self.forward(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss.detach(), ce.detach(), main_logits.detach(),
                          penalty.detach() if penalty is not None else None)
