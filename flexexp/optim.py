"""Adam with torch's own update, without ``torch.optim.Optimizer``'s start-up cost.

``torch.optim.Optimizer``'s constructor and ``step()`` go through
``torch._disable_dynamo``, whose first call imports TorchDynamo: about 1.5 s, a third of
the trainer's start-up to its first step, spent even when nothing is compiled.
:class:`Adam` runs the same arithmetic (``torch.optim.adam.adam``, the functional update
``torch.optim.Adam`` calls, with the same state tensors, so the results are
bit-identical: tested) and keeps ``torch.optim.Adam``'s state-dict format (a checkpoint
loads into either), without that wrapper. It covers what the trainer uses: parameter
groups (as torch's: a list of parameters, or of dicts with ``params`` and per-group
options), ``lr`` set per step through ``param_groups``, weight decay (L2, or decoupled
as AdamW with ``decoupled_weight_decay=True``), ``zero_grad``,
``state_dict``/``load_state_dict``, and ``torch.amp.GradScaler``.

:func:`build_optimizer` builds the optimiser a config's ``optim`` section names, with
the parameters ``optim.no_decay`` lists (``bn``, ``bias``, ``pool``) in a second group
without weight decay.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch.optim.adam import adam as _adam_update

from flexexp.errors import ConfigError

__all__ = [
    "Adam", "build_optimizer", "param_groups", "no_decay_parameters", "OPTIMIZERS",
    "OPTIM_SHARED_KEYS", "NO_DECAY_KINDS",
]

# the group's hyperparameters as this torch's Adam names and defaults them (the set grew
# over torch versions), so state_dict() carries the same keys as torch.optim.Adam's
_GROUP_DEFAULTS = {name: p.default for name, p in inspect.signature(torch.optim.Adam).parameters
                   .items() if name != "params" and p.default is not inspect.Parameter.empty}
_UPDATE_KWARGS = set(inspect.signature(_adam_update).parameters)
_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _check_values(group: dict[str, Any]) -> None:
    """The ranges torch.optim.Adam's constructor checks, with its messages."""
    betas = list(group["betas"])
    numbers = [group["lr"], group["eps"], group["weight_decay"], *betas]
    if len(betas) != 2 or any(isinstance(v, bool) or not isinstance(v, int | float)
                              for v in numbers):
        raise ValueError(f"Adam takes numbers for lr, eps, weight_decay and two betas, got "
                         f"lr={group['lr']!r}, eps={group['eps']!r}, "
                         f"weight_decay={group['weight_decay']!r}, betas={betas!r}")
    for key in ("lr", "eps", "weight_decay"):
        if group[key] < 0:
            raise ValueError(f"Invalid {key} value: {group[key]}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def _check_group(group: dict[str, Any]) -> None:
    """Refuse the options :meth:`Adam.step` does not implement (torch.optim.Adam's
    defaults are all off), whether set at construction or by a loaded state dict."""
    for key in ("amsgrad", "maximize", "capturable", "differentiable"):
        if group.get(key):
            raise ValueError(f"Adam does not support {key}=True")


class Adam:
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay, decoupled_weight_decay)``:
    ``params`` is an iterable of parameters or of groups (dicts with ``params`` and any
    of the options, which override the defaults given here for that group)."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 fused: bool = False) -> None:
        items = list(params)
        if not items:
            raise ValueError("Adam got an empty parameter list")
        groups = items if isinstance(items[0], dict) else [{"params": items}]
        defaults = {**_GROUP_DEFAULTS, "lr": lr, "betas": tuple(betas), "eps": eps,
                    "weight_decay": weight_decay}
        if decoupled_weight_decay:  # torch's Adam has the option since 2.7 (AdamW's update)
            if "decoupled_weight_decay" not in _GROUP_DEFAULTS:
                raise ValueError("this torch's Adam has no decoupled_weight_decay; update torch")
            defaults["decoupled_weight_decay"] = True
        if fused:  # torch's fused kernel: one launch for every parameter of a group
            defaults["fused"] = True
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            _check_values({**defaults, **g})
            group = {**defaults, **{k: v for k, v in g.items() if k != "params"}}
            group["betas"] = tuple(group["betas"])
            _check_group(group)
            self.param_groups.append({"params": list(g["params"]), **group})
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    @property
    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            self._step_group(g)

    def _step_group(self, g: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients")
            st = self.state.get(p)
            if not st:  # as torch.optim.Adam initialises it: step on the CPU, default dtype
                st = self.state[p] = {  # (fused: on the parameter's device, float32)
                    "step": torch.zeros((), dtype=torch.float32, device=p.device) if g.get("fused")
                    else torch.tensor(0.0, dtype=torch.get_default_dtype()),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        beta1, beta2 = g["betas"]
        kwargs = {"foreach": g.get("foreach"), "capturable": False, "differentiable": False,
                  "fused": g.get("fused") or None, "grad_scale": None, "found_inf": None,
                  "has_complex": any(torch.is_complex(p) for p in params),
                  "decoupled_weight_decay": g.get("decoupled_weight_decay", False),
                  "amsgrad": False, "beta1": beta1, "beta2": beta2, "lr": g["lr"],
                  "weight_decay": g["weight_decay"], "eps": g["eps"], "maximize": False}
        _adam_update(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                     **{k: v for k, v in kwargs.items() if k in _UPDATE_KWARGS})

    def state_dict(self) -> dict[str, Any]:
        """The format of ``torch.optim.Adam.state_dict()``: parameters numbered across the
        groups, in order."""
        index = {p: i for i, p in enumerate(self._params)}
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return {"state": {index[p]: dict(st) for p, st in self.state.items()},
                "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.Adam`` (same groups)."""
        groups = state_dict.get("param_groups", [])
        ours = [len(g["params"]) for g in self.param_groups]
        if [len(g["params"]) for g in groups] != ours:
            raise ValueError(
                f"the optimizer state has {len(groups)} parameter group(s) with "
                f"{[len(g['params']) for g in groups]} parameters; this Adam has {len(ours)} "
                f"of {ours}: it belongs to another model or another optim.no_decay")
        by_id = dict(zip([i for g in groups for i in g["params"]], self._params, strict=True))
        fused = any(g.get("fused") for g in self.param_groups)
        state = {}
        for i, st in state_dict["state"].items():
            p = by_id[i]
            if any(k not in st for k in ("step", *_STATE_KEYS)):
                raise ValueError(f"the optimizer state of parameter {i} lacks "
                                 f"{sorted({'step', *_STATE_KEYS} - set(st))}")
            step = st["step"].detach().clone()  # where torch's Adam keeps it (see _step_group)
            step = step.to(p.device, torch.float32) if fused else step.cpu()
            state[p] = {"step": step,
                        **{k: st[k].detach().to(p.device, p.dtype).clone() for k in _STATE_KEYS}}
        loaded = [{k: v for k, v in g.items() if k not in ("params", "fused") and k in mine}
                  for g, mine in zip(groups, self.param_groups, strict=True)]
        for group in loaded:
            _check_group(group)
        self.state = state
        for mine, group in zip(self.param_groups, loaded, strict=True):
            mine.update(group)


def _adam(groups: list[dict[str, Any]], lr: float, weight_decay: float,
          betas: list[float], decoupled_weight_decay: bool = False, fused: bool = False) -> Adam:
    # torch.optim.Adam's arithmetic and state format, without importing TorchDynamo at
    # start-up; decoupled_weight_decay=true makes it AdamW
    return Adam(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay, fused=fused)


def _sgd(groups: list[dict[str, Any]], lr: float, weight_decay: float, momentum: float,
         nesterov: bool, fused: bool = False) -> torch.optim.Optimizer:
    if not isinstance(nesterov, bool):  # a string would be truthy: nesterov on by accident
        raise TypeError(f"SGD's nesterov must be true or false, got {nesterov!r}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay, fused=fused or None)


#: Optimisers by ``optim.name``: ``factory(groups, lr, weight_decay, **kwargs)``, the
#: kwargs being the optim section's other keys (those listed in OPTIM_SHARED_KEYS aside).
OPTIMIZERS: dict[str, Any] = {"adam": _adam, "sgd": _sgd}
#: Keys every optim section has; the rest are its optimiser's keyword arguments.
OPTIM_SHARED_KEYS = ("name", "lr", "weight_decay", "no_decay")
#: What ``optim.no_decay`` may list: BatchNorm affine parameters, every bias, and the
#: parameters of every pool (modules named ``pool``: each head's global pool and each
#: block's local pool).
NO_DECAY_KINDS = ("bn", "bias", "pool")


def no_decay_parameters(model: torch.nn.Module, kinds: Iterable[str]) -> set[int]:
    """``id`` of each parameter of ``model`` that ``kinds`` exempts from weight decay."""
    kinds = set(kinds)
    skip: set[int] = set()
    for name, module in model.named_modules():
        if "bn" in kinds and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            skip |= {id(p) for p in module.parameters(recurse=False)}
        if "pool" in kinds and name.rsplit(".", 1)[-1] == "pool":
            skip |= {id(p) for p in module.parameters()}
    if "bias" in kinds:
        skip |= {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    return skip


def param_groups(model: torch.nn.Module, no_decay: Iterable[str]) -> list[dict[str, Any]]:
    """One group of every parameter, or, with ``no_decay``, the decayed ones and a second
    group with ``weight_decay=0`` (in the model's parameter order within each)."""
    skip = no_decay_parameters(model, no_decay)
    params = list(model.parameters())
    if not skip:
        return [{"params": params}]
    groups = [{"params": [p for p in params if id(p) not in skip]},
              {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: DictConfig, model: torch.nn.Module,
                    fused: bool = False) -> torch.optim.Optimizer | Adam:
    """The optimiser ``optim`` names, over ``model``'s parameters (validated config);
    ``fused``: its fused kernel (a speed setting the trainer turns on for GPUs)."""
    o = cfg.optim
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={o.name!r} is unknown; valid names: "
                          f"{', '.join(sorted(OPTIMIZERS))}.")
    kwargs = {k: v for k, v in o.items() if k not in OPTIM_SHARED_KEYS}
    factory = OPTIMIZERS[o.name]
    if fused and "fused" in inspect.signature(factory).parameters:
        kwargs.setdefault("fused", True)  # optim.fused=false (a user's key) keeps it off
    return factory(param_groups(model, o.no_decay), lr=o.lr, weight_decay=o.weight_decay,
                   **kwargs)
