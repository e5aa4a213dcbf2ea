"""The values of the speed settings ``trainer.compile`` and ``trainer.channels_last``.

Imports no torch: the report and the cell identity (:func:`flexexp.config.cell_config`)
read them too. What each value means on a device is :func:`flexexp.engine.resolve_speed`.
"""

from __future__ import annotations

from typing import Any

from flexexp.errors import ConfigError

__all__ = ["COMPILE_MODES", "compile_setting", "channels_last_setting"]

#: ``trainer.compile`` values: ``none`` (eager), torch.compile's own modes, and ``auto``
#: (``reduce-overhead`` on a GPU, ``none`` on a CPU); ``true``/``false`` are aliases of
#: ``default``/``none``.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
_COMPILE_ALIASES = {True: "default", False: "none", "true": "default", "false": "none"}


def compile_setting(value: Any) -> str:
    """``trainer.compile`` as written, aliases resolved (``auto`` stays ``auto``)."""
    key = value.lower() if isinstance(value, str) else value
    mode = _COMPILE_ALIASES.get(key, key) if isinstance(key, bool | str) else key
    if mode != "auto" and mode not in COMPILE_MODES:
        raise ConfigError(
            f"trainer.compile={value!r} is unknown: use auto (chosen by device), none, default, "
            "reduce-overhead (CUDA graphs) or max-autotune (true/false mean default/none)."
        )
    return mode


def channels_last_setting(value: Any) -> bool | str:
    """``trainer.channels_last`` as ``True``, ``False`` or ``"auto"``."""
    key = value.lower() if isinstance(value, str) else value
    out = {True: True, False: False, "true": True, "false": False, "auto": "auto"}.get(
        key if isinstance(key, bool | str) else None)
    if out is None:
        raise ConfigError(f"trainer.channels_last={value!r} is unknown: use auto (NHWC on a "
                          "GPU, NCHW on a CPU), true or false.")
    return out
