"""Rebuild the paper's Tables 1 and 2 (and Table 3, related pools) from run records.

``python -m flexexp.report``

Reads every ``result.json`` under ``paths.runs`` and writes to ``out_dir``:

- ``table1.csv`` / ``table2.csv``: one row per (dataset, variant) with
  ``dataset, variant, n, mean, std, min, max, paper, delta`` (SAC off / on);
- ``table1.md`` / ``table2.md``: datasets as rows, variants as columns,
  ``mean ± std (n)`` beside the paper's number, then the significance table;
- ``significance1.csv`` / ``significance2.csv``: each FlexPool variant against AvgPool on
  the same dataset and seeds (paired t-test and 95% t-interval of the mean difference,
  then a 95% bootstrap interval of it and the probability of improvement: see
  :mod:`flexexp.pairstats`);
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
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from flexexp import pairstats
from flexexp.cli import parse_options
from flexexp.errors import ReportError
from flexexp.files import atomic_write_text, diff_keys

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


def _run_config(rec: dict[str, Any]) -> dict[str, Any]:
    """The run's config without the seed, with the settings that ran: runs with equal
    configs may be averaged."""
    from flexexp.config import cell_config  # omegaconf only: no torch, no Hydra runtime

    cfg = cell_config(rec.get("config") or {})  # the run's identity, as its run dir uses
    cfg.pop("seed", None)
    trainer = cfg.get("trainer")
    if isinstance(trainer, dict):  # `auto` is bf16 on a GPU, fp32 on a CPU: key on what ran
        trainer.update({k: rec[k] for k in ("precision", "channels_last", "compile") if k in rec})
    if not cfg:  # no config in the record: fall back to what the record says
        cfg = {k: rec.get(k) for k in ("dataset", "pool", "sac", "epochs")}
    return cfg


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def _config_key(rec: dict[str, Any]) -> str:
    """Hash of the run's config without the seed: runs with equal keys may be averaged."""
    return _hash(_run_config(rec))


def _downsample(rec: dict[str, Any]) -> str:
    """``config.model.downsample`` of a record; ``stride`` where the record predates it."""
    model = (rec.get("config") or {}).get("model") or {}
    return str(model.get("downsample") or "stride")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float:
    return float(value) if _is_real(value) else math.nan


def _problem(rec: Any) -> str | None:
    """What makes a record unusable (the key, its value and what it should be), or None."""
    if not isinstance(rec, dict):
        return f"not a JSON object but a JSON {type(rec).__name__}"
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        return f"missing keys {missing}"
    for key in ("dataset", "pool", "status"):
        if not isinstance(rec[key], str) or not rec[key]:
            return f"{key} is {rec[key]!r}, not a name (a non-empty string)"
    if not isinstance(rec["sac"], bool):
        return f"sac is {rec['sac']!r}, not true or false"
    if not _is_int(rec["seed"]):
        return f"seed is {rec['seed']!r}, not an integer"
    epochs = rec.get("epochs")
    if epochs is not None and not (_is_int(epochs) and epochs > 0):
        return f"epochs is {epochs!r}, not a positive integer"
    if not isinstance(rec.get("config", {}), dict | None):
        return f"config is {rec['config']!r}, not a JSON object"
    if rec["status"] == "completed":
        cfg = rec.get("config")
        if not cfg:
            return "completed but has no config: nothing says what produced it"
        want = (cfg.get("trainer") or {}).get("epochs") if isinstance(cfg, dict) else None
        if epochs is not None and want is not None and epochs != want:
            return f"epochs is {epochs!r} but its config says trainer.epochs={want!r}"
        history = rec.get("history")
        if isinstance(history, list) and epochs is not None and len(history) != epochs:
            return f"completed after {epochs} epochs but its history has {len(history)}"
    acc = rec.get("test_acc")
    if acc is None:
        return "status is completed but test_acc is missing" if rec["status"] == "completed" \
            else None
    if not _is_real(acc) or not 0 <= acc <= 100:
        return f"test_acc is {acc!r}, not an accuracy in [0, 100] (%)"
    return None


def _read_record(path: Path) -> dict[str, Any]:
    """The record in ``path``; ValueError naming what is wrong with it."""
    if path.is_dir():
        raise ValueError("a folder named result.json, not a record")
    try:
        text = path.read_bytes().decode("utf-8")
    except PermissionError as exc:
        raise ValueError(f"not readable by this user ({exc.strerror}); fix its permissions "
                         "(chmod a+r) to include it") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start}), so not a "
                         "record flexexp wrote") from None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    try:
        rec = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    problem = _problem(rec)
    if problem is None:
        try:
            rec["_config"] = _run_config(rec)
        except (ValueError, TypeError, AttributeError) as exc:
            problem = f"its config cannot be read ({exc})"
    if problem is not None:
        raise ValueError(problem)
    return rec


#: The training recipe a run followed, by its ``model.block``: the paper's text (He et al.'s
#: block) or the authors' public code (``experiment=authors_code``).
RECIPES = {"he": "the paper's", "authors": "the authors' code"}


def _recipe(rec: dict[str, Any]) -> str:
    model = (rec.get("config") or {}).get("model") or {}
    block = model.get("block") or "he"  # a record that predates model.block: He et al.'s
    return RECIPES.get(block, f"model.block={block}")


RUN_COLUMNS = ["recipe", "dataset", "variant", "sac", "seed", "status", "test_acc", "epochs",
               "downsample", "num_params", "images_per_s", "batch_size", "config_key",
               "compare_key", "compare_config", "error", "run_dir", "finished"]


def _row(path: Path, rec: dict[str, Any]) -> dict[str, Any]:
    cfg = rec.pop("_config")
    compare = {k: v for k, v in cfg.items() if k != "pool"}  # all but the variant and seed
    model = compare.get("model")
    if isinstance(model, dict):  # a record without model.downsample predates it: stride
        compare["model"] = {**model, "downsample": model.get("downsample") or "stride"}
    return {
        "recipe": _recipe(rec),
        "dataset": rec["dataset"], "variant": rec["pool"], "sac": rec["sac"],
        "seed": rec["seed"], "status": rec["status"], "test_acc": _number(rec.get("test_acc")),
        "epochs": rec.get("epochs"), "downsample": _downsample(rec),
        "num_params": _number(rec.get("num_params")),
        "images_per_s": _number(rec.get("images_per_s")),
        "batch_size": _number(((rec.get("config") or {}).get("trainer") or {})
                              .get("batch_size")),
        "config_key": _hash(cfg), "compare_key": _hash(compare),
        "compare_config": json.dumps(compare, sort_keys=True),
        "error": str(rec.get("error") or ""), "run_dir": str(path.parent),
        "finished": path.stat().st_mtime,
    }


def load_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per usable ``result.json`` under ``runs_dir``; files that cannot be read and
    records with a value outside its meaning are skipped with a warning naming each one."""
    rows = []
    for path in sorted(Path(runs_dir).rglob("result.json")):
        try:
            rows.append(_row(path, _read_record(path)))
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping {path}: {exc}", stacklevel=2)
    return _one_per_seed(pd.DataFrame(rows, columns=RUN_COLUMNS))


def _one_per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """One completed record per config and seed: a copied run folder is the same run, not
    another sample (counting it twice would shrink the spread and fake significance)."""
    done = runs[runs.status == "completed"]
    dup = done.duplicated(["dataset", "variant", "sac", "seed", "config_key"], keep=False)
    if not dup.any():
        return runs
    drop = []
    for _, group in done[dup].groupby(["dataset", "variant", "sac", "seed", "config_key"]):
        keep = group.finished.idxmax()
        drop += [i for i in group.index if i != keep]
        warnings.warn(f"{len(group)} records of the same run (config {group.config_key.iloc[0]}, "
                      f"seed {group.seed.iloc[0]}): {', '.join(group.run_dir)}; counted once "
                      f"(the newest, {group.run_dir[keep]}). Delete the copies.", stacklevel=3)
    return runs.drop(index=drop)


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
            others = ", ".join(f"{k} ({int(r.n)} runs)" for k, r in counts.drop(best).iterrows())
            warnings.warn(
                f"{where}: runs of {len(counts)} different configs; the table "
                f"uses config {best} ({counts.loc[best, 'n']} runs) and leaves out {others} "
                "(see runs.csv)", stacklevel=2)
        keep.append(group[group.config_key == best])
    return pd.concat(keep)


def differences(done: pd.DataFrame, reference: str | None = None
                ) -> dict[tuple[str, str], list[str]]:
    """Per (dataset, variant) of ``done`` (one config per cell, see
    :func:`select_comparable`): the dotted config keys, other than the pool section and the
    seed, in which its runs differ from ``reference``'s on the same dataset (default: AvgPool,
    else the first variant); an empty list where they are comparable."""
    out: dict[tuple[str, str], list[str]] = {}
    for ds, group in done.groupby("dataset", sort=False):
        configs = group.groupby("variant", sort=False)["compare_config"].first()
        ref = reference or _order(list(configs.index), VARIANTS)[0]
        if ref not in configs.index:
            continue
        base = json.loads(configs[ref])
        for var, text in configs.items():
            out[(ds, var)] = diff_keys(json.loads(text), base)
    return out


def _warn_incomparable(done: pd.DataFrame, sac: bool) -> None:
    for (ds, var), keys in differences(done).items():
        if keys:
            ref = _order(done[done.dataset == ds].variant.unique().tolist(), VARIANTS)[0]
            warnings.warn(
                f"{ds}/{var}/sac={sac}: its runs differ from {ref}'s in {', '.join(keys)}, not "
                f"only in the pool and the seed: the table shows them side by side but they "
                f"are not comparable and are not paired (run both with the same settings)",
                stacklevel=3)


# ---------------------------------------------------------------------------- tables


def _order(values: list[str], first: list[str]) -> list[str]:
    return [v for v in first if v in values] + sorted(v for v in values if v not in first)


def build_table(runs: pd.DataFrame, paper: pd.DataFrame, sac: bool) -> pd.DataFrame:
    """Tidy table for SAC off (Table 1) or on (Table 2); rows for every paper cell too."""
    done = select_comparable(runs[(runs.status == "completed") & (runs.sac == sac)])
    _warn_incomparable(done, sac)
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


SIG_COLUMNS = ["dataset", "variant", "n_pairs", "mean_diff", "ci95_low", "ci95_high", "p_value",
               "significant", "note", *pairstats.BOOT_COLUMNS]


def _paired(ds: str, var: str, base: pd.Series, other: pd.Series) -> dict[str, Any]:
    """The paired differences of ``other`` over ``base`` on their common seeds."""
    from scipy import stats

    seeds = sorted(set(base.index) & set(other.index))
    diff = (other.loc[seeds] - base.loc[seeds]).to_numpy()
    n = len(diff)
    row = {"dataset": ds, "variant": var, "n_pairs": n,
           "mean_diff": diff.mean() if n else math.nan,
           "ci95_low": math.nan, "ci95_high": math.nan, "p_value": math.nan, "note": ""}
    if n >= 2:
        sd = diff.std(ddof=1)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        row["ci95_low"], row["ci95_high"] = diff.mean() - half, diff.mean() + half
        if sd > 1e-4:  # equal differences (in %): no t statistic, p stays blank
            row["p_value"] = float(stats.ttest_rel(other.loc[seeds], base.loc[seeds]).pvalue)
    return {**row, **pairstats.paired_extras(base, other)}


def significance(runs: pd.DataFrame, sac: bool) -> pd.DataFrame:
    """Each variant against AvgPool on the same dataset and seeds: paired differences.

    A variant whose runs differ from AvgPool's in more than the pool and the seed is not
    paired: its row has no numbers and a ``note`` naming the keys that differ."""
    done = select_comparable(runs[(runs.status == "completed") & (runs.sac == sac)])
    apart = differences(done, "avg")
    rows = []
    for ds, group in done.groupby("dataset", sort=False):
        base = group[group.variant == "avg"].set_index("seed")["test_acc"]
        for var in _order(group.variant.unique().tolist(), VARIANTS):
            if var == "avg":
                continue
            keys = apart.get((ds, var))
            if keys:
                rows.append({"dataset": ds, "variant": var, "n_pairs": 0, "mean_diff": math.nan,
                             "ci95_low": math.nan, "ci95_high": math.nan, "p_value": math.nan,
                             "note": f"not comparable: differs in {', '.join(keys)}",
                             **pairstats.EMPTY_EXTRAS})
                continue
            rows.append(_paired(ds, var, base, group[group.variant == var]
                                .set_index("seed")["test_acc"]))
    table = pd.DataFrame(rows, columns=SIG_COLUMNS)
    table["significant"] = table.p_value < 0.05
    table["note"] = table["note"].fillna("")
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
        lines += ["", *significance_markdown(sig)]
    return "\n".join(lines) + "\n"


def _interval(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"[{_fmt(low)}, {_fmt(high)}]"


def significance_markdown(sig: pd.DataFrame) -> list[str]:
    """The lines of the table against AvgPool (:func:`significance`), with what each
    statistic is under it."""
    lines = ["### Against AvgPool (paired by seed)", "",
             "| dataset | variant | pairs | mean diff | 95% CI | p (paired t) | note | "
             "bootstrap 95% | P(better) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, s in sig.iterrows():
        mark = " *" if s.significant else ""
        ds, var = LABELS.get(s.dataset, s.dataset), LABELS.get(s.variant, s.variant)
        lines.append(f"| {ds} | {var} | {int(s.n_pairs)} | {_fmt(s.mean_diff)} | "
                     f"{_interval(s.ci95_low, s.ci95_high)} | {_fmt(s.p_value, 3)}{mark} | "
                     f"{s.note} | {_interval(s.boot_lo, s.boot_hi)} | "
                     f"{_fmt(s.prob_improvement)} |")
    return [*lines, "", "\\* p < 0.05. With 3 seeds only large, consistent gains are significant.",
            "", *pairstats.legend("the variant", "AvgPool")]


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
    try:
        fig.savefig(path, dpi=120)  # into the report's temporary folder: see write_outputs
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- entry


#: What one output file holds: its text, or a function that writes it to a path.
Output = str | Callable[[Path], None]


def _cannot_write(out: Path, exc: OSError) -> ReportError:
    why = exc.strerror or str(exc)
    if exc.errno == 28:  # ENOSPC
        fix = "free space on that disk or choose out_dir=DIR on another"
    elif isinstance(exc, PermissionError) or exc.errno == 30:  # EROFS
        fix = "make the folder writable or choose out_dir=DIR elsewhere"
    else:
        fix = "fix the cause or choose another out_dir=DIR"
    where = f" at {exc.filename}" if exc.filename else ""
    return ReportError(f"cannot write the report into {out} ({why}{where}): {fix}; the "
                       "previous tables there are unchanged.")


def write_outputs(out: Path, files: dict[str, Output]) -> None:
    """Write ``files`` into ``out`` as a set: each into a temporary folder inside ``out``
    first, then, once all are written, each renamed into place. Any failure (a full disk)
    removes the temporary folder and leaves the old files untouched; ReportError says so."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"out_dir={out} is a file, not a folder: choose another out_dir=DIR "
                          "(or move the file away); nothing was written.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".report-tmp-{os.getpid()}-", dir=out))
    except OSError as exc:
        raise _cannot_write(out, exc) from None
    try:
        for name, content in files.items():
            if isinstance(content, str):
                atomic_write_text(tmp / name, content)
            else:
                content(tmp / name)
        blocked = [name for name in files if (out / name).is_dir()]
        if blocked:  # checked before the first rename: a rename cannot fail half-way then
            raise IsADirectoryError(21, "a folder has the name of an output", str(out / blocked[0]))
        for name in files:
            os.replace(tmp / name, out / name)
    except OSError as exc:
        raise _cannot_write(out, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _csv(df: pd.DataFrame, **kwargs: Any) -> str:
    return df.to_csv(index=False, **kwargs)


def report(runs_dir: str | Path, out_dir: str | Path,
           paper_dir: str | Path = DEFAULT_PAPER_DIR) -> dict[str, pd.DataFrame]:
    """Write every table and figure (all or none: :func:`write_outputs`); return the tidy
    tables by name."""
    runs = load_runs(runs_dir)
    tables: dict[str, pd.DataFrame] = {}
    files: dict[str, Output] = {}
    # the paper's tables compare pools on ResNet20's own (strided) downsampling only
    paper_runs = runs[runs.downsample == "stride"]
    recipes = sorted(set(paper_runs[paper_runs.status == "completed"].recipe))
    if len(recipes) > 1:
        warnings.warn(f"runs of {len(recipes)} recipes under one root ({'; '.join(recipes)}): "
                      "they are never averaged together, but report each from its own root "
                      "(experiment=authors_code runs into runs/authors-code)", stacklevel=2)
    where = f" (recipe: {', '.join(recipes) or 'none yet'})"
    for num, sac, title in ((1, False, "Table 1: single classifier" + where),
                            (2, True, "Table 2: with SAC" + where)):
        table = build_table(paper_runs, load_paper(paper_dir, num), sac)
        sig = significance(paper_runs, sac)
        files[f"table{num}.csv"] = _csv(table, float_format="%.4f")
        files[f"significance{num}.csv"] = _csv(sig, float_format="%.4f")
        files[f"table{num}.md"] = to_markdown(table, sig, title)
        files[f"figure{num}.png"] = lambda path, t=table, h=title: plot(t, h, path)
        tables[f"table{num}"], tables[f"significance{num}"] = table, sig
    from flexexp.claims import build_claims, claims_markdown

    done = select_comparable(paper_runs[paper_runs.status == "completed"])
    claims = build_claims(done, {False: load_paper(paper_dir, 1), True: load_paper(paper_dir, 2)})
    files["claims.csv"] = _csv(claims, float_format="%.4f")
    files["claims.md"] = claims_markdown(claims)
    tables["claims"] = claims
    if related_runs(runs).any():
        pools = build_pools_table(runs)
        files["table3.csv"] = _csv(pools, float_format="%.4f")
        files["table3.md"] = pools_markdown(pools)
        tables["table3"] = pools
    files["runs.csv"] = _csv(runs.drop(columns=["finished", "compare_config"]))
    failed = runs[runs.status != "completed"]
    files["failed.csv"] = _csv(failed[["dataset", "variant", "sac", "seed", "status", "error",
                                       "run_dir"]])
    write_outputs(Path(out_dir), files)
    tables["runs"], tables["failed"] = runs, failed
    return tables


USAGE = """usage: python -m flexexp.report [paths.runs=DIR] [out_dir=DIR] [paper_dir=DIR]

Rebuild Tables 1 and 2 from every result.json under paths.runs (default runs/) into
out_dir (default results/), and Table 3 when there are runs of the related pools (pool=max,
gfgp or flex_softmax, or model.downsample other than stride). paper_dir holds the paper's
table1.csv and table2.csv (default: flexexp/paper/, the published numbers).

python -m flexexp.report --status [experiment=NAME] [paths.runs=DIR] [overrides]: the
sweep's cells as completed, running, failed, interrupted or missing, and an ETA."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--status" in argv:  # where a sweep stands (flexexp/status.py composes its grid)
        from flexexp.status import main as status_main

        return status_main([a for a in argv if a != "--status"])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = parse_options(argv, {"paths.runs": "runs", "out_dir": "results",
                                "paper_dir": str(DEFAULT_PAPER_DIR)}, USAGE)
    if isinstance(opts, int):
        return opts
    runs_dir = Path(opts["paths.runs"])
    if runs_dir.exists() and not runs_dir.is_dir():
        print(f"error: paths.runs={runs_dir} is a file, not a folder: point paths.runs=DIR at "
              "the folder that holds the runs (the trainer's paths.runs, default runs/).",
              file=sys.stderr)
        return 2
    if not runs_dir.is_dir():
        print(f"error: no runs directory {runs_dir}: train first (python -m flexexp.train ...) "
              "or point paths.runs=DIR at the runs root.", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tables = report(runs_dir, opts["out_dir"], opts["paper_dir"])
        except ReportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
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
    print((out / "claims.md").read_text())
    table3 = ", table3.{csv,md}" if "table3" in tables else ""
    print(f"\nwrote {out}/table{{1,2}}.{{csv,md}}, significance{{1,2}}.csv, figure{{1,2}}.png"
          f"{table3}, claims.{{csv,md}}, runs.csv, failed.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
