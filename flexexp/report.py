"""Rebuild the paper's Tables 1 and 2 (and Table 3, related pools) from run records.

``python -m flexexp.report``

Reads every ``result.json`` under ``paths.runs`` and writes to ``out_dir``:

- ``table1.csv`` / ``table2.csv``: one row per (dataset, variant) with
  ``dataset, variant, n, mean, std, min, max, paper, delta`` (SAC off / on);
- ``table1.md`` / ``table2.md``: datasets as rows, variants as columns,
  ``mean ± std (n)`` beside the paper's number, then the significance table;
- ``significance1.csv`` / ``significance2.csv``: each FlexPool variant against AvgPool on
  the same dataset and seeds (paired t-test and 95% interval of the difference);
- ``figure1.png`` / ``figure2.png``: bar charts like the paper's Figures 2 and 4;
- ``runs.csv`` (every run read) and ``failed.csv`` (runs that did not complete);
- ``table3.csv`` / ``table3.md``, only when there are runs of the related pools
  (PAPER.md sec. 5: a global pool other than the four paper variants, or
  ``model.downsample`` other than ``stride``): one row per dataset x SAC x
  (pool, downsample) with ``n, mean, std, min, max``, the model's parameters, the extra
  parameters over AvgPool + stride, and the mean training step time.

Tables 1 and 2 are the paper's backbone, so they only read ``model.downsample=stride``
runs (records without the key count as stride); Table 3 reads every run on the datasets
(and SAC setting) that have related runs, so its baselines sit beside them.

A pure function of the records: it needs neither torch nor a Hydra run. Cells without
runs stay empty (never zero); failed runs are listed, not averaged; runs of different
configs (other than the seed) are never averaged together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from flexexp.cli import parse_options

log = logging.getLogger("flexexp.report")

PAPER_DATASETS = ["cifar10", "fashion_mnist", "cifar100", "tiny_imagenet"]
VARIANTS = ["avg", "flex", "flex_reg", "flex_reg_dropout"]
LABELS = {
    "cifar10": "CIFAR10", "fashion_mnist": "Fashion-MNIST", "cifar100": "CIFAR100",
    "tiny_imagenet": "Tiny ImageNet", "digits": "Digits", "synthetic": "Synthetic",
    "avg": "AvgPool", "flex": "FlexPool", "flex_reg": "FlexPool+Reg",
    "flex_reg_dropout": "FlexPool+Reg+Dropout", "flex_softmax": "FlexPool (softmax)",
    "max": "MaxPool", "gfgp": "GFGP",
}
#: Table 3 orders: global pools, then ``model.downsample`` options (flexexp.models).
POOL_ORDER = ["avg", "max", "flex", "flex_reg", "flex_reg_dropout", "flex_softmax", "gfgp"]
DOWNSAMPLES = ["stride", "max", "avg", "gfgp", "s3pool"]
DOWNSAMPLE_LABELS = {"stride": "stride conv", "max": "MaxPool", "avg": "AvgPool",
                     "gfgp": "GFGP", "s3pool": "S3Pool"}
POOLS_COLUMNS = ["dataset", "sac", "pool", "downsample", "n", "mean", "std", "min", "max",
                 "params", "extra_params", "step_ms"]
TABLE_COLUMNS = ["dataset", "variant", "n", "mean", "std", "min", "max", "paper", "delta"]
REQUIRED = ("dataset", "pool", "sac", "seed", "status")
DEFAULT_PAPER_DIR = Path(__file__).resolve().parent / "paper"  # the published numbers (an input)


# ---------------------------------------------------------------------------- reading


def _config_key(rec: dict[str, Any]) -> str:
    """Hash of the run's config without the seed: runs with equal keys may be averaged."""
    from flexexp.config import cell_config  # omegaconf only: no torch, no Hydra runtime

    cfg = cell_config(rec.get("config") or {})  # the run's identity, as its run dir uses
    cfg.pop("seed", None)
    trainer = cfg.get("trainer")
    if isinstance(trainer, dict):  # `auto` is bf16 on a GPU, fp32 on a CPU: key on what ran
        trainer.update({k: rec[k] for k in ("precision", "channels_last", "compile") if k in rec})
    if not cfg:  # no config in the record: fall back to what the record says
        cfg = {k: rec.get(k) for k in ("dataset", "pool", "sac", "epochs")}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def _downsample(rec: dict[str, Any]) -> str:
    """``config.model.downsample`` of a record; ``stride`` where the record predates it."""
    model = (rec.get("config") or {}).get("model") or {}
    return str(model.get("downsample") or "stride")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def load_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per readable ``result.json`` under ``runs_dir``; bad files are skipped with a
    warning naming each one."""
    rows = []
    for path in sorted(Path(runs_dir).rglob("result.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                raise ValueError(f"missing keys {missing}")
            acc = rec.get("test_acc")
            if rec["status"] == "completed" and not isinstance(acc, int | float):
                raise ValueError("completed but test_acc is not a number")
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping {path}: {exc}", stacklevel=2)
            continue
        rows.append({
            "dataset": str(rec["dataset"]),
            "variant": str(rec["pool"]),
            "sac": bool(rec["sac"]),
            "seed": int(rec["seed"]),
            "status": rec["status"],
            "test_acc": float(rec["test_acc"]) if rec.get("test_acc") is not None else math.nan,
            "epochs": rec.get("epochs"),
            "downsample": _downsample(rec),
            "num_params": _number(rec.get("num_params")),
            "images_per_s": _number(rec.get("images_per_s")),
            "batch_size": _number(((rec.get("config") or {}).get("trainer") or {})
                                  .get("batch_size")),
            "config_key": _config_key(rec),
            "error": rec.get("error", ""),
            "run_dir": str(path.parent),
            "finished": path.stat().st_mtime,
        })
    cols = ["dataset", "variant", "sac", "seed", "status", "test_acc", "epochs", "downsample",
            "num_params", "images_per_s", "batch_size", "config_key", "error", "run_dir",
            "finished"]
    return pd.DataFrame(rows, columns=cols)


def load_paper(paper_dir: str | Path, table: int) -> pd.DataFrame:
    """The paper's numbers in long form ``dataset, variant, paper`` (empty if absent)."""
    path = Path(paper_dir) / f"table{table}.csv"
    if not path.exists():
        return pd.DataFrame(columns=["dataset", "variant", "paper"])
    wide = pd.read_csv(path)
    return wide.melt(id_vars="dataset", var_name="variant", value_name="paper")


def select_comparable(completed: pd.DataFrame,
                      keys: tuple[str, ...] = ("dataset", "variant", "sac")) -> pd.DataFrame:
    """Keep, per cell (``keys``), the runs of one config: the one with most runs."""
    if completed.empty:
        return completed
    keep = []
    for cell, group in completed.groupby(list(keys), sort=False):
        counts = group.groupby("config_key").agg(n=("seed", "size"), last=("finished", "max"))
        best = counts.sort_values(["n", "last"], ascending=False).index[0]
        if len(counts) > 1:
            where = "/".join(f"{k}={v}" if k == "sac" else str(v)
                             for k, v in zip(keys, cell, strict=True))
            others = ", ".join(f"{k} ({r.n} runs)" for k, r in counts.drop(best).iterrows())
            warnings.warn(
                f"{where}: runs of {len(counts)} different configs; the table "
                f"uses config {best} ({counts.loc[best, 'n']} runs) and leaves out {others} "
                "(see runs.csv)", stacklevel=2)
        keep.append(group[group.config_key == best])
    return pd.concat(keep)


# ---------------------------------------------------------------------------- tables


def _order(values: list[str], first: list[str]) -> list[str]:
    return [v for v in first if v in values] + sorted(v for v in values if v not in first)


def build_table(runs: pd.DataFrame, paper: pd.DataFrame, sac: bool) -> pd.DataFrame:
    """Tidy table for SAC off (Table 1) or on (Table 2); rows for every paper cell too."""
    done = select_comparable(runs[(runs.status == "completed") & (runs.sac == sac)])
    stats = (done.groupby(["dataset", "variant"])["test_acc"]
             .agg(n="size", mean="mean", std="std", min="min", max="max").reset_index())
    cells = pd.concat([stats[["dataset", "variant"]], paper[["dataset", "variant"]]])
    cells = cells.drop_duplicates()
    table = cells.merge(stats, how="left", on=["dataset", "variant"]).merge(
        paper, how="left", on=["dataset", "variant"])
    table["n"] = table["n"].fillna(0).astype(int)
    table["delta"] = table["mean"] - table["paper"]
    ds_order = _order(table.dataset.unique().tolist(), PAPER_DATASETS)
    var_order = _order(table.variant.unique().tolist(), VARIANTS)
    table["_d"] = table.dataset.map(ds_order.index)
    table["_v"] = table.variant.map(var_order.index)
    table = table.sort_values(["_d", "_v"]).drop(columns=["_d", "_v"]).reset_index(drop=True)
    return table[TABLE_COLUMNS]


def significance(runs: pd.DataFrame, sac: bool) -> pd.DataFrame:
    """Each variant against AvgPool on the same dataset and seeds: paired differences."""
    from scipy import stats

    done = select_comparable(runs[(runs.status == "completed") & (runs.sac == sac)])
    rows = []
    for ds, group in done.groupby("dataset", sort=False):
        base = group[group.variant == "avg"].set_index("seed")["test_acc"]
        for var in _order(group.variant.unique().tolist(), VARIANTS):
            if var == "avg":
                continue
            other = group[group.variant == var].set_index("seed")["test_acc"]
            seeds = sorted(set(base.index) & set(other.index))
            diff = (other.loc[seeds] - base.loc[seeds]).to_numpy()
            n = len(diff)
            row = {"dataset": ds, "variant": var, "n_pairs": n,
                   "mean_diff": diff.mean() if n else math.nan,
                   "ci95_low": math.nan, "ci95_high": math.nan, "p_value": math.nan}
            if n >= 2:
                sd = diff.std(ddof=1)
                half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
                row["ci95_low"], row["ci95_high"] = diff.mean() - half, diff.mean() + half
                if sd > 1e-4:  # equal differences (in %): no t statistic, p stays blank
                    row["p_value"] = float(stats.ttest_rel(other.loc[seeds], base.loc[seeds])
                                           .pvalue)
            rows.append(row)
    cols = ["dataset", "variant", "n_pairs", "mean_diff", "ci95_low", "ci95_high", "p_value"]
    table = pd.DataFrame(rows, columns=cols)
    table["significant"] = table.p_value < 0.05
    return table


def _fmt(x: float, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def to_markdown(table: pd.DataFrame, sig: pd.DataFrame, title: str) -> str:
    """The paper's layout: datasets as rows, variants as columns, ``mean ± std (n)``."""
    variants = _order(table.variant.unique().tolist(), VARIANTS)
    datasets = _order(table.dataset.unique().tolist(), PAPER_DATASETS)
    lines = [f"## {title}", "",
             "Top-1 test accuracy (%), mean ± std over seeds (n runs); *paper* is the "
             "published number; — means no completed run.", "",
             "| dataset | " + " | ".join(LABELS.get(v, v) for v in variants) + " |",
             "|---|" + "---|" * len(variants)]
    cells = table.set_index(["dataset", "variant"])
    for ds in datasets:
        row = [LABELS.get(ds, ds)]
        for var in variants:
            if (ds, var) not in cells.index:
                row.append("")
                continue
            r = cells.loc[(ds, var)]
            n = int(r.n)
            if n == 0:
                text = "—"
            elif n == 1:
                text = f"{r['mean']:.2f} (1)"
            else:
                text = f"{r['mean']:.2f} ± {r['std']:.2f} ({n})"
            if not math.isnan(r.paper):
                text += f" *paper {r.paper:.2f}*"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    if not sig.empty:
        lines += ["", "### Against AvgPool (paired by seed)", "",
                  "| dataset | variant | pairs | mean diff | 95% CI | p (paired t) |",
                  "|---|---|---|---|---|---|"]
        for _, s in sig.iterrows():
            ci = (f"[{_fmt(s.ci95_low)}, {_fmt(s.ci95_high)}]"
                  if not math.isnan(s.ci95_low) else "")
            mark = " *" if s.significant else ""
            ds, var = LABELS.get(s.dataset, s.dataset), LABELS.get(s.variant, s.variant)
            lines.append(f"| {ds} | {var} | {int(s.n_pairs)} | {_fmt(s.mean_diff)} | {ci} | "
                         f"{_fmt(s.p_value, 3)}{mark} |")
        lines += ["", "\\* p < 0.05. With 3 seeds only large, consistent gains are significant."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- table 3


def related_runs(runs: pd.DataFrame) -> pd.Series:
    """Mask of the runs of the related pools: a non-paper global pool or a pooled downsample."""
    return ~runs.variant.isin(VARIANTS) | (runs.downsample != "stride")


def build_pools_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 3: one row per dataset x SAC x (pool, downsample), where related runs exist.

    ``n, mean, std, min, max`` of the top-1 accuracy over the completed runs of one config
    (cells whose runs all failed stay, with ``n = 0``); ``params`` is the model's
    parameter count, ``extra_params`` its excess over AvgPool + stride on the same
    dataset and SAC setting (blank without that baseline), ``step_ms`` the mean training
    step time ``1000 * batch_size / images_per_s`` (on each run's own device).
    """
    keys = ["dataset", "sac", "variant", "downsample"]
    scope = runs[related_runs(runs)][["dataset", "sac"]].drop_duplicates()
    runs = runs.merge(scope, on=["dataset", "sac"])
    done = select_comparable(runs[runs.status == "completed"], tuple(keys))
    done = done.assign(step_ms=1000.0 * done.batch_size / done.images_per_s)
    stats = (done.groupby(keys)
             .agg(n=("test_acc", "size"), mean=("test_acc", "mean"), std=("test_acc", "std"),
                  min=("test_acc", "min"), max=("test_acc", "max"),
                  params=("num_params", "mean"), step_ms=("step_ms", "mean"))
             .reset_index())
    table = runs[keys].drop_duplicates().merge(stats, how="left", on=keys)
    table["n"] = table["n"].fillna(0).astype(int)
    base = table[(table.variant == "avg") & (table.downsample == "stride")]
    base = base[["dataset", "sac", "params"]].rename(columns={"params": "base_params"})
    table = table.merge(base, how="left", on=["dataset", "sac"])
    table["extra_params"] = table["params"] - table["base_params"]
    ds_order = _order(table.dataset.unique().tolist(), PAPER_DATASETS)
    pool_order = _order(table.variant.unique().tolist(), POOL_ORDER)
    down_order = _order(table.downsample.unique().tolist(), DOWNSAMPLES)
    table = table.assign(_d=table.dataset.map(ds_order.index),
                         _p=table.variant.map(pool_order.index),
                         _l=table.downsample.map(down_order.index))
    table = table.sort_values(["_d", "sac", "_l", "_p"]).reset_index(drop=True)
    return table.rename(columns={"variant": "pool"})[POOLS_COLUMNS]


def pools_markdown(table: pd.DataFrame) -> str:
    """Table 3 as Markdown: one line per dataset x SAC x (global pool, downsampling)."""
    lines = ["## Table 3: related pools (global pool x local downsampling, PAPER.md sec. 5)", "",
             "Top-1 test accuracy (%), mean ± std over seeds (n runs); — means no completed "
             "run. *params*: trainable parameters; *extra*: over AvgPool + stride conv on the "
             "same dataset; *step*: mean training step (ms) of the runs, on their own device "
             "and batch size.", "",
             "| dataset | SAC | global pool | downsampling | top-1 | min | max | params | "
             "extra | step (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        if r.n == 0:
            acc = "—"
        elif r.n == 1:
            acc = f"{r['mean']:.2f} (1)"
        else:
            acc = f"{r['mean']:.2f} ± {r['std']:.2f} ({r.n})"
        params = "" if math.isnan(r.params) else f"{r.params:,.0f}"
        extra = "" if math.isnan(r.extra_params) else f"{r.extra_params:+,.0f}"
        lines.append(
            f"| {LABELS.get(r.dataset, r.dataset)} | {'on' if r.sac else 'off'} | "
            f"{LABELS.get(r.pool, r.pool)} | {DOWNSAMPLE_LABELS.get(r.downsample, r.downsample)}"
            f" | {acc} | {_fmt(r['min'])} | {_fmt(r['max'])} | {params} | {extra} | "
            f"{_fmt(r.step_ms, 1)} |")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, title: str, path: Path) -> None:
    """Grouped bars per dataset (mean ± std), paper numbers as black markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = _order(table.dataset.unique().tolist(), PAPER_DATASETS)
    variants = _order(table.variant.unique().tolist(), VARIANTS)
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datasets), 4.2))
    cells = table.set_index(["dataset", "variant"])
    for j, var in enumerate(variants):
        xs, means, stds, paper_x, paper_y = [], [], [], [], []
        for i, ds in enumerate(datasets):
            if (ds, var) not in cells.index:
                continue
            r = cells.loc[(ds, var)]
            x = i + (j - (len(variants) - 1) / 2) * width
            if r.n > 0:
                xs.append(x)
                means.append(r["mean"])
                stds.append(0.0 if math.isnan(r["std"]) else r["std"])
            if not math.isnan(r.paper):
                paper_x.append(x)
                paper_y.append(r.paper)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=LABELS.get(var, var))
        ax.plot(paper_x, paper_y, "k_", markersize=10, mew=2,
                label="paper" if j == 0 and paper_x else None)
    ax.set_xticks(range(len(datasets)), [LABELS.get(d, d) for d in datasets])
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.set_title(title)
    values = [v for v in list(table["mean"]) + list(table["paper"]) if not math.isnan(v)]
    if values:
        ax.set_ylim(max(0.0, min(values) - 10), min(100.0, max(values) + 5))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------- entry


def _write(path: Path, text: str) -> None:
    from flexexp.files import atomic_write_text

    atomic_write_text(path, text)


def report(runs_dir: str | Path, out_dir: str | Path,
           paper_dir: str | Path = DEFAULT_PAPER_DIR) -> dict[str, pd.DataFrame]:
    """Write every table and figure; return the tidy tables by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(runs_dir)
    tables: dict[str, pd.DataFrame] = {}
    # the paper's tables compare pools on ResNet20's own (strided) downsampling only
    paper_runs = runs[runs.downsample == "stride"]
    for num, sac, title in ((1, False, "Table 1: single classifier"),
                            (2, True, "Table 2: with SAC")):
        table = build_table(paper_runs, load_paper(paper_dir, num), sac)
        sig = significance(paper_runs, sac)
        _write(out / f"table{num}.csv", table.to_csv(index=False, float_format="%.4f"))
        _write(out / f"significance{num}.csv", sig.to_csv(index=False, float_format="%.4f"))
        _write(out / f"table{num}.md", to_markdown(table, sig, title))
        plot(table, title, out / f"figure{num}.png")
        tables[f"table{num}"], tables[f"significance{num}"] = table, sig
    if related_runs(runs).any():
        pools = build_pools_table(runs)
        _write(out / "table3.csv", pools.to_csv(index=False, float_format="%.4f"))
        _write(out / "table3.md", pools_markdown(pools))
        tables["table3"] = pools
    _write(out / "runs.csv", runs.drop(columns=["finished"]).to_csv(index=False))
    failed = runs[runs.status != "completed"]
    _write(out / "failed.csv", failed[["dataset", "variant", "sac", "seed", "status", "error",
                                       "run_dir"]].to_csv(index=False))
    tables["runs"], tables["failed"] = runs, failed
    return tables


USAGE = """usage: python -m flexexp.report [paths.runs=DIR] [out_dir=DIR] [paper_dir=DIR]

Rebuild Tables 1 and 2 from every result.json under paths.runs (default runs/) into
out_dir (default results/), and Table 3 when there are runs of the related pools (pool=max,
gfgp or flex_softmax, or model.downsample other than stride). paper_dir holds the paper's
table1.csv and table2.csv (default: flexexp/paper/, the published numbers)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = parse_options(argv, {"paths.runs": "runs", "out_dir": "results",
                                "paper_dir": str(DEFAULT_PAPER_DIR)}, USAGE)
    if isinstance(opts, int):
        return opts
    runs_dir = Path(opts["paths.runs"])
    if not runs_dir.is_dir():
        print(f"error: no runs directory {runs_dir}: train first (python -m flexexp.train ...) "
              "or point paths.runs=DIR at the runs root.", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tables = report(runs_dir, opts["out_dir"], opts["paper_dir"])
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    out = Path(opts["out_dir"])
    runs, failed = tables["runs"], tables["failed"]
    print(f"{len(runs)} runs read from {runs_dir} ({len(failed)} not completed)\n")
    for num in (1, 2, 3):
        if f"table{num}" in tables:
            print((out / f"table{num}.md").read_text())
    if len(failed):
        print("Runs that did not complete (not averaged):")
        for _, r in failed.iterrows():
            print(f"  {r.run_dir}: {r.status} {r.error}")
    table3 = ", table3.{csv,md}" if "table3" in tables else ""
    print(f"\nwrote {out}/table{{1,2}}.{{csv,md}}, significance{{1,2}}.csv, figure{{1,2}}.png"
          f"{table3}, runs.csv, failed.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
