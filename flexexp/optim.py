"""Adam with torch's own update, without ``torch.optim.Optimizer``'s start-up cost.

``torch.optim.Optimizer``'s constructor and ``step()`` go through
``torch._disable_dynamo``, whose first call imports TorchDynamo: about 1.5 s, a third of
the trainer's start-up to its first step, spent even when nothing is compiled.
:class:`Adam` runs the same arithmetic (``torch.optim.adam.adam``, the functional update
``torch.optim.Adam`` calls, with the same state tensors, so the results are
bit-identical: tested) and keeps ``torch.optim.Adam``'s state-dict format (a checkpoint
loads into either), without that wrapper. It covers what the trainer uses: one parameter
group, ``lr`` set per step through ``param_groups``, weight decay, ``zero_grad``,
``state_dict``/``load_state_dict``, and ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch.optim.adam import adam as _adam_update

from flexexp.errors import ConfigError

__all__ = ["Adam", "build_optimizer"]

# the group's hyperparameters as this torch's Adam names and defaults them (the set grew
# over torch versions), so state_dict() carries the same keys as torch.optim.Adam's
_GROUP_DEFAULTS = {name: p.default for name, p in inspect.signature(torch.optim.Adam).parameters
                   .items() if name != "params" and p.default is not inspect.Parameter.empty}
_UPDATE_KWARGS = set(inspect.signature(_adam_update).parameters)
_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _check_group(group: dict[str, Any]) -> None:
    """Refuse the options :meth:`Adam.step` does not implement (torch.optim.Adam's
    defaults are all off), whether set at construction or by a loaded state dict."""
    for key in ("amsgrad", "maximize", "capturable", "differentiable", "fused"):
        if group.get(key):
            raise ValueError(f"Adam does not support {key}=True")


class Adam:
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay)`` for one parameter group."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        params = list(params)
        if not params:
            raise ValueError("Adam got an empty parameter list")
        group = {**_GROUP_DEFAULTS, "lr": lr, "betas": tuple(betas), "eps": eps,
                 "weight_decay": weight_decay}
        _check_group(group)
        self.param_groups: list[dict[str, Any]] = [{"params": params, **group}]
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    @property
    def _params(self) -> list[torch.nn.Parameter]:
        return self.param_groups[0]["params"]

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
        g = self.param_groups[0]
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients")
            st = self.state.get(p)
            if not st:  # as torch.optim.Adam initialises it: step on the CPU, default dtype
                st = self.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        beta1, beta2 = g["betas"]
        kwargs = {"foreach": g.get("foreach"), "capturable": False, "differentiable": False,
                  "fused": None, "grad_scale": None, "found_inf": None,
                  "has_complex": any(torch.is_complex(p) for p in params),
                  "decoupled_weight_decay": g.get("decoupled_weight_decay", False),
                  "amsgrad": False, "beta1": beta1, "beta2": beta2, "lr": g["lr"],
                  "weight_decay": g["weight_decay"], "eps": g["eps"], "maximize": False}
        _adam_update(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                     **{k: v for k, v in kwargs.items() if k in _UPDATE_KWARGS})

    def state_dict(self) -> dict[str, Any]:
        """The format of ``torch.optim.Adam.state_dict()``: parameters by index."""
        index = {p: i for i, p in enumerate(self._params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[p]: dict(st) for p, st in self.state.items()},
                "param_groups": [{**group, "params": list(range(len(self._params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.Adam`` (one group)."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != 1 or len(groups[0]["params"]) != len(self._params):
            raise ValueError(
                f"the optimizer state has {len(groups)} parameter group(s) with "
                f"{[len(g['params']) for g in groups]} parameters; this Adam has one group "
                f"of {len(self._params)}: it belongs to another model")
        by_id = dict(zip(groups[0]["params"], self._params, strict=True))
        state = {}
        for i, st in state_dict["state"].items():
            p = by_id[i]
            if any(k not in st for k in ("step", *_STATE_KEYS)):
                raise ValueError(f"the optimizer state of parameter {i} lacks "
                                 f"{sorted({'step', *_STATE_KEYS} - set(st))}")
            state[p] = {"step": st["step"].detach().clone(),
                        **{k: st[k].detach().to(p.device, p.dtype).clone() for k in _STATE_KEYS}}
        loaded = {k: v for k, v in groups[0].items() if k != "params" and k in self.param_groups[0]}
        _check_group(loaded)
        self.state = state
        self.param_groups[0].update(loaded)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer | Adam:
    """The optimiser ``optim`` names, over ``model``'s parameters."""
    o = cfg.optim
    if o.name == "adam":
        # torch.optim.Adam's arithmetic and state format, without importing TorchDynamo
        # at start-up (flexexp/optim.py)
        return Adam(model.parameters(), lr=o.lr, betas=tuple(o.betas),
                    weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                               nesterov=o.nesterov, weight_decay=o.weight_decay)
    raise ConfigError(f"optim.name={o.name!r} is unknown; use optim=adam or optim=sgd.")
