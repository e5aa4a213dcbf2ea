"""What a run leaves on disk: checkpoints and provenance (files via :mod:`.files`; the
trackers, TensorBoard included, are :mod:`.trackers`)."""

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
