"""Hyper-parameter search on the validation split: ``python -m flexexp.tune [overrides]``.

The overrides compose the config as for ``flexexp.train`` (e.g. ``experiment=tune_reg``);
its ``tune`` section (conf/config.yaml; a runtime key, never part of a cell) says what
to search and how long:

- ``tune.params``: a tree of config keys, each ``{type: float|int, low, high, log, step}``,
  ``{type: categorical, choices}`` (a config group too: ``pool: {type: categorical,
  choices: [flex, flex_reg]}``) or, for ``sac.weights`` only, ``{type: sac_weights,
  low, high}``: three weights ``l1 < l2 < l3`` that sum to 1, drawn as the ratios
  ``l1/l2`` and ``l2/l3`` in ``[low, high]`` (``high < 1``), so the paper's order holds
  by construction. A key also given as an override is fixed there and not searched.
- ``tune.metric`` (a validation metric of the run record: ``val_acc`` or ``val_loss``)
  and ``tune.direction``; tuning needs ``dataset.val_fraction > 0`` and never reads a
  test accuracy.
- ``tune.study``, ``tune.n_trials`` (trials COMPLETE in total), ``tune.sampler`` (tpe or
  random) and ``tune.seed``, ``tune.max_failed`` (failed trials before a run gives up).

A trial is a cell: its sampled overrides compose the config and :func:`flexexp.trainer.run`
trains it in its usual run directory ``<paths.runs>/<cell_name>``, so a cell that already
completed is read, not trained again, and ``python -m flexexp.train`` with the same
overrides finds it there. The Optuna study lives in SQLite, ``<paths.runs>/tune/<study>.db``
(one process at a time: ``<study>.db.lock``). A trial stopped by Ctrl-C, SIGTERM or a kill
is marked failed and its parameters are queued again, so the next run of the same command
resumes that cell from its checkpoint; the study goes on until ``n_trials`` are complete.
A cell that fails (diverges) fails its trial, not the study.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexexp import signals
from flexexp.config import (
    GROUPS,
    RUNTIME_KEYS,
    cell_config,
    check_overrides,
    check_runs_root,
    compose_config,
    group_options,
    register_configs,
    validate,
)
from flexexp.errors import ConfigError, FlexexpError
from flexexp.files import diff_keys, flat_keys

log = logging.getLogger(__name__)

__all__ = ["main", "Param", "Plan", "plan", "run_study", "overrides_for", "sac_weights"]

USAGE = """\
usage: python -m flexexp.tune [overrides]

Search hyper-parameters on the validation split (dataset.val_fraction > 0) with Optuna,
one trial per cell of the grid, e.g.
  python -m flexexp.tune experiment=tune_reg tune.n_trials=30
The search space and the study's settings are the config's tune section (conf/config.yaml,
conf/experiment/tune_reg.yaml). The study is kept in <paths.runs>/tune/<tune.study>.db:
run the same command again to resume it. At the end it prints every trial and the
flexexp.train command line of the best one."""

TUNE_KEYS = ("study", "n_trials", "sampler", "seed", "metric", "direction", "max_failed",
             "params")
KINDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
         "categorical": {"choices"}, "sac_weights": {"low", "high"}}
SAMPLERS = ("tpe", "random")
#: The validation metrics of a run record a study may optimise, and their direction.
METRICS = {"val_acc": "maximize", "val_loss": "minimize"}
TEST_SPLIT = "tuning on the test split is not allowed"


@dataclass(frozen=True)
class Param:
    """One searched config key (``kind``: float, int, categorical or sac_weights)."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What a tune run does: the base overrides and config, the space, the study."""

    base: list[str]  # every override given, tune.* included: each trial composes with them
    command: list[str]  # the overrides that a train command line needs (no tune.*)
    cfg: DictConfig  # the base config
    space: list[Param]
    study: str
    db: Path
    n_trials: int
    metric: str
    direction: str
    sampler: str
    seed: int
    max_failed: int


# ---------------------------------------------------------------------------- the plan


def _is_tune(override: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "tune"


def plan(argv: list[str]) -> Plan:
    """Compose and check the base config and the ``tune`` section; a ConfigError (or
    Hydra's own error) names what is wrong."""
    check_overrides([a for a in argv if not _is_tune(a)])
    check_runs_root(argv)
    cfg = compose_config(argv)
    validate(cfg)
    t = OmegaConf.to_container(cfg.tune, resolve=True)
    unknown = sorted(set(t) - set(TUNE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key tune.{unknown[0]}; the tune section's keys are "
                          f"{', '.join(TUNE_KEYS)} (conf/config.yaml).")
    metric, study = str(t.get("metric")), str(t.get("study"))
    if metric.startswith("val_") and metric not in METRICS:
        raise ConfigError(f"tune.metric={metric} is not a metric of the run record: use "
                          f"{' or '.join(METRICS)} (tune.direction={METRICS['val_acc']} or "
                          f"{METRICS['val_loss']}).")
    if metric in METRICS and t.get("direction") in METRICS.values() \
            and t.get("direction") != METRICS[metric]:
        raise ConfigError(f"tune.direction={t.get('direction')} would pick the worst "
                          f"{metric}: use tune.direction={METRICS[metric]}.")
    if float(cfg.dataset.val_fraction) == 0 or not metric.startswith("val_"):
        why = (f"tune.metric={metric} is not a metric of the validation split"
               if not metric.startswith("val_") else
               "dataset.val_fraction=0 holds out no validation images")
        raise ConfigError(
            f"{TEST_SPLIT}: {why}, and a search that picks its winner by test accuracy "
            "reports a test accuracy that "
            "is biased upwards. Hold out part of the training images with dataset.val_fraction "
            "(e.g. dataset.val_fraction=0.1: stratified, seeded by dataset.data_seed, the same "
            "for every seed and variant) and optimise tune.metric=val_acc (or val_loss); the "
            "test accuracy of the chosen cell is then an honest estimate.")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", study) or study.startswith("."):
        raise ConfigError(f"tune.study={study!r} must be a plain name (letters, digits, _ . -): "
                          "it names the file <paths.runs>/tune/<study>.db.")
    _check_settings(t)
    space = _space(cfg, t.get("params") or {}, [a for a in argv if not _is_tune(a)])
    return Plan(list(argv), [a for a in argv if not _is_tune(a)], cfg, space, study,
                Path(cfg.paths.runs) / "tune" / f"{study}.db", int(t["n_trials"]), metric,
                str(t["direction"]), str(t["sampler"]), int(t["seed"]), int(t["max_failed"]))


def _check_settings(t: dict[str, Any]) -> None:
    for key in ("n_trials", "max_failed", "seed"):
        v = t.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1):
            raise ConfigError(f"tune.{key}={v!r} must be an integer >= "
                              f"{0 if key == 'seed' else 1}, e.g. tune.{key}=20.")
    if t.get("direction") not in ("maximize", "minimize"):
        raise ConfigError(f"tune.direction={t.get('direction')!r} must be maximize or minimize "
                          "(val_acc: maximize, val_loss: minimize).")
    if t.get("sampler") not in SAMPLERS:
        raise ConfigError(f"tune.sampler={t.get('sampler')!r} is unknown; use "
                          f"{' or '.join(SAMPLERS)}.")


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, spec)`` of every search range in the ``tune.params`` tree."""
    if not isinstance(node, dict):
        raise ConfigError(f"tune.params{'.' + prefix.rstrip('.') if prefix else ''}={node!r} "
                          "is not a search range: give {type: float|int|categorical|"
                          "sac_weights, ...} (flexexp/tune.py).")
    for k, v in node.items():
        if isinstance(v, dict) and "type" in v:
            yield f"{prefix}{k}", v
        else:
            yield from _flatten(v, f"{prefix}{k}.")


def _space(cfg: DictConfig, params: dict[str, Any], given: list[str]) -> list[Param]:
    """The searched keys, checked; a key that an override fixes is left out."""
    fixed = {a.lstrip("+~").split("=", 1)[0] for a in given}
    space = []
    for key, spec in _flatten(params):
        p = _param(cfg, key, spec)
        if key in fixed:
            log.info("tune: %s is fixed by the override %s=..., not searched", key, key)
            continue
        space.append(p)
    if not space:
        raise ConfigError("tune.params searches nothing: give it a range, e.g. "
                          "experiment=tune_reg (conf/experiment/tune_reg.yaml).")
    return space


def _param(cfg: DictConfig, key: str, spec: dict[str, Any]) -> Param:
    """One search range, checked against the config and the key's valid range."""
    where = f"tune.params.{key}"
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{where}.type={kind!r} is unknown; use {', '.join(KINDS)}.")
    extra = sorted(set(spec) - KINDS[kind] - {"type"})
    if extra:
        raise ConfigError(f"{where} has {', '.join(extra)}, which type {kind} does not take "
                          f"(it takes {', '.join(sorted(KINDS[kind]))}).")
    _check_key(cfg, key, kind, where)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices must be a non-empty list, e.g. [a, b].")
        if key in GROUPS and (bad := [c for c in choices if c not in group_options(key)]):
            raise ConfigError(f"{where}.choices names {bad[0]!r}, which is not an option of "
                              f"the group {key}; valid: {', '.join(group_options(key))}.")
        return Param(key, kind, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in (low, high)) or not low < high:
        raise ConfigError(f"{where}: low={low!r} and high={high!r} must be numbers with "
                          "low < high.")
    if kind == "sac_weights":
        return _sac_param(cfg, key, low, high, where)
    _check_scale(spec, kind, low, high, where)
    _check_range(key, (low, high), where)
    return Param(key, kind, low, high, bool(spec.get("log")), spec.get("step"))


def _check_scale(spec: dict[str, Any], kind: str, low: float, high: float, where: str) -> None:
    """``log`` and ``step`` as Optuna takes them, and whole bounds for an int range."""
    log, step = spec.get("log"), spec.get("step")
    if log is not None and not isinstance(log, bool):
        raise ConfigError(f"{where}.log={log!r} must be true or false.")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0 (low={low}).")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0 \
                or not math.isfinite(step):
            raise ConfigError(f"{where}.step={step!r} must be a number > 0, e.g. step: 0.05.")
        if log:
            raise ConfigError(f"{where}: a log range takes no step (Optuna samples log ranges "
                              "continuously): drop step or log.")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ConfigError(f"{where}: an int range needs whole low, high and step (low={low}, "
                          f"high={high}, step={step}).")


def _check_key(cfg: DictConfig, key: str, kind: str, where: str) -> None:
    """The key must be one a cell depends on, of the kind its range gives."""
    if key in GROUPS:
        if kind != "categorical":
            raise ConfigError(f"{where}: {key} is a config group: search it with "
                              "{type: categorical, choices: [...]}.")
        return
    if key == "sac.weights" and kind != "sac_weights":
        raise ConfigError(f"{where}: search sac.weights with {{type: sac_weights, low, high}}, "
                          "which keeps l1 < l2 < l3 (the paper's order) by construction.")
    runtime = [r for r in RUNTIME_KEYS if key == r or key.startswith(r + ".")]
    if runtime or key in ("dataset.val_fraction", "dataset.data_seed"):
        why = ("does not change what a cell computes" if runtime else
               "changes the validation split itself, so trials would not be comparable")
        raise ConfigError(f"{where}: {key} {why}; search another key.")
    if OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) == "<absent>":
        keys = list(flat_keys(OmegaConf.to_container(cfg, resolve=False)))
        close = difflib.get_close_matches(key, keys, n=1)
        raise ConfigError(f"{where}: the config has no key {key!r}."
                          f"{f' Did you mean {close[0]!r}?' if close else ''} See the keys "
                          "with `python -m flexexp.train --cfg job`.")


def _check_range(key: str, bounds: tuple[float, float], where: str) -> None:
    from flexexp.ranges import RANGES

    r = RANGES.get(key) or RANGES.get(f"{key}[]")
    for name, v in zip(("low", "high"), bounds, strict=True):
        if r is not None and not r.holds(v):
            raise ConfigError(f"{where}.{name}={v} is outside {key}'s range {r}"
                              f"{f' ({r.why})' if r.why else ''} (flexexp/ranges.py).")


def _sac_param(cfg: DictConfig, key: str, low: float, high: float, where: str) -> Param:
    if key != "sac.weights":
        raise ConfigError(f"{where}: type sac_weights is for the key sac.weights only.")
    if not cfg.sac.enabled:
        raise ConfigError(f"{where}: sac={cfg.sac.name} has no auxiliary heads, so their "
                          "weights change nothing: use sac=on.")
    if not 0 < low < high < 1:
        raise ConfigError(f"{where}: low={low} and high={high} bound the ratios l1/l2 and "
                          "l2/l3, which must satisfy 0 < low < high < 1 (l1 < l2 < l3).")
    return Param(key, "sac_weights", low, high)


# ---------------------------------------------------------------------------- sampling


def _number(v: float, digits: int = 4) -> str:
    """``v`` to ``digits`` significant digits, written as a float (``1.0``, not ``1``)."""
    text = f"{v:.{digits}g}"
    return text if any(c in text for c in ".en") else text + ".0"


def sac_weights(r12: float, r23: float) -> list[str]:
    """``[l1, l2, l3]`` with ``l1/l2 = r12``, ``l2/l3 = r23`` and ``l1 + l2 + l3 = 1``,
    written with as few digits (at least 4) as keep ``l1 < l2 < l3``."""
    l3 = 1.0 / (1.0 + r23 + r12 * r23)
    exact = [r12 * r23 * l3, r23 * l3, l3]
    for digits in range(4, 18):
        text = [_number(w, digits) for w in exact]
        values = [float(w) for w in text]
        if values[0] < values[1] < values[2]:
            return text
    raise ConfigError(f"the SAC weights {exact} are not increasing: lower "
                      "tune.params.sac.weights.high.")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return _number(v) if isinstance(v, float) else str(v)


def overrides_for(trial: Any, space: list[Param]) -> list[str]:
    """The trial's overrides (``key=value``), sampled from ``space`` (an Optuna trial)."""
    out = []
    for p in space:
        if p.kind == "categorical":
            out.append(f"{p.key}={_value(trial.suggest_categorical(p.key, list(p.choices)))}")
        elif p.kind == "float":
            v = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
            out.append(f"{p.key}={_number(v)}")
        elif p.kind == "int":
            v = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log,
                                  step=int(p.step or 1))
            out.append(f"{p.key}={v}")
        else:  # sac_weights
            r12 = trial.suggest_float(f"{p.key}:l1/l2", p.low, p.high)
            r23 = trial.suggest_float(f"{p.key}:l2/l3", p.low, p.high)
            out.append(f"{p.key}=[{','.join(sac_weights(r12, r23))}]")
    return out


# ---------------------------------------------------------------------------- the study


def _base_identity(p: Plan) -> dict[str, Any]:
    """The base cell without the searched keys: what every trial of the study shares."""
    data = cell_config(p.cfg)
    for param in p.space:
        *parents, leaf = param.key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return data


@contextlib.contextmanager
def _study_lock(db: Path) -> Iterator[None]:
    """One process per study: the RUNNING trials it finds are then orphans of a kill."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise FlexexpError(f"another process (pid {lock.read().strip() or '?'}) is running "
                               f"the study {db}; wait for it, or stop it first.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_study(p: Plan):
    """The study of ``p`` (created, or loaded and checked), its orphaned trials requeued."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{p.db.resolve()}"
    study = optuna.create_study(study_name=p.study, storage=storage, direction=p.direction,
                                load_if_exists=True)
    if study.direction.name.lower() != p.direction:
        raise ConfigError(f"the study {p.study} in {p.db} {study.direction.name.lower()}s; "
                          f"tune.direction={p.direction} would mix the two: use another "
                          "tune.study.")
    base = _base_identity(p)
    held = study.user_attrs.get("base")
    if held is None:
        study.set_user_attr("base", base)
        study.set_user_attr("metric", p.metric)
    elif held != json.loads(json.dumps(base)) or study.user_attrs.get("metric") != p.metric:
        diff = diff_keys(held, json.loads(json.dumps(base)))
        raise ConfigError(
            f"the study {p.study} in {p.db} searched another base config (differs in: "
            f"{', '.join(diff) or 'tune.metric'}): its trials would not compare with these. "
            "Use the same overrides to resume it, or another tune.study.")
    _requeue_orphans(study)
    cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    # a resumed study does not draw the first run's values again
    study.sampler = cls[p.sampler](seed=p.seed + len(study.trials))
    return study


def _requeue_orphans(study) -> None:
    """Trials left RUNNING by a killed process: failed, and their parameters queued again
    (the same cell then resumes from its checkpoint)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if t.params and not t.user_attrs.get("requeued"):
            log.info("tune: trial %d was stopped; its cell goes first", t.number)
            study.enqueue_trial(t.params, user_attrs={"resumes_trial": t.number})


def _complete(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def run_study(p: Plan):
    """Run trials until ``p.n_trials`` are complete; ``(study, error or None)``: the error
    when ``p.max_failed`` trials failed in this run."""
    with _study_lock(p.db):
        study = open_study(p)
        failed, last = 0, ""
        while _complete(study) < p.n_trials:
            if failed >= p.max_failed:
                return study, (f"{failed} trials failed in this run (tune.max_failed="
                               f"{p.max_failed}), the last with: {last}")
            signals.check()  # SIGTERM/SIGUSR1 between two trials
            error = _one_trial(study, p)
            if error is not None:
                failed, last = failed + 1, error
        return study, None


def _one_trial(study, p: Plan) -> str | None:
    """Ask, train (or read) the cell, tell; the error of a failed trial, else None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from optuna.trial import TrialState

    trial = study.ask()
    try:
        value = _objective(trial, p)
    except (KeyboardInterrupt, signals.Interrupted):
        trial.set_user_attr("requeued", True)
        study.enqueue_trial(trial.params, user_attrs={"resumes_trial": trial.number})
        study.tell(trial, state=TrialState.FAIL)
        raise
    except (FlexexpError, HydraException, OmegaConfBaseException) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        trial.set_user_attr("error", message[:1000])
        study.tell(trial, state=TrialState.FAIL)
        log.error("tune: trial %d failed: %s", trial.number, message)
        return message
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, value)
    log.info("tune: trial %d: %s %.4f (%d of %d complete)", trial.number, p.metric, value,
             _complete(study), p.n_trials)
    return None


def _objective(trial: Any, p: Plan) -> float:
    """The trial's cell, trained in its run directory or read from it: its metric."""
    from flexexp import rundir, trainer
    from flexexp.config import cell_name

    overrides = overrides_for(trial, p.space)
    cfg = compose_config([*p.base, *overrides])
    run_dir = Path(cfg.paths.runs) / cell_name(cfg)
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("run_dir", str(run_dir))
    trained = rundir.completed_record(run_dir) is None
    trial.set_user_attr("trained", trained)
    with _log_file(run_dir, Path(cfg.paths.runs)):
        record = trainer.run(cfg, run_dir)
    value = record.get(p.metric)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{run_dir}/result.json has no {p.metric}: choose a metric of the "
                          "validation split, val_acc or val_loss.")
    trial.set_user_attr("resumed_from_epoch", record.get("resumed_from_epoch"))
    return float(value)


@contextlib.contextmanager
def _log_file(run_dir: Path, root: Path) -> Iterator[None]:
    """The cell's log lines also go to ``<run dir>/train.log``, as under flexexp.train; a
    directory left with nothing else (a cell refused before it started) is removed."""
    from flexexp import rundir

    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - "
                                           "%(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    except FlexexpError:
        handler.close()
        rundir.remove_unclaimed(run_dir, root)
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ---------------------------------------------------------------------------- the report


def table(study, p: Plan) -> str:
    """Every trial: number, state, the metric, trained or read, its overrides."""
    rows = [f"study {p.study} ({p.db}): {_complete(study)} of {p.n_trials} trials complete, "
            f"{p.direction} {p.metric}",
            f"{'trial':>5}  {'state':8}  {p.metric:>8}  {'cell':7}  overrides"]
    stopped = {t.user_attrs.get("resumes_trial") for t in study.trials}
    for t in study.trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        how = ("-" if t.state.name != "COMPLETE" else
               "trained" if t.user_attrs.get("trained") else "read")
        state = "STOPPED" if t.number in stopped else t.state.name  # and queued again
        detail = " ".join(t.user_attrs.get("overrides", [])) or "-"
        if t.user_attrs.get("error"):
            detail += f"  ({t.user_attrs['error'][:120]})"
        rows.append(f"{t.number:>5}  {state:8}  {value:>8}  {how:7}  {detail}")
    return "\n".join(rows)


def best_command(study, p: Plan) -> str | None:
    """The flexexp.train command line that reproduces the best trial's cell."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    args = [*p.command, *best.user_attrs["overrides"]]
    return "python -m flexexp.train " + " ".join(shlex.quote(a) for a in args)


def main(argv: list[str] | None = None) -> int:
    """Run the study; the exit status (0 done, 1 too many failed trials, 2 a user error,
    130 Ctrl-C; SIGTERM/SIGUSR1 end the process by that signal once the study stopped)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    register_configs()
    try:
        p = plan(argv)
        with signals.catch():
            study, error = run_study(p)
    except (FlexexpError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tune: interrupted (Ctrl-C); run the same command to resume the study.",
              file=sys.stderr)
        return 130
    except signals.Interrupted as exc:
        print(f"tune: {exc}; run the same command to resume the study.", file=sys.stderr)
        signals.redeliver()
        return 128 + exc.signum
    print(table(study, p))
    command = best_command(study, p)
    if command:
        print(f"best trial {study.best_trial.number}: {p.metric} {study.best_value:.4f}\n"
              f"  {command}")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
