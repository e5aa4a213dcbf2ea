"""Typed schema of the Hydra config, the run-directory name of a cell, and validation.

The YAML files under ``conf/`` hold the values; the dataclasses here hold the types, so
Hydra rejects a misspelled key or a wrong type while composing. :func:`validate` checks
what types cannot (ranges, lengths, consistency) and raises :class:`ConfigError` with a
message that names the key, the value and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf

from flexexp.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("dataset", "model", "pool", "sac", "optim", "sched", "trainer", "experiment")


@dataclass
class DatasetConfig:
    name: str = MISSING  # the option name, e.g. cifar10 (set by conf/dataset/<name>.yaml)
    source: str = MISSING  # loader in flexexp.data.sources.DATASETS
    num_classes: int = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    flip: bool = False  # random horizontal flip (off where mirroring changes the label)
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random zoom range
    translate: int = 0  # random shift of up to this many pixels
    batch_size: int = 1000  # the dataset's own batch size; trainer.batch_size follows it
    root: str = "data"
    download: bool = True
    verify_checksums: bool = True
    train_size: int | None = None  # synthetic: images to make; others: null = all
    test_size: int | None = None
    data_seed: int = 0  # synthetic data and fixed splits


@dataclass
class ModelConfig:
    name: str = "resnet20"
    depth: int = 20
    width: int = 1
    downsample: str = "stride"  # stride | max | avg | gfgp | s3pool (stages 2 and 3)
    s3pool_grid: int = 2  # S3Pool grid cell size in rows/columns (model.downsample=s3pool)


@dataclass
class PoolConfig:
    name: str = MISSING  # option name: avg | max | flex | flex_reg | ... | flex_softmax | gfgp
    layer: str = MISSING  # global pool in flexexp.pooling.GLOBAL_POOLS
    reg: float = 0.0  # coefficient of the Eq. 2 penalty (0 = off)
    dropout: float = 0.0  # dropout before each linear head


@dataclass
class SacConfig:
    name: str = MISSING  # on | off
    enabled: bool = False
    weights: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.7])


@dataclass
class OptimConfig:
    name: str = MISSING  # adam | sgd
    lr: float = 0.1
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    nesterov: bool = True


@dataclass
class SchedConfig:
    name: str = MISSING  # onecycle | constant
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4


@dataclass
class TrainerConfig:
    epochs: int = 100
    batch_size: int = 1000
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 1  # evaluate on the test split every N epochs (and after the last)
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    progress: bool = True  # per-epoch progress bar
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    precision: str = "fp32"  # auto | fp32 | bf16 | fp16 (autocast)
    channels_last: bool = False  # NHWC memory format
    compile: bool = False  # torch.compile the model (costs start-up time)
    keep_heap: bool = True  # CPU: large blocks from glibc's heap, not mmap (flexexp.runtime)


@dataclass
class PathsConfig:
    runs: str = "runs"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    sac: SacConfig = field(default_factory=SacConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0


def compose_config(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The real composed config (conf/config.yaml) with ``overrides``, outside a Hydra run.

    With ``return_hydra_config`` the ``hydra`` node (sweeper params, mode) is included.
    """
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides),
                       return_hydra_config=return_hydra_config)


def register_configs() -> None:
    """Store the schema as ``flexexp_schema`` (named first in conf/config.yaml's defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="flexexp_schema", node=Config)
    register_resolvers()


# ---------------------------------------------------------------------------- run cells

#: Keys that change where or how fast a run goes, not what it computes; they are left
#: out of the cell identity so a run can move machines and still resume.
RUNTIME_KEYS = (
    "paths",
    "trainer.device",
    "trainer.threads",
    "trainer.progress",
    "trainer.keep_heap",
    "dataset.root",
    "dataset.download",
    "dataset.verify_checksums",
)


def cell_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config without Hydra's node and :data:`RUNTIME_KEYS`."""
    if isinstance(cfg, DictConfig):
        data = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
                else cfg[k] for k in cfg.keys() if k != "hydra"}
    else:
        data = json.loads(json.dumps({k: v for k, v in cfg.items() if k != "hydra"}))
    for dotted in RUNTIME_KEYS:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return data


def cell_hash(cfg: DictConfig | dict) -> str:
    """Eight hex digits that identify a cell's config."""
    blob = json.dumps(cell_config(cfg), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def cell_name(cfg: DictConfig) -> str:
    """``<dataset>/<pool>/sac_<on|off>/seed<k>-<hash>``: the run directory below paths.runs."""
    return (
        f"{cfg.dataset.name}/{cfg.pool.name}/sac_{cfg.sac.name}/seed{cfg.seed}-{cell_hash(cfg)}"
    )


def _cell_resolver(*, _root_: DictConfig) -> str:
    return cell_name(_root_)


def register_resolvers() -> None:
    """Register ``${flexexp.cell:}``, used by conf/config.yaml's run and sweep dirs."""
    if not OmegaConf.has_resolver("flexexp.cell"):
        OmegaConf.register_new_resolver("flexexp.cell", _cell_resolver)


# Launcher workers (joblib, submitit) resolve hydra.sweep.subdir after unpickling the task,
# which imports this module: the resolver must exist by then. Registering is idempotent.
register_resolvers()


# ---------------------------------------------------------------------------- validation


def _positive(cfg: DictConfig, key: str, fix: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value} must be positive: {fix}.")


def validate(cfg: DictConfig) -> None:
    """Check ranges and consistency that the typed schema cannot; raise :class:`ConfigError`."""
    from flexexp.data.sources import DATASETS
    from flexexp.models import DOWNSAMPLE_OPTIONS, VALID_DEPTHS
    from flexexp.pooling import GLOBAL_POOLS

    _positive(cfg, "trainer.epochs", "give the number of epochs, e.g. trainer.epochs=100")
    _positive(cfg, "trainer.batch_size", "give images per step, e.g. trainer.batch_size=1000")
    _positive(cfg, "optim.lr", "give the (peak) learning rate, e.g. optim.lr=0.1")
    _positive(cfg, "trainer.eval_every", "evaluate every N epochs, e.g. trainer.eval_every=1")
    if cfg.trainer.device not in ("auto", "cpu", "cuda") and not str(
        cfg.trainer.device
    ).startswith("cuda:"):
        raise ConfigError(
            f"trainer.device={cfg.trainer.device!r} is not a device: use trainer.device=auto "
            "(GPU when there is one), trainer.device=cpu or trainer.device=cuda."
        )
    if cfg.trainer.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision!r} is unknown: use auto, fp32, bf16 or fp16."
        )
    if cfg.dataset.source not in DATASETS:
        raise ConfigError(
            f"dataset.source={cfg.dataset.source!r} is unknown; valid sources: "
            f"{', '.join(sorted(DATASETS))}. Select a dataset with dataset=<name>."
        )
    if cfg.pool.layer not in GLOBAL_POOLS:
        raise ConfigError(
            f"pool.layer={cfg.pool.layer!r} is unknown; valid layers: "
            f"{', '.join(sorted(GLOBAL_POOLS))}."
        )
    if cfg.model.downsample not in DOWNSAMPLE_OPTIONS:
        raise ConfigError(
            f"model.downsample={cfg.model.downsample!r} is unknown; valid options: "
            f"{', '.join(DOWNSAMPLE_OPTIONS)} (stride = the strided conv of ResNet20, the "
            "others a 2x2 stride-2 pool after a stride-1 conv), e.g. model.downsample=max."
        )
    if cfg.model.s3pool_grid < 1:
        raise ConfigError(
            f"model.s3pool_grid={cfg.model.s3pool_grid} must be >= 1 (S3Pool's grid cell size "
            "in rows/columns; 1 = no randomness, larger = more distortion), e.g. 2."
        )
    if cfg.model.depth not in VALID_DEPTHS:
        raise ConfigError(
            f"model.depth={cfg.model.depth} is not a CIFAR ResNet depth; use one of "
            f"{', '.join(map(str, VALID_DEPTHS))} (6n+2)."
        )
    if cfg.dataset.image_size < 4:
        raise ConfigError(
            f"dataset.image_size={cfg.dataset.image_size} is too small for ResNet20's three "
            "stages (each of the last two halves the map): use at least 4, e.g. 32."
        )
    if not 0.0 <= cfg.pool.dropout < 1.0:
        raise ConfigError(f"pool.dropout={cfg.pool.dropout} must be in [0, 1), e.g. 0.25.")
    if cfg.pool.reg < 0:
        raise ConfigError(f"pool.reg={cfg.pool.reg} must be >= 0 (0 turns the penalty off).")
    weights = list(cfg.sac.weights)
    if cfg.sac.enabled:
        if len(weights) != 3:
            raise ConfigError(
                f"sac.weights={weights} must have 3 entries, one per stage head "
                "(stage 1, stage 2, main), e.g. sac.weights=[0.1,0.2,0.7]."
            )
        if any(w < 0 for w in weights):
            raise ConfigError(f"sac.weights={weights} must not be negative, e.g. [0.1,0.2,0.7].")
        if not all(a < b for a, b in zip(weights, weights[1:], strict=False)):
            warnings.warn(
                f"sac.weights={weights} are not increasing; the paper requires l1 < l2 < l3 "
                "for stable learning",
                stacklevel=2,
            )
    for key in ("mean", "std"):
        stats = list(cfg.dataset[key])
        if len(stats) not in (1, cfg.dataset.in_channels):
            raise ConfigError(
                f"dataset.{key} has {len(stats)} entries but dataset.in_channels="
                f"{cfg.dataset.in_channels}: give one value per channel."
            )
    if any(s <= 0 for s in cfg.dataset.std):
        raise ConfigError(f"dataset.std={list(cfg.dataset.std)} must be positive.")
    if len(cfg.dataset.scale) != 2:
        raise ConfigError(
            f"dataset.scale={list(cfg.dataset.scale)} must be a range of two numbers [min, max], "
            "e.g. [1.0, 1.2] (1.0 = no scaling)."
        )
    lo, hi = cfg.dataset.scale
    if not 0 < lo <= hi:
        raise ConfigError(
            f"dataset.scale={[lo, hi]} must be a range [min, max] with 0 < min <= max, "
            "e.g. [1.0, 1.2] (1.0 = no scaling)."
        )


# ---------------------------------------------------------------------------- preflight


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Option names of a config group (the YAML files in ``conf/<group>/``)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _schema_keys(node: Any) -> dict[str, Any]:
    return {f.name: f.default_factory() if callable(f.default_factory) else f.default
            for f in fields(node)}


def check_overrides(overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Catch misspelled keys, unknown group options and ``+key=`` typos before Hydra runs.

    Hydra's own errors catch these too; this gives the message a list of valid names and
    a closest match. Only plain ``key=value`` command-line overrides are checked.
    """
    for text in overrides:
        if text.startswith("-") or "=" not in text:
            continue
        key, value = text.split("=", 1)
        prefix = ""
        while key and key[0] in "+~":
            prefix += key[0]
            key = key[1:]
        if key.startswith("hydra") or key.startswith("/"):
            continue
        if "+" in prefix and key not in ("experiment",):
            raise ConfigError(
                f"override {text!r} adds a new key with '+', which bypasses the schema (a typo "
                f"would pass silently). Every setting already has a key: drop the '+', or list "
                f"the keys with `python -m flexexp.train --cfg job`."
            )
        parts = key.split(".")
        top = parts[0]
        if len(parts) == 1 and top in GROUPS:
            options = group_options(top, conf_dir)
            if value.startswith("["):
                raise ConfigError(
                    f"override {text!r} gives the config group {top!r} a list; a group takes "
                    f"one option name ({', '.join(options)}). To sweep several, run with -m "
                    f"and separate them by commas: {top}={','.join(options[:2])}."
                )
            if "," in value or value.startswith(("choice(", "range(", "glob(")):
                continue  # a sweep: Hydra checks each choice itself
            if value not in options and not (value == "null" and top == "experiment"):
                raise ConfigError(_unknown(f"option {value!r} for group {top!r}", value, options,
                                           f"{top}=<option>"))
            continue
        node: Any = Config
        for depth, part in enumerate(parts):
            if not is_dataclass(node):
                break
            keys = _schema_keys(node)
            if part not in keys:
                where = ".".join(parts[:depth]) or "the root config"
                raise ConfigError(_unknown(f"key {key!r} (no {part!r} in {where})", part,
                                           sorted(keys), "key=value"))
            if depth == len(parts) - 1 and "~" not in prefix:
                _check_value(key, value, get_type_hints(type(node) if not isinstance(node, type)
                                                        else node)[part])
            node = keys[part]


_SCALARS = {
    int: ("an integer", re.compile(r"[+-]?\d+")),
    float: ("a number", re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf|nan")),
    bool: ("true or false", re.compile(r"(?i:true|false)")),
}


def _check_value(key: str, value: str, typ: Any) -> None:
    """Reject a command-line value that cannot have the field's type (sweeps pass through)."""
    args = [a for a in get_args(typ) if a is not type(None)]
    if "${" in value or value.endswith(")") or value == "null" or "],[" in value or (
        "," in value and get_origin(typ) is not list
    ):
        return  # interpolation, sweep or sweep function: Hydra checks each value itself
    if get_origin(typ) is list:
        if not (value.startswith("[") and value.endswith("]")):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[0.1,0.2,0.7].")
        inner = args[0] if args else str
        for item in filter(None, (v.strip() for v in value[1:-1].split(","))):
            _check_value(f"{key}[]", item, inner)
        return
    if args and len(args) == 1:  # Optional[X]
        typ = args[0]
    if typ in _SCALARS:
        what, pattern = _SCALARS[typ]
        if not pattern.fullmatch(value.strip()):
            raise ConfigError(
                f"{key}={value!r} must be {what}, e.g. {key}={_example(typ)}; see the "
                f"defaults with `python -m flexexp.train --cfg job`."
            )


def _example(typ: type) -> str:
    return {int: "10", float: "0.1", bool: "true"}[typ]


def check_runs_root(overrides: list[str]) -> None:
    """Fail early if ``paths.runs`` cannot hold run directories (Hydra creates them first)."""
    root = Path(PathsConfig.runs)
    for text in overrides:
        if text.lstrip("+~").startswith("paths.runs="):
            root = Path(text.split("=", 1)[1])
    if "${" in str(root) or "," in str(root):
        return
    probe = root.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a directory" if not probe.is_dir() else "is not writable"
        raise ConfigError(
            f"cannot write to the run directory root paths.runs={root}: {probe} {why}. "
            "Choose a writable root with paths.runs=DIR."
        )


def _unknown(what: str, given: str, valid: list[str], form: str) -> str:
    close = difflib.get_close_matches(given, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Unknown {what}.{hint} Valid names: {', '.join(valid)} (override as {form})."
