"""The Hydra task (one cell per call) and what a sweep tells its user.

:func:`task` runs :func:`flexexp.trainer.run` in Hydra's output directory. What happens
when a cell goes wrong (README "Failure policy"):

- a single run with a user-fixable error (bad value, missing data) prints it once, as one
  paragraph, and exits with status 2; a run refused before it started leaves no folder;
- in a sweep the cell's ``result.json`` says ``failed`` with the error (also when it failed
  before it started), one line goes to stderr, and the sweep goes on; every cell's end
  prints ``[k/N] <cell> <outcome> | elapsed | ETA`` (:func:`note`); at the end
  :class:`SweepStatus` prints every cell that did not complete, and the process exits 1;
- SIGTERM/SIGUSR1 (:mod:`flexexp.signals`): the cell records ``interrupted`` and the
  process ends by the same signal, so a scheduler requeues it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flexexp import console, rundir, signals, status, trainer
from flexexp.config import cell_hash
from flexexp.errors import FlexexpError
from flexexp.tracking import RESULT_FILE

__all__ = ["task", "SweepStatus", "note", "summary", "SWEEP_LOG_ENV"]

SWEEP_LOG_ENV = "FLEXEXP_SWEEP_LOG"
log = logging.getLogger(__name__)


def task(cfg: DictConfig) -> float | None:
    """The ``@hydra.main`` task: run the cell in Hydra's output directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep, out = hc.mode == RunMode.MULTIRUN, Path(hc.runtime.output_dir)
    job_num = OmegaConf.select(hc, "job.num", default=0) or 0  # missing in a single run
    done_before = sweep and _status(out) == "completed"  # then the run skips it
    try:
        record = trainer.run(cfg, out, job_num, rundir.hydra_files(cfg, hc), wait=sweep)
    except KeyboardInterrupt:  # Ctrl-C: the record says interrupted; no traceback
        _say(f"{out}: interrupted (Ctrl-C); run the same command to resume from the last "
             "checkpoint.")
        note(out, "interrupted", "Ctrl-C")
        raise SystemExit(130) from None
    except signals.Interrupted as exc:
        _say(f"{out}: {exc}; run the same command to resume from the last finished epoch's "
             "checkpoint (none before the first epoch ends: it starts again).")
        note(out, "interrupted", str(exc))
        signals.redeliver()  # the default action ends the process; a requeue handler runs
        raise SystemExit(128 + exc.signum) from None
    except (FlexexpError, OSError) as exc:  # OSError: a full disk, a folder not writable
        return _failed(cfg, out, exc, sweep)
    except Exception as exc:  # a bug: a single run shows its traceback; a sweep goes on
        if not sweep:
            raise
        return _failed(cfg, out, exc, sweep)
    note(out, record.get("status", "?"), record.get("test_acc"), skipped=done_before)
    signals.redeliver()  # a signal that came after the last step: the run completed first
    return record.get("test_acc")


def _say(message: str) -> None:
    """One paragraph on stderr, and the same in train.log (not twice on the console)."""
    console.to_log_file(message)
    print(f"error: {message}", file=sys.stderr)


def _failed(cfg: DictConfig, out: Path, exc: Exception, sweep: bool) -> None:
    """Report a cell that failed; call it from the ``except`` block (error.txt: its traceback)."""
    message = str(exc) if isinstance(exc, FlexexpError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        message += (" Free space or fix the permissions (or choose another paths.runs), then "
                    "run the same command: the last checkpoint is kept.")
    if not sweep:
        rundir.remove_unclaimed(out, Path(cfg.paths.runs))
        console.to_log_file(message)
        print(f"\nerror: {message}", file=sys.stderr)
        signals.redeliver()  # a scheduler's signal that came first still ends the process
        sys.exit(2)
    path = out / RESULT_FILE
    # refused before it started: record it, over nothing but a record of ours that did not
    # complete (a stray result.json of another kind stays as it is)
    if not getattr(exc, "flexexp_recorded", False) and (
            not (path.exists() or path.is_symlink())
            or _status(out) in ("failed", "interrupted", "running")):
        with contextlib.suppress(OSError):  # a full disk: the summary still names it
            out.mkdir(parents=True, exist_ok=True)
            rundir.write_failure(out, rundir.new_record(cfg, out, cell_hash(cfg)), exc,
                                 time.time())
    _say(f"{out}: {message}")
    note(out, "failed", message)
    signals.redeliver()  # a scheduler's signal that came before the failure still counts
    return None


def _status(run_dir: Path) -> str | None:
    rec = status.read_record(run_dir)
    return rec.get("status") if rec else None


# ---------------------------------------------------------------------------- sweeps


class SweepStatus(Callback):
    """Hydra callback (conf/config.yaml): a sweep's cells note how they ended in
    ``<sweep dir>/.sweeps/<start>-<pid>.jsonl`` (first line: the start time and the number
    of cells); each cell's end prints ``[k/N] <cell> ... | elapsed | ETA`` (:func:`note`),
    and ``flexexp.train`` prints :func:`summary` at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir) / ".sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        header = {"sweep": {"start": time.time(), "cells": _sweep_size(config)}}
        path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        os.environ[SWEEP_LOG_ENV] = str(path)  # launcher workers start later: they inherit it


def _sweep_size(config: DictConfig) -> int | None:
    """The number of cells Hydra's sweeper will launch (None: not known ahead)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    return status.sweep_size(config.hydra, hydra.config_loader() if hydra.is_initialized()
                             else None)


def note(run_dir: Path, state: str, detail: Any, skipped: bool = False) -> None:
    """Append one cell's end to the sweep's log and print its progress line (a no-op
    outside a sweep). The log is locked while the line is added and the log read back, so
    parallel workers (joblib, submitit) count k = 1..N each once."""
    import fcntl

    path = os.environ.get(SWEEP_LOG_ENV)
    if not path:
        return
    row = {"run_dir": str(run_dir), "status": state, "detail": detail, "end": time.time(),
           "cell": _cell(run_dir), **({"skipped": True} if skipped else {})}
    with open(path, "a+", encoding="utf-8") as f:  # one short append: whole lines
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.write(json.dumps(row) + "\n")
        f.flush()
        f.seek(0)
        header, rows = _read_log(f.read())
    log.info("%s", status.progress_line(rows, header.get("start"), header.get("cells"),
                                        time.time()))


def _cell(run_dir: Path) -> str:
    """The cell's name below paths.runs (Hydra's output dir is ``<paths.runs>/<cell>``)."""
    from hydra.core.hydra_config import HydraConfig

    with contextlib.suppress(Exception):  # no Hydra run: the folder as it is
        root = Path(HydraConfig.get().sweep.dir).absolute()
        return Path(run_dir).absolute().relative_to(root).as_posix()
    return str(run_dir)


def _read_log(text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(the sweep's header, the cells' rows)`` of a sweep's log."""
    header: dict[str, Any] = {}
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("sweep"), dict):
            header = row["sweep"]
        elif isinstance(row, dict) and "run_dir" in row:
            rows.append(row)
    return header, rows


def summary(path: str | Path) -> tuple[str, int]:
    """``(text, cells not completed)`` of a sweep's log."""
    _, rows = _read_log(Path(path).read_text(encoding="utf-8"))
    bad = [r for r in rows if r.get("status") != "completed"]
    text = f"sweep: {len(rows)} cells, {len(rows) - len(bad)} completed, {len(bad)} not"
    for r in bad:
        first = str(r.get("detail") or "").splitlines()[0][:300] if r.get("detail") else ""
        text += f"\n  {r['status']}: {r['run_dir']}: {first}"
    return text, len(bad)
