"""Which GPU a run takes on a machine with several.

A sweep with ``hydra/launcher=joblib hydra.launcher.n_jobs=k`` runs k cells at once,
each in a worker process; with ``trainer.device=auto`` (or ``cuda``) every cell picks
its GPU here, by ``trainer.gpu_policy``:

- ``least_used`` (default): the GPU the fewest flexexp runs on this machine hold now.
  Every run holds a lock file ``<lock dir>/gpu<i>.slot<j>.lock`` while it trains
  (``flock``, released when the run ends or its process dies); a new run takes the
  lowest free slot ``j`` of any GPU, GPUs in index order, so k jobs on k GPUs get one
  GPU each, and a (k+1)-th shares the first GPU that frees a slot.
- ``round_robin``: job number ``n`` of the sweep takes GPU ``n mod count``.

``trainer.device=cuda:K`` names its GPU and skips both; so does ``torchrun`` (each rank
has its own). The choice goes into ``result.json`` (``device``, ``gpu_policy``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["GPU_POLICIES", "lock_dir", "round_robin", "hold_least_used", "hold_gpu"]

GPU_POLICIES = ("least_used", "round_robin")


def lock_dir() -> Path:
    """Where the runs of this user on this machine hold their GPU slots."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("FLEXEXP_GPU_LOCKS", Path(tempfile.gettempdir())
                               / f"flexexp-gpus-{uid}"))


def round_robin(job_num: int, count: int) -> int:
    """GPU of job ``job_num`` (0-based) of a sweep over ``count`` GPUs."""
    return job_num % count


@contextlib.contextmanager
def hold_least_used(count: int, folder: Path, max_slots: int = 64) -> Iterator[int]:
    """Hold a slot of the GPU that the fewest runs hold now; yield its index.

    Slot ``j`` of every GPU is tried before slot ``j + 1`` of any, so the GPUs fill
    evenly. The slot is released when the block ends (or the process dies).
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(max_slots):
        for gpu in range(count):
            f = open(folder / f"gpu{gpu}.slot{slot}.lock", "a+")  # noqa: SIM115 (held open)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
                yield gpu
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
    yield round_robin(os.getpid(), count)  # more than max_slots runs per GPU: spread them


@contextlib.contextmanager
def hold_gpu(device: str, policy: str, job_num: int, count: int | None = None
             ) -> Iterator[int | None]:
    """The GPU index a run with ``trainer.device=device`` takes, held for the block;
    None where there is nothing to choose (a CPU run, ``cuda:K``, one GPU, torchrun)."""
    import torch

    if count is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device not in ("auto", "cuda") or count <= 1
            or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        yield None
    elif policy == "round_robin":
        yield round_robin(job_num, count)
    else:
        with hold_least_used(count, lock_dir()) as gpu:
            yield gpu
