"""What a run leaves on disk: checkpoints, provenance, TensorBoard (files via :mod:`.files`)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from flexexp.files import atomic_write_bytes, atomic_write_text, read_json, write_json

log = logging.getLogger(__name__)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "save_checkpoint",
    "load_checkpoint",
    "git_commit",
    "process_age",
    "startup_age",
    "TensorBoardLogger",
]

RESULT_FILE = "result.json"
CHECKPOINT_FILE = "last.pt"
CELL_FILE = "cell.json"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save a checkpoint (tensors, numbers, strings, lists and dicts only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Load a checkpoint with ``weights_only=True``; a corrupt one is moved aside.

    Returns ``None`` when there is no checkpoint, or when it could not be read (it is
    then renamed to ``<name>.corrupt-<time>`` and kept, and the run starts afresh).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError("not a flexexp checkpoint (no 'model' entry)")
        return state
    except Exception as exc:  # any unreadable file: keep it, start over
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning(
            "checkpoint %s could not be read (%s: %s); moved it to %s and starting this run "
            "from scratch",
            path, type(exc).__name__, exc, aside.name,
        )
        return None


def git_commit(repo: Path | None = None) -> str | None:
    """The commit of the flexexp checkout (with ``-dirty`` when it has local changes)."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


_IMPORTED_AT = time.time()
_STARTUP: list[float] = []


def startup_age() -> float:
    """Seconds from this process's start to its first call (imports, Hydra, launcher):
    the same number for every cell a sweep runs in this process (``startup_s``)."""
    if not _STARTUP:
        _STARTUP.append(process_age())
    return _STARTUP[0]


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since import)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED_AT


class TensorBoardLogger:
    """Scalars and FlexPool weight pictures under ``<run_dir>/tb``; a no-op when disabled."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def epoch(self, e: dict[str, Any], model: torch.nn.Module, step: int) -> None:
        """An epoch's history entry ``e`` as scalars; with its test accuracies, the
        FlexPool weights of ``model`` (its ``flex_pools()``) as pictures too."""
        scalars = {
            "train/loss": e["train_loss"],
            "train/acc": e["train_acc"],
            "train/lr": e["lr"],
            "train/beta1": e.get("beta1"),  # Adam (None: not logged)
            "train/momentum": e.get("momentum"),  # SGD
            "train/penalty": e["penalty"],
            "train/images_per_s": e["images_per_s"],
            **{f"train/loss_{h}": v for h, v in e["train_loss_heads"].items()},
        }
        if "test_acc" in e:
            scalars["test/acc_main"] = e["test_acc"]
            scalars.update({f"test/acc_{h}": v for h, v in e["test_acc_aux"].items()})
            scalars["test/top5_main"] = e.get("test_top5")
            scalars.update({f"test/top5_{h}": v for h, v in e.get("test_top5_aux", {}).items()})
            self.flex_weights(model.flex_pools(), step)
        self.scalars(scalars, step)

    def flex_weights(self, pools: list[tuple[str, torch.nn.Module]], step: int) -> None:
        """One picture per FlexPool: a grid of its per-channel weight maps, min-max scaled."""
        if self.writer is None or not pools:
            return
        from torchvision.utils import make_grid

        for name, pool in pools:
            w = pool.effective_weight().detach().float().cpu()  # (C, H, W)
            lo, hi = w.min(), w.max()
            img = (w - lo) / (hi - lo) if hi > lo else torch.full_like(w, 0.5)
            grid = make_grid(img[:, None], nrow=int(len(w) ** 0.5 + 0.999), padding=1,
                             pad_value=1.0)
            self.writer.add_image(f"flexpool/{name}", grid, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
