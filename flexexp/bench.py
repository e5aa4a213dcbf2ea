"""Training throughput against the compute bound and the authors' reference loop.

    python -m flexexp.bench [--rounds 10] [--steps 1] [overrides as for flexexp.train]

Measures, alternating between them round by round (so machine noise hits all alike),
images per second of:

1. ``compute_bound``: forward, backward and optimiser step on one batch already on the
   device (the limit for this model, precision and memory format);
2. ``harness``: the trainer's own path: on-device sampling and batched augmentation,
   the learning-rate function, :class:`~flexexp.engine.TrainStep` and the counters;
3. ``reference``: the loop the paper's authors published: a dataset of PIL images with
   per-image RandomHorizontalFlip and RandomAffine scaling, ToTensor, Normalize, a
   DataLoader with worker processes, fp32 NCHW. By default it runs in a process of its
   own with the same threads and determinism but without ``trainer.keep_heap`` (glibc's
   default allocator, as the authors' script runs), and steps when the benchmark tells
   it to, so the rounds still alternate; ``--reference-process shared`` runs it inside
   the benchmark's process instead, where it shares the harness's allocator setting;

plus the step time of each pooling variant relative to avg pooling and of SAC relative
to the same pool without it (each timed in adjacent pairs of steps; plus the same
comparison for the heads alone, which is far less noisy than whole steps and gives the
summary keys ``flex_overhead`` and ``sac_overhead``), the
start-up time of ``python -m flexexp.train`` to its first training step, the set-up of
each cell of a 3-cell sweep in one process (later cells reuse the first's data and
compiled model), and peak memory. The last line printed is one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from flexexp.config import check_overrides, compose_config, validate
from flexexp.data.loader import normalize
from flexexp.data.sources import load_arrays
from flexexp.engine import (
    Counters,
    TrainStep,
    autocast_for,
    configure_process,
    learning_rate,
    make_train_loader,
    momentum,
    resolve_device,
    resolve_speed,
)
from flexexp.errors import FlexexpError
from flexexp.models import build_model
from flexexp.runtime import heap_kept

VARIANTS = {  # name -> (overrides on top of the benchmarked config, variant it is timed against)
    "avg": (["pool=avg", "sac=off"], None),
    "flex": (["pool=flex", "sac=off"], "avg"),
    "flex_reg": (["pool=flex_reg", "sac=off"], "avg"),
    "flex_reg_dropout": (["pool=flex_reg_dropout", "sac=off"], "avg"),
    "flex_softmax": (["pool=flex_softmax", "sac=off"], "avg"),
    "avg+sac": (["pool=avg", "sac=on"], "avg"),
    "flex_reg_dropout+sac": (["pool=flex_reg_dropout", "sac=on"], "flex_reg_dropout"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Mode:
    """Something that trains ``n`` steps when called; timed in blocks between syncs."""

    def __init__(self, name: str, run: Callable[[int], None], images_per_step: int) -> None:
        self.name, self.run, self.images_per_step = name, run, images_per_step
        self.step_times: list[float] = []

    def time(self, steps: int, device: torch.device) -> None:
        _sync(device)
        t0 = time.perf_counter()
        self.run(steps)
        _sync(device)
        self.step_times.append((time.perf_counter() - t0) / steps)

    @property
    def step_s(self) -> float:
        """Mean step time: a throughput is images over the total time, slow steps included."""
        return statistics.fmean(self.step_times)

    @property
    def img_s(self) -> float:
        return self.images_per_step / self.step_s


def with_bases(names: list[str]) -> list[str]:
    """``names`` plus the variants they are timed against, bases first, without repeats."""
    out: list[str] = []
    for name in names:
        chain = [name]
        while (base := VARIANTS[chain[0]][1]) is not None:
            chain.insert(0, base)
        out += [n for n in chain if n not in out]
    return out


def _bench_model(cfg: DictConfig, device: torch.device):
    """The config's model in training mode, seeded as the trainer seeds it, with the
    speed settings the trainer resolves for the device (:class:`~flexexp.engine.Speed`)."""
    speed = resolve_speed(cfg.trainer, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device, memory_format=speed.memory_format).train()
    return model, speed, speed.memory_format


def _fixed_batch_mode(name: str, cfg: DictConfig, x: torch.Tensor, y: torch.Tensor,
                      device: torch.device) -> Mode:
    """Train steps on one batch already on the device: the compute bound."""
    model, speed, fmt = _bench_model(cfg, device)
    step = TrainStep(cfg, model, device, speed)
    xb = x.contiguous(memory_format=fmt)
    lr = float(cfg.optim.lr) / 25  # any constant: the cost does not depend on it

    def run(n: int) -> None:
        for _ in range(n):
            step.step(xb, y, lr)

    return Mode(name, run, len(y))


def heads_step_s(cfg: DictConfig, x: torch.Tensor, device: torch.device, reps: int) -> float:
    """Median seconds of the part of a step that the pooling variants change: every head
    (pool, dropout, linear) and the pool penalty, forward and backward, on the model's
    real feature maps, with each map's gradient added to one already there (as autograd
    adds a SAC head's gradient to that of the next stage). Shares no time with the
    stages, so it is far less noisy than a whole step.
    """
    model, speed, fmt = _bench_model(cfg, device)
    autocast = autocast_for(device, speed.amp_dtype)
    with torch.no_grad(), autocast:
        feats = [f.detach().requires_grad_()
                 for f in model.forward_features(x.contiguous(memory_format=fmt))]
    reg = float(cfg.pool.reg)
    times = []
    for _ in range(reps + 1):
        for f in feats:
            f.grad = torch.zeros_like(f)
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = sum(head(feats[i]).float().sum()
                      for head, i in zip(model.heads, model.head_stages, strict=True))
            if reg > 0:
                out = out + reg * model.regularization()
        out.backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first one warms up


def _harness_mode(cfg: DictConfig, arrays, device: torch.device) -> Mode:
    """The trainer's own path: DeviceLoader -> learning_rate -> TrainStep -> Counters."""
    t = cfg.trainer
    model, speed, fmt = _bench_model(cfg, device)
    step = TrainStep(cfg, model, device, speed)
    loader, _ = make_train_loader(cfg, arrays, device, fmt)  # the trainer's, in one process
    total = len(loader) * t.epochs
    counters = Counters.zeros(len(model.heads), device)
    state = {"step": 0, "it": iter(())}

    def batches() -> Iterator:
        while True:
            yield from loader

    state["it"] = batches()

    def run(n: int) -> None:
        for _ in range(n):
            x, y = next(state["it"])
            i = state["step"]
            j = i % total
            counters.update(i, y, step.step(x, y, learning_rate(cfg, j, total),
                                            momentum(cfg, j, total)))
            state["step"] += 1

    return Mode("harness", run, t.batch_size)


def _reference_mode(cfg: DictConfig, arrays, device: torch.device, workers: int) -> Mode:
    """The authors' loop: PIL images, per-image torchvision transforms, DataLoader, fp32 NCHW."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    d = cfg.dataset
    steps = [T.RandomHorizontalFlip()] if d.flip else []
    if tuple(d.scale) != (1.0, 1.0) or d.translate:
        shift = d.translate / d.image_size
        steps.append(T.RandomAffine(0, translate=(shift, shift) if shift else None,
                                    scale=tuple(d.scale)))
    c = d.in_channels
    transform = T.Compose([*steps, T.ToTensor(),
                           T.Normalize(list(d.mean) * (c // len(d.mean)),
                                       list(d.std) * (c // len(d.std)))])

    class PILImages(Dataset):
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            arr = x.permute(0, 2, 3, 1).numpy()
            self.images = [Image.fromarray(a[..., 0] if c == 1 else a) for a in arr]
            self.labels = y.tolist()

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int):
            return transform(self.images[i]), self.labels[i]

    images = PILImages(arrays.x_train, arrays.y_train)
    loader = DataLoader(images, batch_size=cfg.trainer.batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    ref_cfg = OmegaConf.merge(cfg, {"trainer": {"precision": "fp32", "channels_last": False,
                                                "compile": "none"}})
    model, speed, _ = _bench_model(ref_cfg, device)  # fp32 (no autocast), NCHW, eager
    step = TrainStep(ref_cfg, model, device, speed)

    def batches() -> Iterator:
        while True:
            yield from loader

    it = batches()

    def run(n: int) -> None:
        for _ in range(n):
            x, y = next(it)
            step.step(x.to(device, non_blocking=True), y.to(device, non_blocking=True), 1e-3)

    return Mode("reference", run, cfg.trainer.batch_size)


class ReferenceProcess(Mode):
    """The reference loop in a child process, stepped on request.

    The child (``python -m flexexp.bench --serve-reference FD <overrides>``) builds the
    loop in a fresh interpreter with torch's defaults plus the configured threads and
    determinism, but not ``trainer.keep_heap``: the authors' loop runs with glibc's
    default allocator. Requests go to its stdin; replies come back on a pipe of their
    own (file descriptor ``FD``), so nothing the child or its libraries print can get in
    their way. The child times its own steps (between device syncs), so the round trip
    is not in the numbers. While the benchmark times the other modes the child waits on
    its stdin, as an in-process loop would wait for its turn.
    """

    def __init__(self, overrides: list[str], images_per_step: int, workers: int) -> None:
        super().__init__("reference", self._run, images_per_step)
        self.info: dict = {}  # the child's peak_rss_mb and keep_heap, sent as it quits
        self._buf = b""
        read_fd, write_fd = os.pipe()
        try:
            # the child's own output (warnings, errors) goes to the inherited stderr
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flexexp.bench", "--serve-reference", str(write_fd),
                 "--workers", str(workers), *overrides],
                stdin=subprocess.PIPE, pass_fds=(write_fd,), text=True, bufsize=1)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child holds its copy: end-of-file when it exits
        self._fd = read_fd
        try:
            batch = int(self._reply("ready").split()[-1])
        except BaseException:
            self.close(ask=False)
            raise
        if batch != images_per_step:
            self.close()
            raise FlexexpError(
                f"the reference loop's process built batches of {batch} images where this "
                f"benchmark expects {images_per_step}; pass the same overrides to both.")

    def _reply(self, request: str, timeout: float | None = None) -> str:
        """The child's next reply line; a clear error if it dies before giving one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        eof = False
        while b"\n" not in self._buf:
            if select.select([self._fd], [], [], 1.0)[0]:
                chunk = os.read(self._fd, 1 << 16)
                if not chunk:  # end of file: the child (and its workers) exited
                    eof = True
                    break
                self._buf += chunk
            elif self.proc.poll() is not None or (deadline and time.monotonic() > deadline):
                break
        else:
            line, self._buf = self._buf.split(b"\n", 1)
            return line.decode()
        code = self.proc.poll()
        if code is None and eof:  # the pipe closes a moment before the exit status is known
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=10)
        why = ("is still running but did not answer" if code is None else
               f"was killed by signal {-code} (out of memory? see `dmesg`)" if code < 0 else
               f"exited with code {code}; its error is printed above")
        raise FlexexpError(
            f"the reference loop's process {why} (asked {request!r}). Run with "
            "--reference-process shared to time the reference loop inside this process.")

    def _ask(self, request: str) -> str:
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except OSError:  # a broken pipe: the child is gone; _reply says how
            pass
        return self._reply(request)

    def _run(self, n: int) -> None:
        self._ask(f"run {n}")

    def time(self, steps: int, device: torch.device) -> None:
        self.step_times.append(float(self._ask(f"time {steps}")))  # seconds per step

    def close(self, ask: bool = True) -> None:
        """Ask the child to quit (it sends its peak memory), reap it, close the pipes."""
        if self._fd is None:
            return
        if ask and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            with contextlib.suppress(FlexexpError, ValueError):
                # after an interrupted request an older reply may come first
                for _ in range(3):
                    info = json.loads(self._reply("quit", timeout=30))
                    if isinstance(info, dict):
                        self.info = info
                        break
        try:
            self.proc.wait(timeout=30 if ask else 0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        os.close(self._fd)
        self._fd = None


def serve_reference(cfg: DictConfig, workers: int, reply_fd: int) -> int:
    """The child side of :class:`ReferenceProcess`: answer requests on stdin until ``quit``."""
    os.dup2(2, 1)  # the parent's stdout carries its own results: print to stderr instead
    replies = os.fdopen(reply_fd, "w", buffering=1)
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    # the authors' loop gets the threads and determinism it is compared at, not the
    # harness's allocator setting
    configure_process(OmegaConf.merge(cfg.trainer, {"keep_heap": False}), device)
    mode = _reference_mode(cfg, load_arrays(OmegaConf.to_object(cfg.dataset)), device, workers)

    def reply(value: object) -> None:
        replies.write(f"{value}\n")  # line-buffered: sent at the newline

    try:
        reply(f"ready {mode.images_per_step}")
        for line in sys.stdin:
            verb, _, arg = line.strip().partition(" ")
            if verb == "run":
                mode.run(int(arg))
                reply("done")
            elif verb == "time":
                mode.time(int(arg), device)
                reply(mode.step_times[-1])
            else:
                break
        reply(json.dumps({"peak_rss_mb": peak_rss_mb(), "keep_heap": heap_kept()}))
    except (BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping
        return 1
    return 0


#: The seeds of a start-up probe's sweep: three cells of one model in one process.
SWEEP_SEEDS = (0, 1, 2)


def sweep_probe_command(overrides: list[str], batch_size: int, runs: str | Path) -> list[str]:
    """One start-up probe: a 3-cell multirun (seeds :data:`SWEEP_SEEDS`) of one step each in
    one process (Hydra's basic launcher), its run directories under ``runs``. The probe's
    own settings come last, so they win over the benchmarked overrides (a ``seed=`` too)."""
    return [sys.executable, "-m", "flexexp.train", "-m", *overrides,
            "seed=" + ",".join(map(str, SWEEP_SEEDS)), "trainer.epochs=1",
            f"dataset.train_size={batch_size}", "trainer.progress=false", f"paths.runs={runs}"]


def read_sweep_probe(runs: Path) -> list[dict]:
    """The cells of one probe's sweep, ordered by seed: each cell's ``startup_s``,
    ``setup_s``, ``first_step_s`` and ``setup_reused`` from its ``result.json``.
    A :class:`FlexexpError` unless every seed of :data:`SWEEP_SEEDS` completed once."""
    records = [json.loads(p.read_text()) for p in sorted(Path(runs).rglob("result.json"))]
    seeds = sorted(r.get("seed") for r in records)
    if seeds != list(SWEEP_SEEDS):
        raise FlexexpError(f"the probe's sweep wrote results for seeds {seeds}, "
                           f"not {list(SWEEP_SEEDS)}")
    cells = []
    for r in sorted(records, key=lambda r: r["seed"]):
        missing = [k for k in ("startup_s", "setup_s", "first_step_s", "setup_reused")
                   if r.get(k) is None]
        if r.get("status") != "completed" or missing:
            raise FlexexpError(f"the probe's cell seed={r['seed']} has status "
                               f"{r.get('status')!r} and no {missing}")
        cells.append({"startup_s": float(r["startup_s"]), "setup_s": float(r["setup_s"]),
                      "first_step_s": float(r["first_step_s"]),
                      "setup_reused": dict(r["setup_reused"])})
    return cells


def measure_startup(overrides: list[str], batch_size: int, probes: int = 3) -> list[list[dict]]:
    """Run ``probes`` start-up probes (:func:`sweep_probe_command`), one after another:
    per successful probe, its cells (:func:`read_sweep_probe`).

    Each probe is a fresh process, so the interpreter, imports, config, data (from the
    warm cache) and model are all in its first cell's time; its later cells show what a
    sweep's later cells pay (:mod:`flexexp.reuse`). A failed probe is skipped, with a
    warning.
    """
    out = []
    for _ in range(probes):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(sweep_probe_command(overrides, batch_size, tmp),
                                  capture_output=True, text=True)
            try:
                if proc.returncode != 0:
                    raise FlexexpError(f"exit code {proc.returncode}")
                out.append(read_sweep_probe(Path(tmp)))
            except (FlexexpError, OSError, ValueError) as exc:
                print(f"warning: start-up probe failed ({exc}):\n{proc.stderr[-1500:]}",
                      file=sys.stderr)
    return out


def startup_summary(probes: list[list[dict]]) -> dict:
    """The result's start-up keys from the probes' cells (:func:`measure_startup`).

    ``startup_probes_s``: per probe, its first cell's ``startup_s + setup_s``: a fresh
    process's start to its first training step; ``startup_s``: their median.
    ``sweep_setup_s``: per probe, each cell's ``setup_s + first_step_s``: the cell's start
    to the end of its first step (compilation included); ``sweep_later_over_first``: the
    median over probes of the mean of the later cells' over the first cell's.
    ``sweep_setup_reused``: per probe, what each cell took over from the cell before.
    """
    first = [cells[0]["startup_s"] + cells[0]["setup_s"] for cells in probes]
    sweep = [[c["setup_s"] + c["first_step_s"] for c in cells] for cells in probes]
    return {
        "startup_s": statistics.median(first) if first else None,
        "startup_probes_s": first,
        "sweep_setup_s": sweep,
        "sweep_later_over_first": statistics.median(
            statistics.fmean(s[1:]) / s[0] for s in sweep) if sweep else None,
        "sweep_setup_reused": [[c["setup_reused"] for c in cells] for cells in probes],
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def bench(cfg: DictConfig, overrides: list[str], rounds: int, steps: int, warmup: int,
          workers: int, variants: list[str], startup_probes: int, head_reps: int = 20,
          reference_process: str = "own") -> dict:
    with contextlib.ExitStack() as stack:
        return _bench(cfg, overrides, rounds, steps, warmup, workers, variants,
                      startup_probes, head_reps, reference_process, stack)


def _bench(cfg: DictConfig, overrides: list[str], rounds: int, steps: int, warmup: int,
           workers: int, variants: list[str], startup_probes: int, head_reps: int,
           reference_process: str, stack: contextlib.ExitStack) -> dict:
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    configure_process(cfg.trainer, device)  # as the trainer does, for all paths alike
    arrays = load_arrays(OmegaConf.to_object(cfg.dataset))
    x, y = _first_batch(cfg, arrays, device)
    bs = cfg.trainer.batch_size
    if reference_process == "own":
        reference = ReferenceProcess(overrides, bs, workers)
        stack.callback(reference.close)
    else:
        reference = _reference_mode(cfg, arrays, device, workers)
    plan = _plan(cfg, overrides, variants, arrays, x, y, device, reference)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    d, speed = cfg.dataset, resolve_speed(cfg.trainer, device).record()
    print(f"benchmark: {cfg.dataset.name} {d.image_size}x{d.image_size}, batch {bs}, "
          f"{device}, precision {speed['precision']}, channels_last "
          f"{speed['channels_last']}, compile {speed['compile']}; "
          f"{rounds} rounds x {steps} step(s) per mode after {warmup} warm-up step(s)",
          file=sys.stderr)
    for mode in [*plan.modes, *plan.variant_modes.values()]:  # allocator, kernels, workers
        mode.run(warmup)
    _sync(device)
    _time_rounds(plan, rounds, steps, device)
    out = _throughputs(cfg, device, plan, reference_process, rounds, steps)
    if plan.pairs:
        out.update(_overheads(plan, x, device, head_reps))
    if isinstance(reference, ReferenceProcess):
        reference.close()  # before the start-up probes: they get the machine to themselves
        out["reference_keep_heap"] = reference.info.get("keep_heap")
        out["reference_peak_rss_mb"] = reference.info.get("peak_rss_mb")
    out.update(startup_summary(measure_startup(overrides, bs, startup_probes)))
    out["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _first_batch(cfg: DictConfig, arrays, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``trainer.batch_size`` training images, normalised, and their labels, on
    the device: the batch of the fixed-batch modes."""
    d, bs = cfg.dataset, cfg.trainer.batch_size
    if bs > len(arrays.y_train):
        raise FlexexpError(f"trainer.batch_size={bs} is larger than the dataset's "
                           f"{len(arrays.y_train)} training images; raise dataset.train_size.")
    x_dev = arrays.x_train[:bs].to(device)
    mean = torch.tensor(list(d.mean), device=device).expand(d.in_channels).reshape(1, -1, 1, 1)
    std = torch.tensor(list(d.std), device=device).expand(d.in_channels).reshape(1, -1, 1, 1)
    return normalize(x_dev, mean, std), arrays.y_train[:bs].to(device)


@dataclass
class _Plan:
    """What a benchmark times: the three paths, the pool variants and their pairs."""

    modes: list[Mode]  # compute_bound, harness, reference: their throughputs are reported
    variant_cfgs: dict[str, DictConfig]  # every asked-for variant and the variants' bases
    variant_modes: dict[str, Mode]  # the same names: each variant's fixed-batch steps
    pairs: list[tuple[str, Mode, Mode, list[float]]]  # (variant, base, variant's mode, ratios)
    alone: list[Mode]  # variants in no pair (only `avg` asked for): timed on their own


def _plan(cfg: DictConfig, overrides: list[str], variants: list[str], arrays,
          x: torch.Tensor, y: torch.Tensor, device: torch.device, reference: Mode) -> _Plan:
    modes = [_fixed_batch_mode("compute_bound", cfg, x, y, device),
             _harness_mode(cfg, arrays, device), reference]
    variant_cfgs = {n: compose_config([*overrides, *VARIANTS[n][0]]) for n in with_bases(variants)}
    variant_modes = {n: _fixed_batch_mode(f"variant:{n}", c, x, y, device)
                     for n, c in variant_cfgs.items()}
    # each compared variant gets its own timed step of its base, right before or after
    # its own: the ratio of two adjacent steps is the least noisy comparison
    pairs = [(n, variant_modes[VARIANTS[n][1]], variant_modes[n], [])
             for n in with_bases(variants) if VARIANTS[n][1] is not None]
    alone = [m for n, m in variant_modes.items()
             if not any(n in (p, VARIANTS[p][1]) for p, *_ in pairs)]
    return _Plan(modes, variant_cfgs, variant_modes, pairs, alone)


def _time_rounds(plan: _Plan, rounds: int, steps: int, device: torch.device) -> None:
    """Time ``steps`` steps of every mode per round, alternating their order."""
    modes = plan.modes
    for r in range(rounds):
        # every other round in reverse order, so a slow drift of the machine's speed
        # hits the modes alike instead of always the last ones
        for mode in modes if r % 2 == 0 else modes[::-1]:
            mode.time(steps, device)
        for _, base, mode, ratios in plan.pairs if r % 2 == 0 else plan.pairs[::-1]:
            for m in (base, mode) if r % 2 == 0 else (mode, base):
                m.time(steps, device)
            ratios.append(mode.step_times[-1] / base.step_times[-1])
        for mode in plan.alone:
            mode.time(steps, device)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{m.name} {m.images_per_step / m.step_times[-1]:.0f}" for m in modes[:3]),
            file=sys.stderr)


def _throughputs(cfg: DictConfig, device: torch.device, plan: _Plan, reference_process: str,
                 rounds: int, steps: int) -> dict:
    """The result's settings and the three paths' images per second."""
    by = {m.name: m for m in plan.modes}
    return {
        "device": str(device),
        **resolve_speed(cfg.trainer, device).record(),  # as resolved for the device
        "keep_heap": heap_kept(),
        "threads": torch.get_num_threads(),
        "reference_process": reference_process,
        "batch_size": cfg.trainer.batch_size,
        "image_size": cfg.dataset.image_size,
        "rounds": rounds,
        "steps": steps,
        "harness_img_s": by["harness"].img_s,
        "compute_bound_img_s": by["compute_bound"].img_s,
        "reference_img_s": by["reference"].img_s,
        # throughputs over the same rounds: ratios of the modes' total (mean) step times
        "harness_over_compute": by["compute_bound"].step_s / by["harness"].step_s,
        "harness_over_reference": by["reference"].step_s / by["harness"].step_s,
        "variant_step_s": {n: m.step_s for n, m in plan.variant_modes.items()},
        # every round's images/s per mode, in the order the rounds ran
        "round_img_s": {m.name: [m.images_per_step / t for t in m.step_times]
                        for m in plan.modes},
    }


def _overheads(plan: _Plan, x: torch.Tensor, device: torch.device, head_reps: int) -> dict:
    """Each paired variant's cost over its base: whole steps and the heads alone."""
    out: dict = {"variant_base": {n: VARIANTS[n][1] for n, *_ in plan.pairs}}
    out["variant_overhead"] = {n: statistics.median(ratios) - 1
                               for n, _, _, ratios in plan.pairs}
    # the same comparison for the heads alone, as a fraction of the base's whole step
    heads = {n: heads_step_s(c, x, device, head_reps) for n, c in plan.variant_cfgs.items()}
    out["variant_heads_s"] = heads
    out["variant_heads_overhead"] = {n: (heads[n] - heads[b]) / plan.variant_modes[b].step_s
                                     for n, b in out["variant_base"].items()}
    # The summary keys take the worst variant of each kind. flex_overhead and
    # sac_overhead come from the heads-only timing: the time the variant adds to a
    # step, measured to ~0.1% of it; the whole-step pairs (the *_steps keys) bound
    # the same cost only to the machine's noise (a few % on a shared CPU).
    for key, table in (("", out["variant_heads_overhead"]),
                       ("_steps", out["variant_overhead"])):
        flex = [v for n, v in table.items() if n.startswith("flex") and "+sac" not in n]
        sac = [v for n, v in table.items() if n.endswith("+sac")]
        out[f"flex_overhead{key}"] = max(flex) if flex else None
        out[f"sac_overhead{key}"] = max(sac) if sac else None
    return out


def _settings_line(r: dict) -> str:
    """The speed settings as resolved for the device (:meth:`~flexexp.engine.Speed.record`)."""
    return (f"{r['device']}: precision {r['precision']}, channels_last "
            f"{str(r['channels_last']).lower()}, compile {r['compile']}, cudnn_benchmark "
            f"{str(r['cudnn_benchmark']).lower()}, fused_optimizer "
            f"{str(r['fused_optimizer']).lower()}")


def _startup_lines(r: dict) -> list[str]:
    """A fresh process's start-up to its first step, and the set-up of a sweep's cells
    (:func:`startup_summary`), each cell's the median over the probes."""
    if r.get("startup_s") is None:
        return ["start-up to first step: not measured"]
    probes = ", ".join(f"{v:.2f}" for v in r["startup_probes_s"])
    cells = [statistics.median(c) for c in zip(*r["sweep_setup_s"], strict=True)]
    return [f"start-up to first step: {r['startup_s']:.2f} s (median of {probes})",
            "sweep set-up (cells 1/2/3): " + " / ".join(f"{v:.2f}" for v in cells)
            + f" s (set-up + first step, median of {len(r['sweep_setup_s'])} probe(s); "
            f"later cells / first: {r['sweep_later_over_first']:.3f})"]


def format_table(r: dict) -> str:
    rows = [("compute_bound", r["compute_bound_img_s"], 1.0),
            ("harness", r["harness_img_s"], r["harness_over_compute"]),
            ("reference", r["reference_img_s"], r["reference_img_s"] / r["compute_bound_img_s"])]
    lines = [_settings_line(r), "", f"{'path':<24}{'images/s':>12}{'of compute bound':>20}"]
    lines += [f"{n:<24}{v:>12.0f}{f:>19.1%}" for n, v, f in rows]
    lines += ["", f"harness / compute_bound = {r['harness_over_compute']:.3f}",
              f"harness / reference     = {r['harness_over_reference']:.3f}"
              + (" (reference in its own process)" if r.get("reference_process") == "own"
                 else " (reference in this process, with its settings)")]
    if r.get("variant_overhead"):
        lines += ["", f"{'variant':<22}{'step s':>8}{'timed against':>19}{'overhead':>10}"
                      f"{'heads ms':>10}{'heads only':>12}"]
        for n, t in r["variant_step_s"].items():
            vs = r["variant_base"].get(n)
            heads = r.get("variant_heads_s", {}).get(n)
            line = f"{n:<22}{t:>8.3f}"
            line += f"{vs:>19}{r['variant_overhead'][n]:>+10.1%}" if vs else " " * 29
            if heads is not None:
                line += f"{heads * 1e3:>10.1f}"
                if vs:
                    line += f"{r['variant_heads_overhead'][n]:>+12.2%}"
            lines.append(line)
        lines.append("(overhead: whole steps, timed in adjacent pairs; heads only: the extra "
                     "time of the heads and pool penalty, forward and backward, over the "
                     "base's whole step)")
        if r.get("flex_overhead") is not None:
            lines.append(f"flex_overhead (worst FlexPool variant vs avg, heads only) = "
                         f"{r['flex_overhead']:+.2%}; whole steps {r['flex_overhead_steps']:+.1%}")
        if r.get("sac_overhead") is not None:
            lines.append(f"sac_overhead (worst SAC variant vs the same pool, heads only) = "
                         f"{r['sac_overhead']:+.2%}; whole steps {r['sac_overhead_steps']:+.1%}")
    lines += ["", *_startup_lines(r),
              f"peak RSS: {r['peak_rss_mb']:.0f} MB"
              + (f" (the reference's process: {r['reference_peak_rss_mb']:.0f} MB)"
                 if r.get("reference_peak_rss_mb") else "")
              + (f", peak GPU memory: {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexexp.bench",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10,
                    help="alternating rounds (default 10: on a shared 2-core CPU one step pair "
                         "scatters by about 3%%, the median of 10 by about 1.5%%; an even "
                         "count puts each mode first as often as second)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per mode per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader workers of the reference loop")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {','.join(VARIANTS)} ('' for none)")
    ap.add_argument("--startup-probes", type=int, default=3,
                    help="fresh `python -m flexexp.train -m seed=0,1,2` processes (3-cell "
                         "sweeps) timed to their first step and each cell's set-up (the "
                         "median is reported; default 3)")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up probes")
    ap.add_argument("--reference-process", choices=["own", "shared"], default="own",
                    help="run the reference loop in a process of its own, as the authors' "
                         "script runs (default), or inside this one, where it shares the "
                         "harness's process settings (trainer.keep_heap)")
    ap.add_argument("--serve-reference", type=int, metavar="FD", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for flexexp.train")
    args = ap.parse_intermixed_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    try:
        if unknown:
            raise FlexexpError(f"unknown --variants {unknown}; valid: {', '.join(VARIANTS)}")
        if min(args.rounds, args.steps) < 1 or min(args.warmup, args.startup_probes,
                                                     args.workers) < 0:
            raise FlexexpError("--rounds and --steps must be >= 1, --warmup, --workers and "
                               "--startup-probes >= 0")
        check_overrides(args.overrides)
        cfg = compose_config(args.overrides)
        if args.serve_reference is not None:
            return serve_reference(cfg, args.workers, args.serve_reference)
        result = bench(cfg, args.overrides, args.rounds, args.steps, args.warmup, args.workers,
                       variants, 0 if args.no_startup else args.startup_probes,
                       reference_process=args.reference_process)
    except FlexexpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
