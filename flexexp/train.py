"""Command-line entry: ``python -m flexexp.train [overrides]`` (``-m`` for sweeps).

Kept thin on purpose: the task lives in :mod:`flexexp.task`, so launchers that pickle
it (joblib, submitit) import it by name instead of copying this module.
"""

from __future__ import annotations

import os
import sys

import hydra

from flexexp.config import CONF_DIR, check_overrides, check_runs_root, register_configs
from flexexp.errors import ConfigError


def main() -> None:
    register_configs()
    try:
        check_overrides(sys.argv[1:])
        check_runs_root(sys.argv[1:])
        _torchrun_arguments()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from flexexp.task import SWEEP_LOG_ENV, summary, task  # torch loads only now

    os.environ.pop(SWEEP_LOG_ENV, None)
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)()
    finally:
        failed = _sweep_summary(os.environ.get(SWEEP_LOG_ENV), summary)
    if failed:
        sys.exit(1)


def _sweep_summary(path: str | None, summary) -> int:
    """Print a sweep's summary (every cell that did not complete); their number."""
    if not path or not os.path.exists(path):
        return 0
    text, failed = summary(path)
    print(text, file=sys.stderr if failed else sys.stdout)
    return failed


def _torchrun_arguments() -> None:
    """Under torchrun all ranks share one run directory; only rank 0 writes Hydra's files."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        raise ConfigError(
            "torchrun runs one training job over several processes; a sweep (-m) under it "
            "would run the whole sweep in every process. Drop -m, or launch the sweep "
            "without torchrun (hydra/launcher=submitit_slurm runs one job per cell)."
        )
    if os.environ.get("RANK", "0") != "0":
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


if __name__ == "__main__":
    main()
