"""What a later cell of a sweep takes over from an earlier one in the same process.

Hydra's basic launcher runs a multirun's cells one after another in one process, and a
joblib worker runs several. Two things cost seconds to build and do not depend on the
cell's seed, so they are kept for the next cell:

- the **decoded dataset** (:func:`arrays`), keyed by the whole ``dataset`` section;
- the **model and its compiled step** (:func:`model_and_forward`), keyed by everything
  the model's structure and its compiled graph depend on: the ``model``, ``pool`` and
  ``sac`` sections, the dataset's shape, the device and the :class:`~flexexp.engine.Speed`.
  A later cell with the same key gets the same module objects with the weights of its
  own fresh initialisation copied in (``load_state_dict``: parameters and buffers), so
  it starts from exactly the weights a fresh model would have; the compiled graph (and
  its CUDA graphs) guard on the modules, not on the values, and are not built again.

One of each is kept (the last), so a sweep holds no more memory than one cell. The
record of each cell says what it reused (``setup_reused``). Under torchrun nothing is
kept: a data-parallel job runs one cell.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flexexp.data.sources import ImageArrays
from flexexp.engine import Dist, Speed, forward_module
from flexexp.models import CifarResNet

__all__ = ["arrays", "data_fingerprint", "model_and_forward", "clear"]

_kept: dict[str, tuple[str, Any]] = {}


def clear() -> None:
    """Forget what was kept (tests; a caller that needs the memory back)."""
    _kept.clear()


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def arrays(dataset: DictConfig, load: Callable[[Any], ImageArrays]) -> tuple[ImageArrays, bool]:
    """``load(dataset)``'s arrays, or the last cell's when its dataset section was the
    same; ``(arrays, reused)``."""
    key = _key(OmegaConf.to_container(dataset, resolve=True))
    kept = _kept.get("arrays")
    if kept is not None and kept[0] == key:
        return kept[1], True
    _kept.pop("arrays", None)  # free the old split before decoding the new one
    _kept.pop("fingerprint", None)
    value = load(OmegaConf.to_object(dataset))
    _kept["arrays"] = (key, value)
    return value, False


def data_fingerprint(value: ImageArrays) -> str:
    """:func:`~flexexp.data.sources.fingerprint` of ``value``, computed once per arrays."""
    from flexexp.data.sources import fingerprint

    kept = _kept.get("fingerprint")
    if kept is not None and kept[0] == id(value):
        return kept[1]
    digest = fingerprint(value)
    _kept["fingerprint"] = (id(value), digest)
    return digest


def model_and_forward(cfg: DictConfig, build: Callable[[DictConfig], CifarResNet],
                      device: torch.device, speed: Speed, dist: Dist
                      ) -> tuple[CifarResNet, torch.nn.Module, bool]:
    """This cell's model (freshly initialised by ``build(cfg)`` after seeding with
    ``cfg.seed``, the same on every rank; on the device) and its step's forward
    (:func:`~flexexp.engine.forward_module`); ``(model, forward, reused)``."""
    torch.manual_seed(cfg.seed)
    fresh = build(cfg).to(device, memory_format=speed.memory_format)
    if dist.world > 1:
        return fresh, forward_module(cfg, fresh, device, dist, speed.compile), False
    d = cfg.dataset
    key = _key(OmegaConf.to_container(cfg.model, resolve=True),
               OmegaConf.to_container(cfg.pool, resolve=True),
               OmegaConf.to_container(cfg.sac, resolve=True),
               [d.in_channels, d.image_size, d.num_classes], str(device), repr(speed),
               repr(fresh))  # the module tree with each layer's settings
    kept = _kept.get("model")
    if kept is not None and kept[0] == key:
        model, forward = kept[1]
        model.load_state_dict(fresh.state_dict())
        return model, forward, True
    _kept.pop("model", None)
    if speed.compile != "none":
        _allow_recompiles()
    forward = forward_module(cfg, fresh, device, dist, speed.compile)
    _kept["model"] = (key, (fresh, forward))
    return fresh, forward, False


def _allow_recompiles(limit: int = 256) -> None:
    """A sweep compiles one graph per model structure and batch shape: more than
    TorchDynamo's default of 8 per function, past which it would run the rest eagerly."""
    import torch._dynamo

    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, limit)
    else:  # torch < 2.6
        config.cache_size_limit = max(config.cache_size_limit, limit)
