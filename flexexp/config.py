"""The Hydra config: composing it, the run-directory name of a cell, and validation.

The YAML files under ``conf/`` hold the values; the dataclasses of :mod:`flexexp.schema`
hold the types, so Hydra rejects a misspelled key or a wrong type while composing.
:func:`validate` checks what types cannot (ranges, lengths, consistency, the arguments
of the layer, optimiser and schedule each option names) and raises :class:`ConfigError`
with a message that names the key, the value and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from flexexp.errors import ConfigError
from flexexp.schema import Config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("dataset", "model", "pool", "sac", "optim", "sched", "trainer", "logger",
          "experiment")


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
    "logger",
    "trainer.device",
    "trainer.threads",
    "trainer.progress",
    "trainer.keep_heap",
    "trainer.cudnn_benchmark",
    "trainer.gpu_policy",
    "dataset.root",
    "dataset.download",
    "dataset.verify_checksums",
    "tune",  # the search (python -m flexexp.tune) that chose the cell, not the cell
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
    _as_floats(data)
    _speed_aliases(data)
    return data


def _speed_aliases(data: dict[str, Any]) -> None:
    """``trainer.compile=true`` is the same cell as ``default`` (and ``false`` as
    ``none``); ``channels_last`` likewise whether written as a string or a boolean."""
    from flexexp.speed import channels_last_setting, compile_setting

    t = data.get("trainer")
    if not isinstance(t, dict):
        return
    for key, canonical in (("compile", compile_setting), ("channels_last", channels_last_setting)):
        if key in t:
            try:
                t[key] = canonical(t[key])
            except ConfigError:  # validate() names it; the hash takes the value as it is
                pass


#: Real-valued keys of the open sections (no schema types them): ``optim.lr=1`` is the
#: same cell as ``optim.lr=1.0``, and every ``sched`` value but its name is real.
FLOAT_KEYS = ("pool.reg", "pool.dropout", "optim.lr", "optim.weight_decay", "optim.betas")


def _as_floats(data: dict[str, Any]) -> None:
    """Integers at :data:`FLOAT_KEYS` (and in ``sched``) become floats, in place."""
    def real(v: Any) -> Any:
        if isinstance(v, list):
            return [real(x) for x in v]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    for dotted in FLOAT_KEYS:
        section, key = dotted.split(".")
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = real(node[key])
    sched = data.get("sched")
    if isinstance(sched, dict):
        data["sched"] = {k: v if k == "name" else real(v) for k, v in sched.items()}


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


def _number(cfg: DictConfig, key: str, fix: str) -> float:
    """The number at ``key`` (an int or a float, not a bool), else a ConfigError."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}={value!r} must be a number: {fix}.")
    return value


def _positive(cfg: DictConfig, key: str, fix: str) -> None:
    value = _number(cfg, key, fix)
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive: {fix}.")


def validate(cfg: DictConfig) -> None:
    """Check ranges and consistency that the typed schema cannot; raise :class:`ConfigError`."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"no value for {', '.join(missing)}: every key of the schema needs one. A config "
            f"file of yours (dataset, pool, ...) lacks it; copy the key from the matching "
            f"file under {CONF_DIR}."
        )
    from flexexp.ranges import check_ranges

    check_ranges(cfg)  # every numeric key in its range (flexexp/ranges.py), first
    _validate_trainer(cfg)
    _validate_dataset(cfg)
    _validate_model(cfg)
    _validate_pool(cfg)
    _validate_optim(cfg)
    _validate_sched(cfg)
    _validate_sac(cfg)
    from flexexp.trackers import validate_logger

    validate_logger(cfg)


def _validate_trainer(cfg: DictConfig) -> None:
    if cfg.trainer.device not in ("auto", "cpu", "cuda") and not re.fullmatch(
        r"cuda:\d+", str(cfg.trainer.device)
    ):
        raise ConfigError(
            f"trainer.device={cfg.trainer.device!r} is not a device: use trainer.device=auto "
            "(GPU when there is one), trainer.device=cpu, trainer.device=cuda or cuda:K (GPU K)."
        )
    if cfg.trainer.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision!r} is unknown: use auto, fp32, bf16 or fp16."
        )
    from flexexp.gpus import GPU_POLICIES
    from flexexp.speed import channels_last_setting, compile_setting

    compile_setting(cfg.trainer.compile)
    channels_last_setting(cfg.trainer.channels_last)
    if cfg.trainer.gpu_policy not in GPU_POLICIES:
        raise ConfigError(f"trainer.gpu_policy={cfg.trainer.gpu_policy!r} is unknown: use "
                          f"{' or '.join(GPU_POLICIES)}.")


def _built(key: str, build: Any) -> Any:
    """Build a layer the config names, once, to check it: the error names ``key``. The
    random state is put back, so checking never shifts a run's initialisation."""
    import torch

    with torch.random.fork_rng(devices=[]):
        try:
            return build()
        except Exception as exc:  # a user's layer may raise anything: name the key
            kind = "" if isinstance(exc, ValueError | TypeError) else f"{type(exc).__name__}: "
            raise ConfigError(f"{key}: {kind}{exc}.") from None


def _validate_model(cfg: DictConfig) -> None:
    from flexexp.models import BLOCKS, check_depth, make_local_pool, stage_shapes
    from flexexp.pooling import LOCAL_POOLS

    _built(f"model.depth={cfg.model.depth}", lambda: check_depth(cfg.model.depth))
    if cfg.model.block not in BLOCKS:
        raise ConfigError(
            f"model.block={cfg.model.block!r} is unknown; valid names: {', '.join(BLOCKS)} "
            "(he = He et al.'s block, authors = the authors' code), e.g. model.block=authors."
        )
    down = cfg.model.downsample
    if down != "stride" and down not in LOCAL_POOLS and "." not in down:
        raise ConfigError(
            f"model.downsample={down!r} is unknown; valid options: stride, "
            f"{', '.join(LOCAL_POOLS)} (stride = the strided conv of ResNet20, the others a "
            "2x2 stride-2 pool after a stride-1 conv), or the import path of a local pool "
            "class (module.Class), e.g. model.downsample=max."
        )
    # the first block of stage i + 1 pools a map of its width at stage i's size, halved
    shapes = stage_shapes(cfg.dataset.image_size, cfg.model.width)
    layers = len(shapes) - 1  # downsampling layers: a list argument gives one entry each
    # every entry, not only the one in use: a typo fails now, not in a later sweep
    for name in {down, *cfg.model.local_pool_args} - {"stride"}:
        given_args = cfg.model.local_pool_args.get(name)
        args = OmegaConf.to_container(given_args, resolve=True) if given_args else {}
        key = f"model.downsample={name!r}" if name == down else f"model.local_pool_args.{name}"
        for k, v in args.items():
            if isinstance(v, list) and len(v) != layers:
                raise ConfigError(
                    f"model.local_pool_args.{name}.{k}={v} has {len(v)} entries: a list gives "
                    f"one per downsampling layer ({layers}: stages 2 and 3), e.g. "
                    f"model.local_pool_args.{name}.{k}=[16,8]; a single value holds for all.")
        factory = _built(key, lambda n=name, a=args: make_local_pool(n, **a))
        given = ", ".join(f"model.local_pool_args.{name}.{k}={v!r}" for k, v in args.items())
        for (_, size, _), (c, half, _) in zip(shapes, shapes[1:], strict=False):
            _built(given or f"model.downsample={name!r}", lambda f=factory, c=c, s=size, o=half:
                   _check_shape(f(c), (c, s, s), (c, o, o)))


def _validate_dataset(cfg: DictConfig) -> None:
    from flexexp.data.sources import DATASETS
    from flexexp.models import check_image_size

    if cfg.dataset.source not in DATASETS:
        raise ConfigError(
            f"dataset.source={cfg.dataset.source!r} is unknown; valid sources: "
            f"{', '.join(sorted(DATASETS))}. Select a dataset with dataset=<name>."
        )
    _built(f"dataset.image_size={cfg.dataset.image_size}",
           lambda: check_image_size(cfg.dataset.image_size))
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
    if cfg.dataset.translate >= cfg.dataset.image_size:
        raise ConfigError(
            f"dataset.translate={cfg.dataset.translate} shifts images by their whole size "
            f"(dataset.image_size={cfg.dataset.image_size}) or more: use a few pixels, e.g. "
            "dataset.translate=2 (0 = no shift).")
    lo, hi = cfg.dataset.scale
    if not 0 < lo <= hi:
        raise ConfigError(
            f"dataset.scale={[lo, hi]} must be a range [min, max] with 0 < min <= max, "
            "e.g. [1.0, 1.2] (1.0 = no scaling)."
        )


def _validate_pool(cfg: DictConfig) -> None:
    from flexexp.models import pool_kwargs, stage_shapes
    from flexexp.pooling import build_pool

    for key, kind in (("name", str), ("layer", str), ("reg", float), ("dropout", float)):
        value = cfg.pool.get(key)
        if kind is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(
                f"pool.{key}={value!r} must be {'a string' if kind is str else 'a number'}: "
                f"every pool config has name, layer, reg and dropout (see {CONF_DIR}/pool/)."
            )
    if not 0.0 <= cfg.pool.dropout < 1.0:
        raise ConfigError(f"pool.dropout={cfg.pool.dropout} must be in [0, 1), e.g. 0.25.")
    if cfg.pool.reg < 0:
        raise ConfigError(f"pool.reg={cfg.pool.reg} must be >= 0 (0 turns the penalty off).")
    kwargs = pool_kwargs(cfg.pool)
    c, h, w = stage_shapes(cfg.dataset.image_size, cfg.model.width)[-1]  # the main head's map
    _built(f"pool.layer={cfg.pool.layer!r} with {kwargs or 'no arguments'}",
           lambda: _check_shape(build_pool(cfg.pool.layer, c, h, w, **kwargs), (c, h, w), (c,)))


def _validate_optim(cfg: DictConfig) -> None:
    from flexexp.optim import NO_DECAY_KINDS, OPTIM_SHARED_KEYS, OPTIMIZERS
    from flexexp.pooling import check_arguments

    o = cfg.optim
    if o.get("name") not in OPTIMIZERS:
        raise ConfigError(f"optim.name={o.get('name')!r} is unknown; valid names: "
                          f"{', '.join(sorted(OPTIMIZERS))} (optim=<name>).")
    no_decay = o.get("no_decay")
    if not isinstance(no_decay, ListConfig) or any(k not in NO_DECAY_KINDS for k in no_decay):
        raise ConfigError(f"optim.no_decay={o.get('no_decay')} must list some of "
                          f"{', '.join(NO_DECAY_KINDS)}, e.g. optim.no_decay=[bn,pool] "
                          "(or [] for weight decay on every parameter).")
    if _number(cfg, "optim.weight_decay", "e.g. optim.weight_decay=5e-4") < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be >= 0.")
    kwargs = {k: v for k, v in o.items() if k not in OPTIM_SHARED_KEYS}
    args = {"lr": o.lr, "weight_decay": o.weight_decay, **kwargs}
    _built(f"optim={o.name}", lambda: check_arguments(OPTIMIZERS[o.name], ([],), args,
                                                      f"optimiser {o.name!r}"))
    # built once on a dummy parameter: the optimiser checks its own values (betas, ...)
    given = ", ".join(f"optim.{k}={v!r}" for k, v in args.items())
    _built(f"optim={o.name} with {given}", lambda: OPTIMIZERS[o.name](
        [{"params": [_dummy_parameter()]}], **args))


def _validate_sched(cfg: DictConfig) -> None:
    from flexexp.engine import SCHEDULES, schedule_params
    from flexexp.pooling import check_arguments

    name = cfg.sched.get("name")
    if name not in SCHEDULES:
        raise ConfigError(f"sched.name={name!r} is unknown; valid names: "
                          f"{', '.join(SCHEDULES)} (sched=<name>).")
    kwargs = schedule_params(cfg.sched)
    _built(f"sched={name}", lambda: check_arguments(SCHEDULES[name], (0, 1, 1.0), kwargs,
                                                    f"schedule {name!r}"))
    for key in kwargs:
        _positive(cfg, f"sched.{key}", f"see {CONF_DIR}/sched/{name}.yaml")
    if name == "onecycle" and not cfg.sched.pct_start < 1:
        raise ConfigError(f"sched.pct_start={cfg.sched.pct_start} must be in (0, 1), e.g. 0.3.")
    if name == "onecycle":
        _validate_momentum_cycle(cfg)


def _validate_momentum_cycle(cfg: DictConfig) -> None:
    """sched=onecycle's momentum keys (their ranges: flexexp/ranges.py)."""
    from flexexp.engine import MOMENTUM_KEYS, momentum_key

    s = cfg.sched
    missing = [k for k in MOMENTUM_KEYS if k not in s]
    if missing:
        raise ConfigError(f"sched=onecycle has no {', '.join(f'sched.{k}' for k in missing)}: "
                          f"copy the key from {CONF_DIR}/sched/onecycle.yaml.")
    if not isinstance(s.cycle_momentum, bool):
        raise ConfigError(f"sched.cycle_momentum={s.cycle_momentum!r} must be true or false.")
    if s.base_momentum > s.max_momentum:
        raise ConfigError(
            f"sched.base_momentum={s.base_momentum} is above sched.max_momentum="
            f"{s.max_momentum}: the momentum falls from max to base as the LR rises "
            "(e.g. sched.base_momentum=0.85 sched.max_momentum=0.95).")
    if s.cycle_momentum and momentum_key(cfg.optim) is None:
        raise ConfigError(f"sched.cycle_momentum=true but optim={cfg.optim.name} has neither "
                          "betas nor momentum: set sched.cycle_momentum=false.")


def _check_shape(layer: Any, shape: tuple[int, int, int], out: tuple[int, ...]) -> None:
    """Run ``layer`` on zeros of ``(2, *shape)`` and check it gives ``(2, *out)``."""
    import torch

    with torch.no_grad():
        y = layer.eval()(torch.zeros(2, *shape))
    if tuple(y.shape) != (2, *out):
        raise ValueError(f"it maps a (2, {', '.join(map(str, shape))}) map to "
                         f"{tuple(y.shape)}, not (2, {', '.join(map(str, out))})")


def _dummy_parameter() -> Any:
    import torch

    return torch.nn.Parameter(torch.zeros(1))


def _validate_sac(cfg: DictConfig) -> None:
    weights = list(cfg.sac.weights)
    if cfg.sac.enabled:
        if len(weights) != 3:
            raise ConfigError(
                f"sac.weights={weights} must have 3 entries, one per stage head "
                "(stage 1, stage 2, main), e.g. sac.weights=[0.1,0.2,0.7]."
            )
        if any(w < 0 for w in weights):
            raise ConfigError(f"sac.weights={weights} must not be negative, e.g. [0.1,0.2,0.7].")
        if not weights[-1] > 0:  # the main head predicts: with weight 0 nothing trains it
            raise ConfigError(f"sac.weights={weights}: the main head's weight (the last) must "
                              "be positive, as its predictions are the result; e.g. [0.1,0.2,0.7].")
        if not all(a < b for a, b in zip(weights, weights[1:], strict=False)):
            warnings.warn(
                f"sac.weights={weights} are not increasing; the paper requires l1 < l2 < l3 "
                "for stable learning",
                stacklevel=2,
            )


# ---------------------------------------------------------------------------- preflight


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Option names of a config group (the YAML files in ``conf/<group>/``)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _searchpath_dirs(overrides: list[str]) -> list[Path] | None:
    """Config folders a ``hydra.searchpath=[file://DIR,...]`` override adds (a user's own
    pools and datasets); None if it names one this check cannot read."""
    dirs: list[Path] = []
    for text in overrides:
        key, _, value = text.lstrip("+~").partition("=")
        if key != "hydra.searchpath":
            continue
        for item in filter(None, (v.strip().strip("'\"") for v in value.strip("[]").split(","))):
            if not item.startswith("file://"):
                return None
            dirs.append(Path(item.removeprefix("file://")))
    return dirs


def _schema_keys(node: Any) -> dict[str, Any]:
    return {f.name: f.default_factory() if callable(f.default_factory) else f.default
            for f in fields(node)}


def check_overrides(overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Catch misspelled keys, unknown group options and ``+key=`` typos before Hydra runs.

    Hydra's own errors catch these too; this gives the message a list of valid names and
    a closest match. Only plain ``key=value`` command-line overrides are checked.
    """
    extra_dirs = _searchpath_dirs(overrides)
    if extra_dirs is None:
        return  # a search path this check cannot read (pkg://): Hydra checks the names
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
            _check_group_choice(text, top, value, conf_dir, extra_dirs)
            continue
        if top in OPEN_GROUPS and len(parts) > 1:
            _check_open_key(text, parts, overrides, [conf_dir, *extra_dirs])
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


def _check_group_choice(text: str, top: str, value: str, conf_dir: Path,
                        extra_dirs: list[Path]) -> None:
    """Every option a group override names (one, or a sweep's list) must exist."""
    options = sorted({o for d in (conf_dir, *extra_dirs) for o in group_options(top, d)})
    if value.startswith("[") and top in LIST_GROUPS:  # several at once: logger=[a,b]
        value = value.strip("[]")
    elif value.startswith("["):
        raise ConfigError(
            f"override {text!r} gives the config group {top!r} a list; a group takes "
            f"one option name ({', '.join(options)}). To sweep several, run with -m "
            f"and separate them by commas: {top}={','.join(options[:2])}."
        )
    if value.startswith(("choice(", "range(", "glob(")):
        return  # a sweep function: Hydra checks each choice itself
    for one in (v.strip() for v in value.split(",")):  # a sweep: each choice must exist
        if one not in options and "${" not in one and not (one == "null" and top == "experiment"):
            raise ConfigError(_unknown(f"option {one!r} for group {top!r}", one, options,
                                       f"{top}=<option>"))


#: Config sections whose keys depend on the option chosen (each option's YAML lists them).
OPEN_GROUPS = ("pool", "optim", "sched", "logger")
#: Groups that take a list of options, merged: ``logger=[tensorboard,mlflow]``.
LIST_GROUPS = ("logger",)


def _chosen_option(group: str, overrides: list[str], conf_dir: Path) -> str | None:
    """The option of ``group`` these overrides select, else the root config's default."""
    for text in overrides:
        key, _, value = text.lstrip("+~").partition("=")
        if key == group:
            return None if "," in value else value
    for entry in OmegaConf.load(conf_dir / "config.yaml").get("defaults", []):
        if isinstance(entry, DictConfig) and group in entry:
            return str(entry[group])
    return None


def _check_open_key(text: str, parts: list[str], overrides: list[str], dirs: list[Path]
                    ) -> None:
    """``pool.<key>=...`` (likewise optim, sched): the key must be one of the chosen
    option's YAML, since Hydra adds no key to it from the command line. ``dirs``: conf/
    first, then the search path (Hydra's order)."""
    top = parts[0]
    if any(t.lstrip("+~").startswith("experiment=") for t in overrides):
        return  # a preset may choose the option itself: Hydra checks the key
    option = _chosen_option(top, overrides, dirs[0])
    found = [d / top / f"{option}.yaml" for d in dirs]
    path = next((p for p in found if p.is_file()), found[-1])
    if option is None or not path.is_file():
        return  # a sweep over options, or a user's option outside conf/: Hydra checks it
    keys = sorted(k for k in OmegaConf.load(path) if k != "defaults")
    if parts[1] not in keys:
        close = difflib.get_close_matches(parts[1], keys, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        if top == "logger":
            raise ConfigError(_logger_key_error(text, parts[1], option, path.parent, hint))
        raise ConfigError(
            f"override {text!r}: {top}={option} has no key {parts[1]!r}.{hint} Its keys are "
            f"{', '.join(keys)}. To pass another keyword argument that its layer, optimiser "
            f"or schedule takes, copy {path} under a new name into your config folder (found "
            f"through hydra.searchpath), add the key there and select it with {top}=<new name>."
        )


def _logger_key_error(text: str, key: str, option: str, folder: Path, hint: str) -> str:
    """``logger.<key>`` that the chosen tracker lacks: name the trackers that have it."""
    owners = sorted(p.stem for p in folder.glob("*.yaml") if key in OmegaConf.load(p))
    fix = (f"it is a setting of logger={' / '.join(owners)}: choose that tracker too, e.g. "
           f"logger=[{option},{owners[0]}]" if owners else "no tracker has it")
    return (f"override {text!r}: logger={option} has no key {key!r}; {fix}.{hint} See "
            "README, Tracking and tuning.")


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
    root = Path(str(OmegaConf.load(CONF_DIR / "config.yaml").paths.runs))
    for text in overrides:
        if text.lstrip("+~").startswith("paths.runs="):
            value = text.split("=", 1)[1]
            if not value.strip():  # Path("") is ".", and Hydra would put runs under "/"
                raise ConfigError("paths.runs= is empty: give the root of the run directories, "
                                  "e.g. paths.runs=runs.")
            root = Path(value)
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
