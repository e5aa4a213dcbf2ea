"""Command-line entry: ``python -m flexexp.train [overrides]`` (``-m`` for sweeps).

Kept thin on purpose: the task lives in :mod:`flexexp.trainer`, so launchers that pickle
it (joblib, submitit) import it by name instead of copying this module.
"""

from __future__ import annotations

import sys

import hydra

from flexexp.config import CONF_DIR, check_overrides, check_runs_root, register_configs
from flexexp.errors import ConfigError


def main() -> None:
    register_configs()
    try:
        check_overrides(sys.argv[1:])
        check_runs_root(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from flexexp.trainer import task  # torch loads only once the overrides are known good

    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)()


if __name__ == "__main__":
    main()
