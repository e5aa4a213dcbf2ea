"""What a person reads while a run goes: progress, one line per epoch, one at the end.

Progress bars only on a terminal (``trainer.progress`` asks for them; in a log file or a
scheduler's output they would be ~160 KB of carriage returns), so what a job leaves in
its log is the run's own lines: the set-up, one line per epoch, and the end-of-run line
with the accuracy and the run directory (:func:`done_line`). A user-fixable error is
printed once, as one paragraph, on stderr; :func:`to_log_file` puts it in ``train.log``
without printing it a second time through the console handler.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["progress_bar", "epoch_line", "done_line", "to_log_file"]


def progress_bar(enabled: bool, total: int, desc: str):
    """A progress bar of ``total`` steps on stderr when ``enabled`` and stderr is a
    terminal; otherwise None."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


def epoch_line(e: dict[str, Any], epoch: int, epochs: int) -> str:
    """``epoch 3/15: loss ... train ...% test ...% lr ... img/s``."""
    test = f"{e['test_acc']:.2f}%" if e.get("test_acc") is not None else "-"
    val = f"val {e['val_acc']:.2f}% " if e.get("val_acc") is not None else ""
    return (f"epoch {epoch}/{epochs}: loss {e['train_loss']:.4f} train {e['train_acc']:.2f}% "
            f"{val}test {test} lr {e['lr']:.2e} {e['images_per_s']:.0f} img/s")


def done_line(record: dict[str, Any], skipped: bool = False) -> str:
    """The run's last line: its cell, accuracy, time and directory."""
    sac = "on" if record.get("sac") else "off"
    cell = f"{record.get('dataset')} {record.get('pool')} sac={sac} seed {record.get('seed')}"
    acc = record.get("test_acc")
    aux = ", ".join(f"{k} {v:.2f}%" for k, v in (record.get("test_acc_aux") or {}).items())
    result = f"test_acc {acc:.2f}%" + (f" ({aux})" if aux else "") if acc is not None else \
        "no test accuracy"
    how = "already completed, skipped" if skipped else (
        f"{record.get('epochs')} epochs in {record.get('wall_time_s') or 0:.1f} s")
    return f"done: {cell}: {result}, {how} | {record.get('run_dir')}"


def to_log_file(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the log files of the root logger (Hydra's ``train.log``) only."""
    root = logging.getLogger()
    record = root.makeRecord("flexexp", level, __file__, 0, message, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
