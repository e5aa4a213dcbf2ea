"""Tables of the recipe probe: ``python -m flexexp.probe [paths.runs=DIR] [out_dir=DIR]``.

Reads every ``result.json`` under ``paths.runs`` (default ``runs/fmnist-probe``, where
``experiment=fmnist_probe`` writes) and writes to ``out_dir`` (default
``results/fmnist-probe``):

- ``probe.csv``: one row per run: pool, peak LR, epochs, steps, seed, status, final
  train loss and accuracy, test accuracy, wall time;
- ``curves.csv``: one row per run and epoch (the step reached, the LR, loss, accuracies);
- ``README.md``: the commands, the settings the runs share, and test (and train) accuracy
  by step budget for each pool and peak LR, with what the numbers are evidence of.

A probe compares step budgets at fixed data, batch and precision: runs whose other
settings differ are not put in one table (the command stops and names the difference).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from flexexp.cli import parse_options
from flexexp.files import atomic_write_text

__all__ = ["load_probe", "probe_tables", "main"]

#: Settings every run of one probe table must share (dotted config keys).
SHARED = ["dataset.name", "dataset.train_size", "dataset.test_size", "dataset.data_seed",
          "trainer.batch_size", "trainer.precision", "trainer.channels_last", "sac.enabled",
          "model.depth", "sched.name", "sched.pct_start", "optim.name", "optim.weight_decay"]


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _row(path: Path, rec: dict[str, Any], runs_dir: Path
         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = rec.get("config") or {}
    hist = rec.get("history") or []
    train_size, batch = _get(cfg, "dataset.train_size"), _get(cfg, "trainer.batch_size")
    steps_per_epoch = math.ceil(train_size / batch) if train_size and batch else math.nan
    last = hist[-1] if hist else {}
    row = {
        "pool": rec["pool"], "lr": _get(cfg, "optim.lr"), "epochs": rec["epochs"],
        "steps": rec["epochs"] * steps_per_epoch, "seed": rec["seed"], "status": rec["status"],
        "train_loss": last.get("train_loss", math.nan),
        "train_acc": last.get("train_acc", math.nan),
        "test_acc": rec.get("test_acc") if rec.get("test_acc") is not None else math.nan,
        "wall_time_s": rec.get("wall_time_s", math.nan),
        "run_dir": path.parent.relative_to(runs_dir).as_posix(),
        "machine": f"{rec.get('device')} ({rec.get('device_name')}), torch "
                   f"{rec.get('torch_version')}",
        **{k: json.dumps(_get(cfg, k)) for k in SHARED},
    }
    curve = [{"pool": row["pool"], "lr": row["lr"], "budget_steps": row["steps"],
              "seed": row["seed"], "epoch": h["epoch"], "step": h["epoch"] * steps_per_epoch,
              "lr_now": h.get("lr"), "train_loss": h.get("train_loss"),
              "train_acc": h.get("train_acc"), "test_acc": h.get("test_acc")} for h in hist]
    return row, curve


def load_probe(runs_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, curves)`` from every readable ``result.json`` under ``runs_dir``."""
    rows, curves = [], []
    for path in sorted(Path(runs_dir).rglob("result.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            row, curve = _row(path, rec, Path(runs_dir))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"skipping {path}: {type(exc).__name__}: {exc}", stacklevel=2)
            continue
        rows.append(row)
        curves += curve
    return pd.DataFrame(rows), pd.DataFrame(curves)


def _check_shared(runs: pd.DataFrame) -> None:
    mixed = {k: sorted(runs[k].unique()) for k in SHARED if runs[k].nunique() > 1}
    if mixed:
        what = "; ".join(f"{k} takes {', '.join(v)}" for k, v in mixed.items())
        raise ValueError(
            f"the runs differ in more than pool, peak LR, epochs and seed ({what}), so one "
            f"table would compare unlike runs. Point paths.runs at a folder holding one probe "
            f"(experiment=fmnist_probe writes to runs/fmnist-probe)."
        )


def _pivot(done: pd.DataFrame, value: str) -> pd.DataFrame:
    table = done.pivot_table(index=["pool", "lr"], columns="steps", values=value,
                             aggfunc="mean")
    table.columns = [f"{int(c)} steps" for c in table.columns]
    return table


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| pool | peak LR | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for (pool, lr), r in table.iterrows():
        cells = ["—" if math.isnan(r[c]) else f"{r[c]:.1f}" for c in cols]
        lines.append(f"| {pool} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_tables(runs: pd.DataFrame, runs_dir: str | Path) -> str:
    """The README text: commands, shared settings, and the accuracy tables."""
    _check_shared(runs)
    done = runs[runs.status == "completed"]
    first = runs.iloc[0]
    shared = ", ".join(f"{k}={json.loads(first[k])}" for k in SHARED)
    seeds = sorted(done.seed.unique())
    text = [
        "# Recipe probe: test accuracy against the number of steps",
        "",
        "Generated by `python -m flexexp.probe` from the runs under "
        f"`{runs_dir}`; made with:",
        "",
        "```bash",
        "python -m flexexp.data download dataset=fashion_mnist   "
        "# apt-get install dataset-fashion-mnist first",
        "python -m flexexp.train experiment=fmnist_probe",
        "python -m flexexp.probe",
        "```",
        "",
        "Evidence about the paper's training recipe (Adam with a one-cycle schedule, peak "
        "LR 0.1, batch 1000) on real data, **not a reproduction** of its tables: a subset "
        "of the training set, step budgets far below the paper's 100 epochs, "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}). Each budget is a one-cycle "
        "schedule of its own length.",
        "",
        f"Shared settings: {shared}.",
        "",
        f"Measured on: {'; '.join(sorted(runs.machine.unique()))}.",
        "",
        "## Test accuracy (%)",
        "",
        _markdown(_pivot(done, "test_acc")),
        "",
        "## Training accuracy in the last epoch (%)",
        "",
        _markdown(_pivot(done, "train_acc")),
        "",
        f"{len(done)} completed runs of {len(runs)}; per-run values in `probe.csv`, "
        "per-epoch values in `curves.csv`.",
    ]
    failed = runs[runs.status != "completed"]
    if len(failed):
        text += ["", "Runs that did not complete (not in the tables):", ""]
        text += [f"- {r.run_dir}: {r.status}" for r in failed.itertuples()]
    return "\n".join(text) + "\n"


USAGE = """usage: python -m flexexp.probe [paths.runs=DIR] [out_dir=DIR]

Tables of experiment=fmnist_probe's runs (default paths.runs=runs/fmnist-probe) into
out_dir (default results/fmnist-probe): probe.csv, curves.csv and README.md."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_options(argv, {"paths.runs": "runs/fmnist-probe",
                                "out_dir": "results/fmnist-probe"}, USAGE)
    if isinstance(opts, int):
        return opts
    runs_dir, out = Path(opts["paths.runs"]), Path(opts["out_dir"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs, curves = load_probe(runs_dir) if runs_dir.is_dir() else (pd.DataFrame(), None)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if runs.empty:
        print(f"error: no runs under {runs_dir}: run `python -m flexexp.train "
              "experiment=fmnist_probe` first, or point paths.runs=DIR at the probe's runs.",
              file=sys.stderr)
        return 2
    try:
        readme = probe_tables(runs, runs_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe.csv", runs.drop(columns=SHARED).sort_values(
        ["pool", "lr", "steps", "seed"]).to_csv(index=False, float_format="%.4f"))
    atomic_write_text(out / "curves.csv", curves.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "README.md", readme)
    print(readme)
    print(f"wrote {out}/probe.csv, curves.csv, README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
