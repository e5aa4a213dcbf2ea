"""Experiment trackers, the config group ``logger``: TensorBoard, CSV, MLflow, W&B.

``logger=tensorboard`` (the default), ``csv``, ``mlflow``, ``wandb``, ``none``, or several
at once: ``logger=[tensorboard,mlflow]``. Each chosen tracker gets one run per cell:

- ``tensorboard``: event files in ``<run dir>/tb`` (scalars, FlexPool weight pictures);
- ``csv``: ``<run dir>/metrics.csv``, one row per epoch, rewritten whole each epoch;
- ``mlflow``: one MLflow run named after the cell in ``logger.experiment`` at
  ``logger.tracking_uri`` (default: ``sqlite:///<parent of paths.runs>/mlflow.db``,
  artifacts in ``<parent>/mlartifacts``); params = the resolved config, metrics per epoch,
  ``result.json`` as an artifact, the end status (FINISHED / FAILED / KILLED);
- ``wandb``: one W&B run named after the cell, ``logger.mode=online|offline|disabled``,
  files in ``<run dir>/wandb``.

``<run dir>/trackers.json`` keeps each tracker's run id and the last epoch it received.
A resumed cell continues the same tracker runs and sends each epoch once: a tracker gets
an epoch after its checkpoint is written, so what it missed when a run was killed comes
from the checkpoint's history at the next epoch (or at the end). A tracker that cannot
be reached when the cell starts stops the cell with a clear error; one that fails later
gets a warning and the epochs again at the next try: training never stops for a tracker.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flexexp.errors import ConfigError, FlexexpError
from flexexp.files import atomic_write_text, flat_keys, read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["TRACKERS", "STATE_FILE", "METRICS_FILE", "TrackerError", "Trackers",
           "chosen", "validate_logger", "scalars", "mlflow_uri"]

TRACKERS = ("tensorboard", "csv", "mlflow", "wandb")
STATE_FILE = "trackers.json"
METRICS_FILE = "metrics.csv"
WANDB_MODES = ("online", "offline", "disabled")
#: How a cell's status reads in MLflow.
MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}
#: MLflow's HTTP retries for a server, unless set in the environment: its own defaults
#: (7 retries, backoff factor 2, 120 s timeout) stall a run for minutes on every call
#: while a server is down
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_TIMEOUT_S = 10  # a server that does not answer /health in this time: not reachable
FINISH_TRIES = 3  # attempts to end a tracker run (1 s, then 2 s apart)


class TrackerError(FlexexpError, RuntimeError):
    """A tracker could not start its run (an unreachable server, a package missing)."""


# ---------------------------------------------------------------------------- config


def chosen(cfg: DictConfig) -> list[str]:
    """The trackers ``cfg.logger`` turns on, in :data:`TRACKERS` order."""
    on = OmegaConf.select(cfg, "logger.trackers", default=None) or {}
    return [name for name in TRACKERS if on.get(name)]


def validate_logger(cfg: DictConfig) -> None:
    """Known tracker names, a W&B mode, an MLflow experiment name: else a ConfigError."""
    lg = cfg.logger
    on = OmegaConf.select(cfg, "logger.trackers", default=None)
    if not isinstance(on, DictConfig):
        raise ConfigError("logger.trackers must be a mapping such as {tensorboard: true}: "
                          "choose trackers with logger=tensorboard|csv|mlflow|wandb|none or "
                          "several with logger=[tensorboard,mlflow].")
    for name, value in on.items():
        if name not in TRACKERS or not isinstance(value, bool):
            raise ConfigError(
                f"logger.trackers.{name}={value!r}: the trackers are {', '.join(TRACKERS)} "
                "(each true or false). Choose them with logger=NAME or logger=[NAME,NAME].")
    if on.get("wandb") and lg.get("mode") not in WANDB_MODES:
        raise ConfigError(f"logger.mode={lg.get('mode')!r} is not a W&B mode: use "
                          "logger.mode=offline (no network), online or disabled.")
    for key, tracker in (("experiment", "mlflow"), ("project", "wandb")):
        value = lg.get(key)
        if on.get(tracker) and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"logger.{key}={value!r} must name the {tracker} "
                              f"{'experiment' if tracker == 'mlflow' else 'project'}, e.g. "
                              f"logger.{key}=flexexp.")


def mlflow_uri(cfg: DictConfig) -> str:
    """``logger.tracking_uri``, or the default SQLite store beside ``paths.runs``."""
    uri = OmegaConf.select(cfg, "logger.tracking_uri", default=None)
    if uri:
        return str(uri)
    parent = Path(cfg.paths.runs).resolve().parent
    return f"sqlite:///{parent / 'mlflow.db'}"


# ---------------------------------------------------------------------------- metrics


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """An epoch's history entry as tracker metrics: ``train/loss``, ``train/loss_stage1``,
    ``train/lr``, ``test/acc_main``, ``test/acc_stage2``, ``val/acc_main``, ...

    Per-head mappings (``train_loss_heads``, ``test_acc_aux``) give one metric per head;
    ``test_*`` and ``val_*`` numbers are the main head's; other numbers are ``train/*``.
    Missing values (None) are left out.
    """
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key == "epoch":
            continue
        prefix, _, rest = key.partition("_")
        if prefix not in ("train", "test", "val"):
            prefix, rest = "train", key
        if isinstance(value, dict):
            base = rest.removesuffix("_heads").removesuffix("_aux")
            out.update({f"{prefix}/{base}_{h}": float(v) for h, v in value.items()
                        if _number(v)})
        elif _number(value):
            main = "_main" if prefix in ("test", "val") else ""
            out[f"{prefix}/{rest}{main}"] = float(value)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys, Hydra's own node left out: a tracker's params."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in flat_keys(config).items() if k.split(".")[0] != "hydra"}


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# ---------------------------------------------------------------------------- trackers


class Tracker:
    """One tracker of one cell. ``state`` is its entry in ``trackers.json`` (``epoch``:
    the last epoch it received; ``run_id`` where it has runs)."""

    name = ""

    def __init__(self, cfg: DictConfig, run_dir: Path, cell: str, state: dict[str, Any],
                 save: Any = None):
        self.cfg, self.run_dir, self.cell, self.state = cfg, run_dir, cell, state
        self.save = save or (lambda: None)  # writes trackers.json

    def open(self) -> None:
        """Start (or continue, with ``state["run_id"]``) the tracker's run."""

    def log(self, entry: dict[str, Any], model: Any) -> None:
        """Send one epoch (``model``: the trained model, or None for an earlier epoch)."""

    def history(self, history: list[dict[str, Any]], model: Any) -> None:
        """Send the epochs of ``history`` this tracker has not received yet."""
        done = int(self.state.get("epoch", 0))
        new = [e for e in history if e["epoch"] > done]
        for e in new:
            self.log(e, model if e is history[-1] else None)
            self.state["epoch"] = e["epoch"]

    def finish(self, status: str, record: dict[str, Any]) -> None:
        """End the run with the cell's status (completed / failed / interrupted)."""


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def log(self, entry: dict[str, Any], model: Any) -> None:
        for tag, value in scalars(entry).items():
            self.writer.add_scalar(tag, value, entry["epoch"])
        if model is not None and "test_acc" in entry:
            self.flex_weights(model.flex_pools(), entry["epoch"])
        self.writer.flush()

    def flex_weights(self, pools: list[tuple[str, Any]], step: int) -> None:
        """One picture per FlexPool: a grid of its per-channel weight maps, min-max scaled."""
        import torch
        from torchvision.utils import make_grid

        for name, pool in pools:
            w = pool.effective_weight().detach().float().cpu()  # (C, H, W)
            lo, hi = w.min(), w.max()
            img = (w - lo) / (hi - lo) if hi > lo else torch.full_like(w, 0.5)
            grid = make_grid(img[:, None], nrow=int(len(w) ** 0.5 + 0.999), padding=1,
                             pad_value=1.0)
            self.writer.add_image(f"flexpool/{name}", grid, step)

    def finish(self, status: str, record: dict[str, Any]) -> None:
        self.writer.close()


class CsvTracker(Tracker):
    """``metrics.csv``: the whole history, rewritten atomically each epoch, so the file
    always matches the checkpoint's history (a resumed run has no gap and no repeat)."""

    name = "csv"

    def history(self, history: list[dict[str, Any]], model: Any) -> None:
        import pandas as pd

        if not history:
            return
        rows = [{"epoch": e["epoch"], **scalars(e)} for e in history]
        atomic_write_text(self.run_dir / METRICS_FILE, pd.DataFrame(rows).to_csv(index=False))
        self.state["epoch"] = history[-1]["epoch"]


class MlflowTracker(Tracker):
    """One MLflow run per cell; ``state``: its ``run_id`` and the store's ``uri``."""

    name = "mlflow"

    def open(self) -> None:
        uri = mlflow_uri(self.cfg)
        try:
            if uri.startswith("file:") or "://" not in uri:  # a folder: the file store
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # chosen: allow it
            if uri.startswith(("http://", "https://")):
                for key, value in MLFLOW_HTTP.items():  # unless the user set them
                    os.environ.setdefault(key, value)
                _reachable(uri)
            from mlflow.tracking import MlflowClient

            with _store_lock(uri):  # sweep workers creating one store or experiment at once
                self.client = MlflowClient(tracking_uri=uri)
                experiment = self._experiment(uri)
            self.run_id = self._continue(uri) or self._start(experiment, uri)
        except ImportError as exc:
            raise TrackerError(f"logger=mlflow needs the mlflow package ({exc}): pip install "
                               "-e . installs it, or drop mlflow from logger.") from exc
        except Exception as exc:  # MlflowException, a connection refused, ...
            raise TrackerError(
                f"MLflow at {uri} could not start this cell's run ({_first_line(exc)}). Start "
                "the tracking server, fix logger.tracking_uri, or drop mlflow from logger; "
                "nothing was trained."
            ) from exc

    def _experiment(self, uri: str) -> str:
        name = str(self.cfg.logger.experiment)
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        where = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
            where = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=where)

    def _continue(self, uri: str) -> str | None:
        """The cell's run from before (a resumed cell), set running again; else None."""
        run_id = self.state.get("run_id")
        if not run_id:
            return None
        if self.state.get("uri") != uri:
            log.warning("mlflow: this cell's run %s is in %s, not in %s: starting a run there",
                        run_id, self.state.get("uri"), uri)
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted from the store: a new run, said so
            log.warning("mlflow: run %s of this cell is gone from %s: starting a new one",
                        run_id, uri)
            return None
        if run.info.lifecycle_stage == "deleted":
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _start(self, experiment: str, uri: str) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(experiment, run_name=self.cell, tags={
            "flexexp.cell": self.cell, "flexexp.run_dir": str(self.run_dir.resolve())})
        self.state.clear()
        self.state.update(run_id=run.info.run_id, uri=uri, epoch=0)
        self.save()  # at once: a kill from here on still finds this run
        params = [Param(k, str(v)[:500]) for k, v in _config(self.cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def log(self, entry: dict[str, Any], model: Any) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, v, now, entry["epoch"]) for k, v in scalars(entry).items()
            if math.isfinite(v)])

    def finish(self, status: str, record: dict[str, Any]) -> None:
        result = self.run_dir / "result.json"
        if result.is_file():
            self.client.log_artifact(self.run_id, str(result))
        self.client.set_tag(self.run_id, "flexexp.status", status)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


def _reachable(uri: str) -> None:
    """An OSError unless the MLflow server at ``uri`` answers (any HTTP status: a server
    behind a login answers too), within :data:`PROBE_TIMEOUT_S`."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside a local store (SQLite file or folder); none for a server."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        path = db.with_name(f".{db.name}.lock")
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri.removeprefix("file://").removeprefix("file:")) / ".flexexp.lock"
    else:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class WandbTracker(Tracker):
    """One W&B run per cell (id in ``state``), resumed with ``resume="allow"``."""

    name = "wandb"

    def open(self) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise TrackerError(f"logger=wandb needs the wandb package ({exc}): pip install "
                               "-e . installs it, or drop wandb from logger.") from exc
        if not self.state.get("run_id"):
            self.state.update(run_id=secrets.token_hex(6), epoch=0)
            self.save()  # before init: a kill from here on still finds this id
        lg = self.cfg.logger
        try:
            self.run = wandb.init(
                project=str(lg.project), entity=lg.get("entity"), name=self.cell,
                id=self.state["run_id"], resume="allow", mode=str(lg.mode),
                dir=str(self.run_dir), config=_config(self.cfg),
                settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:
            raise TrackerError(
                f"W&B (logger.mode={lg.mode}) could not start this cell's run "
                f"({_first_line(exc)}). "
                "Use logger.mode=offline where there is no network or account (upload later "
                "with wandb sync); nothing was trained.") from exc

        # W&B writes from a service process that a SIGKILL takes down with what it had
        # not written yet: a resumed run sends the whole history again (W&B keeps one value
        # per step: it drops a step it already has)
        self.state["epoch"] = 0

    def log(self, entry: dict[str, Any], model: Any) -> None:
        self.run.log({"epoch": entry["epoch"], **scalars(entry)}, step=entry["epoch"])

    def finish(self, status: str, record: dict[str, Any]) -> None:
        keep = ("test_acc", "val_acc", "wall_time_s", "train_time_s")
        self.run.summary.update({"status": status, **{
            k: record[k] for k in keep if _number(record.get(k))}})
        self.run.finish(exit_code=0 if status == "completed" else 1)


CLASSES: dict[str, type[Tracker]] = {
    c.name: c for c in (TensorBoardTracker, CsvTracker, MlflowTracker, WandbTracker)}


# ---------------------------------------------------------------------------- a cell's


class Trackers:
    """The chosen trackers of one cell (none on ranks other than 0: ``on=False``)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, cell: str, on: bool = True):
        self.path = Path(run_dir) / STATE_FILE
        self.state = _read_state(self.path) if on else {}
        self.items: list[Tracker] = []
        for name in chosen(cfg) if on else []:
            self.items.append(CLASSES[name](cfg, Path(run_dir), cell,
                                            self.state.setdefault(name, {}), self.save))
        self.opened: list[Tracker] = []
        self.first = True  # the first epoch this process trains: where it started from

    def save(self) -> None:
        write_json(self.path, self.state)

    def open(self) -> None:
        """Start or continue each tracker's run; a TrackerError ends the ones started."""
        for t in self.items:
            try:
                t.open()
            except BaseException:
                self.finish("failed", {})
                raise
            self.opened.append(t)
        if self.items:
            self.save()

    def epochs(self, history: list[dict[str, Any]], model: Any = None) -> None:
        """Send each tracker the epochs of ``history`` it has not received (call it after
        the epoch's checkpoint, with the ``model`` that trained the last one; None: a
        catch-up). A tracker that fails gets them again next time."""
        start = history[-1]["epoch"] - 1 if history and model is not None else None
        for t in self.opened:
            try:
                if start is not None and self.first and int(t.state.get("epoch", 0)) > start:
                    self._start_again(t, start)
                t.history(history, model)
            except Exception as exc:
                log.warning("%s: could not log epoch %d (%s: %s); it is sent again with the "
                            "next epoch", t.name, history[-1]["epoch"], type(exc).__name__, exc)
        if start is not None:
            self.first = False
        if self.opened:
            self.save()

    def _start_again(self, t: Tracker, start: int) -> None:
        """The cell trains again from ``start`` but ``t``'s run holds later epochs (its
        checkpoint was lost or moved aside): end that run as killed, start a new one, so no
        run mixes epochs of two trainings."""
        log.warning("%s: this cell trains again from epoch %d but its run %s holds epochs up "
                    "to %d (the checkpoint was lost or unreadable): that run ends as killed "
                    "and a new one starts", t.name, start, t.state.get("run_id", ""),
                    t.state.get("epoch"))
        t.finish("interrupted", {})
        t.state.clear()
        t.open()

    def finish(self, status: str, record: dict[str, Any]) -> None:
        """Send what is left of the history, then end each run with the cell's status."""
        if record.get("history"):
            self.epochs(record["history"])
        while self.opened:
            t = self.opened.pop(0)
            for attempt in range(FINISH_TRIES):  # a store busy for a moment (SQLite, a
                try:                             # server restarting): the status matters
                    t.finish(status, record)
                    break
                except Exception as exc:
                    if attempt + 1 == FINISH_TRIES:
                        log.warning("%s: could not end its run as %s (%s: %s); it shows as "
                                    "running until the cell runs again", t.name, status,
                                    type(exc).__name__, exc)
                    else:
                        time.sleep(2 ** attempt)


def _read_state(path: Path) -> dict[str, Any]:
    """``trackers.json`` (an unreadable one: a warning, and new tracker runs)."""
    if not path.exists():
        return {}
    try:
        state = read_json(path)
        if isinstance(state, dict) and all(isinstance(v, dict) for v in state.values()):
            return state
        raise ValueError("not a mapping of tracker states")
    except (OSError, ValueError) as exc:
        log.warning("%s could not be read (%s): the trackers start new runs", path, exc)
        return {}
