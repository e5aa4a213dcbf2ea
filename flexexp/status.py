"""Where a sweep stands: its cells, their states, how long the rest will take.

``python -m flexexp.report --status [experiment=NAME] [paths.runs=DIR] [overrides]``
composes the sweep's grid the way Hydra's basic sweeper does (the preset's
``hydra.sweeper.params`` crossed with the command line's comma lists), names each cell's
run directory (``<paths.runs>/<cell_name>``) and groups the cells:

- ``completed``: ``result.json`` says so;
- ``running``: a live process holds the cell's ``.lock`` (:func:`flexexp.rundir.exclusive`);
- ``failed``: the record says so (its error's first line is shown);
- ``interrupted``: the record says so, or says ``running`` while no process holds the
  lock (a run killed hard), or there is only a checkpoint (SIGKILL leaves no record);
- ``missing``: nothing yet.

The ETA is the completed cells' mean ``wall_time_s`` times the cells not completed (one
cell at a time). A running sweep prints its own progress (:func:`progress_line`, called by
:func:`flexexp.task.note`). Imports no torch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexexp.errors import ConfigError
from flexexp.files import read_json

__all__ = ["STATES", "human_duration", "sweep_cells", "sweep_size", "outcome",
           "progress_line", "lock_holder", "read_record", "cell_state", "collect", "eta_line",
           "format_status", "main", "USAGE"]

STATES = ("completed", "running", "failed", "interrupted", "missing")
RESULT_FILE = "result.json"  # flexexp.tracking.RESULT_FILE (that module imports torch)
CHECKPOINT_FILE = "last.pt"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

USAGE = """\
usage: python -m flexexp.report --status [experiment=NAME] [paths.runs=DIR] [overrides]

Lists the cells of a sweep (a preset's grid, crossed with comma lists on the command line;
without experiment=, the default cell or the sweep the comma lists give) as completed,
running, failed (with the error), interrupted or missing, with counts and an ETA."""


# ---------------------------------------------------------------------------- durations


def human_duration(seconds: float) -> str:
    """``45s``, ``3m10s``, ``1h02m`` (rounded to the second; hours drop the seconds)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------- the grid


def sweep_cells(params: Mapping[str, Any] | None, overrides: Sequence[str],
                config_loader: Any = None) -> list[list[str]]:
    """The override lists of every cell, as Hydra's basic sweeper makes them: the sweeper's
    ``params`` first, then the command line's ``overrides`` (a key in both: its place
    from ``params``, its values from the command line), crossed in that order.

    ``config_loader`` (Hydra's) is needed only for ``glob()`` over config groups.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(words)
    return BasicSweeper.split_arguments(parsed, None)[0]


def sweep_size(hydra_cfg: Any, config_loader: Any = None) -> int | None:
    """How many cells the sweep of ``hydra_cfg`` (a composed ``hydra`` node) launches; None
    when that is not known ahead (a sweeper other than the basic one, without n_trials)."""
    from omegaconf import OmegaConf

    sweeper = hydra_cfg.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        trials = sweeper.get("n_trials")
        return trials if isinstance(trials, int) else None
    params = sweeper.get("params")
    params = OmegaConf.to_container(params) if params is not None else {}
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task)
    try:
        return len(sweep_cells(params, overrides, config_loader))
    except Exception:  # the sweeper itself reports an override it cannot expand
        return None


# ---------------------------------------------------------------------------- progress


def outcome(row: Mapping[str, Any]) -> str:
    """What a cell of the sweep's log came to: ``test_acc 97.21``, ``failed``, ..."""
    if row.get("skipped"):
        return "skipped (already completed)"
    status, detail = row.get("status"), row.get("detail")
    if status == "completed":
        ok = isinstance(detail, int | float) and not isinstance(detail, bool)
        return f"test_acc {detail:.2f}" if ok and math.isfinite(detail) else "completed"
    return str(status)


def progress_line(rows: Sequence[Mapping[str, Any]], start: float | None,
                  cells: int | None, now: float) -> str:
    """``[k/N] <cell> test_acc 97.21 | elapsed 1m23s | ETA 3m10s`` for the last of
    ``rows`` (the sweep's log so far, in the order the cells ended).

    ETA = cells left x the mean sweep time per cell that ran (elapsed / cells not skipped:
    a skipped cell takes no time; with parallel jobs this is the sweep's pace per cell).
    """
    k, last = len(rows), rows[-1]
    elapsed = max(0.0, now - start) if start is not None else None
    ran = sum(1 for r in rows if not r.get("skipped"))
    if cells is not None and k >= cells:
        eta = "0s"
    elif cells is None or elapsed is None or ran == 0:
        eta = "?"
    else:
        eta = human_duration(elapsed / ran * (cells - k))
    cell = last.get("cell") or last.get("run_dir")
    took = human_duration(elapsed) if elapsed is not None else "?"
    return (f"[{k}/{cells if cells is not None else '?'}] {cell} {outcome(last)} | "
            f"elapsed {took} | ETA {eta}")


# ---------------------------------------------------------------------------- cell states


def lock_holder(run_dir: Path) -> int | None:
    """The pid in ``run_dir/.lock`` while a process holds it (``0``: held, no pid written
    yet); None when nobody holds it. Tests the lock itself with a shared lock taken and
    dropped at once: the pid is only shown, since the holder may run on another host of a
    cluster (where this machine cannot see its pid) and a dead process holds no lock."""
    import fcntl

    path = run_dir / ".lock"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
            pid = int(text) if text.isdigit() else 0
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return pid
            fcntl.flock(f, fcntl.LOCK_UN)
            return None
    except OSError:
        return None


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir/result.json`` as a dict; None when absent or not a readable JSON object."""
    try:
        rec = read_json(run_dir / RESULT_FILE)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def first_line(text: Any) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:300] if lines else ""


def cell_state(run_dir: Path) -> tuple[str, str, dict[str, Any] | None]:
    """``(state, detail, record)`` of one cell's run directory (states: :data:`STATES`)."""
    rec = read_record(run_dir)
    status = rec.get("status") if rec else None
    if status == "completed":
        acc = rec.get("test_acc")
        ok = isinstance(acc, int | float) and not isinstance(acc, bool)
        return "completed", f"test_acc {acc:.2f}" if ok else "no test_acc", rec
    pid = lock_holder(run_dir) if run_dir.is_dir() else None
    if pid is not None:
        return "running", f"pid {pid}" if pid else "", rec
    if status == "failed":
        return "failed", first_line(rec.get("error")), rec
    if status == "interrupted":
        return "interrupted", first_line(rec.get("error")), rec
    if status == "running":
        return "interrupted", "stale: the record says running but no process holds its lock", rec
    if rec is None and (run_dir / RESULT_FILE).exists():
        return "failed", f"{run_dir / RESULT_FILE} is not a run record", None
    if (run_dir / CHECKPOINT_FILE).exists():
        return "interrupted", "killed: a checkpoint but no record (resumes)", rec
    return "missing", "", rec


def collect(runs_root: Path, cells: Sequence[str]) -> dict[str, list[tuple[str, str, Any]]]:
    """Every state of :data:`STATES` with its cells: ``(cell, detail, record)``."""
    groups: dict[str, list[tuple[str, str, Any]]] = {s: [] for s in STATES}
    for cell in cells:
        state, detail, rec = cell_state(runs_root / cell)
        groups[state].append((cell, detail, rec))
    return groups


def eta_line(groups: Mapping[str, Sequence[tuple[str, str, Any]]]) -> str:
    """The completed cells' mean ``wall_time_s`` x the cells not completed."""
    times = [t for _, _, rec in groups["completed"]
             if isinstance(t := (rec or {}).get("wall_time_s"), int | float)
             and not isinstance(t, bool) and math.isfinite(t) and t >= 0]
    left = sum(len(v) for k, v in groups.items() if k != "completed")
    if left == 0:
        return "ETA 0s: every cell completed"
    cells = f"{left} cell{'s' if left != 1 else ''} not completed"
    if not times:
        return f"ETA unknown: {cells}, none completed with a wall time yet"
    mean = sum(times) / len(times)
    return (f"ETA {human_duration(mean * left)}: {cells} x "
            f"{human_duration(mean)} per cell (mean wall_time_s of {len(times)} completed, "
            "one cell at a time)")


def format_status(runs_root: Path, groups: Mapping[str, Sequence[tuple[str, str, Any]]],
                  what: str) -> str:
    """The listing: each state with its cells, the counts, the ETA."""
    total = sum(len(v) for v in groups.values())
    lines = [f"{total} cells of {what} under {runs_root}"]
    for state in STATES:
        if groups[state]:
            lines.append(f"{state} ({len(groups[state])}):")
            lines += [f"  {cell}" + (f": {detail}" if detail else "")
                      for cell, detail, _ in groups[state]]
    lines.append(", ".join(f"{len(groups[s])} {s}" for s in STATES) + f" (of {total})")
    lines.append(eta_line(groups))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command


def grid(overrides: Sequence[str]) -> tuple[Path, list[str]]:
    """``(paths.runs, the cell names)`` (:func:`flexexp.config.cell_name`) of the sweep
    these command-line overrides give, a preset's ``hydra.sweeper.params`` included."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from flexexp.config import CONF_DIR, cell_name, register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        loader = GlobalHydra.instance().config_loader()
        fixed = [o.input_line for o in _parse(overrides, loader) if not o.is_sweep_override()]
        base = compose("config", overrides=fixed, return_hydra_config=True)
        params = base.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if params is not None else {}
        names = []
        for cell in sweep_cells(params, overrides, loader):
            task = [o for o in cell if not o.lstrip("+~").startswith("hydra")]
            names.append(cell_name(compose("config", overrides=task)))
    return Path(str(base.paths.runs)), names


def _parse(overrides: Sequence[str], loader: Any) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=loader).parse_overrides(list(overrides))


def main(argv: Sequence[str]) -> int:
    """``report --status [overrides]``: print where the sweep stands (exit 2: bad input)."""
    argv = list(argv)
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return 0
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(f"error: unknown argument {bad[0]!r}: --status takes overrides key=value, e.g. "
              f"experiment=demo paths.runs=runs.\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        runs, names = _checked_grid(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    experiment = next((a.split("=", 1)[1] for a in reversed(argv)
                       if a.lstrip("+~").startswith("experiment=")), None)
    what = f"experiment={experiment}" if experiment else "the sweep"
    print(format_status(runs, collect(runs, names), what))
    return 0


def _checked_grid(argv: list[str]) -> tuple[Path, list[str]]:
    """:func:`grid`, any error in the overrides as one ConfigError paragraph."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from flexexp.config import check_overrides

    check_overrides(argv)  # unknown keys and options, with the valid names
    try:
        return grid(argv)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        text = " ".join(str(exc).split())
        raise ConfigError(f"cannot compose the sweep of {' '.join(argv) or 'the defaults'}: "
                          f"{text}") from None


if __name__ == "__main__":  # python -m flexexp.status works too
    sys.exit(main(sys.argv[1:]))
