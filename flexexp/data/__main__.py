"""Data preparation: ``python -m flexexp.data {download,info} dataset=NAME [overrides]``.

``download`` fetches, verifies and decodes each named dataset into its cache ahead of a
sweep, so the sweep's runs never race on a download; ``info`` prints what a run would
get (shapes, classes, cache file) without downloading anything. ``dataset=`` takes one
name, several separated by commas, or ``all`` (the paper's four). Any other override
(``dataset.root=DIR``, ``dataset.image_size=64``, ``dataset.verify_checksums=false``) is
applied to each. Errors print one paragraph to stderr and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable

from omegaconf import OmegaConf

from flexexp.config import check_overrides, compose_config, register_configs
from flexexp.errors import ConfigError, FlexexpError
from flexexp.schema import DatasetConfig

USAGE = """\
usage: python -m flexexp.data download dataset=NAME[,NAME...|all] [dataset.root=DIR] [key=value ...]
       python -m flexexp.data info     dataset=NAME[,NAME...|all] [dataset.root=DIR] [key=value ...]

  download  fetch, verify and cache the datasets (run once before a sweep)
  info      print shapes, classes and the cache file of what a run would load
  NAME      cifar10, cifar100, fashion_mnist, tiny_imagenet (all = these four),
            digits, synthetic
"""


def compose_spec(name: str, overrides: list[str]) -> DatasetConfig:
    """The ``dataset`` section of the real config for ``dataset=name`` plus ``overrides``."""
    from flexexp.ranges import check_ranges

    check_overrides([f"dataset={name}", *overrides])
    cfg = compose_config([f"dataset={name}", *overrides])
    check_ranges(cfg)  # dataset.image_size=-3: a ConfigError, not a torch error
    return OmegaConf.to_object(cfg.dataset)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``(dataset names, other overrides)`` from the command line's ``key=value`` words."""
    from flexexp.data.paper import PAPER

    names: list[str] = []
    rest: list[str] = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "dataset":
            rest.append(arg)
            continue
        for name in value.split(","):
            names += list(PAPER) if name == "all" else [name] if name else []
    if not names:
        raise ConfigError("name the datasets: dataset=cifar10, dataset=cifar10,cifar100 or "
                          "dataset=all (the paper's four).")
    return list(dict.fromkeys(names)), rest


def download(spec: DatasetConfig) -> str:
    """Fetch, verify and cache one dataset; a one-line summary."""
    from flexexp.data import paper

    if spec.source not in paper.PAPER:
        return f"{spec.name}: generated in memory, nothing to download"
    spec = dataclasses.replace(spec, download=True)
    arrays, path = paper.prepare(spec.source, spec)
    arrays.check(dataclasses.replace(spec, train_size=None, test_size=None))
    return (f"{spec.name}: ready, {len(arrays.y_train)} train / {len(arrays.y_test)} test "
            f"images at {spec.image_size}x{spec.image_size}; cache {path}")


def info(spec: DatasetConfig) -> str:
    """Describe what a run of ``spec`` loads, without downloading."""
    from flexexp.data import paper
    from flexexp.data.sources import load_arrays, split_validation

    spec = dataclasses.replace(spec, download=False)
    if spec.source in paper.PAPER:
        full, path = paper.prepare(spec.source, spec)
        arrays = paper.subsample(full, spec)
        arrays.check(spec)
        arrays = split_validation(arrays, spec.val_fraction, spec.data_seed)
        where = f"data  {paper.data_root(spec) / paper.PAPER[spec.source].folder}\n  cache {path}"
    else:
        arrays = load_arrays(spec)
        where = "data  generated in memory (no files, no cache)"
    lines = [f"{spec.name} (source {spec.source}): {spec.num_classes} classes, "
             f"{spec.in_channels} channel(s), {spec.image_size}x{spec.image_size}"]
    for split, x, y in arrays.splits():
        counts = y.bincount(minlength=spec.num_classes)
        lines.append(f"  {split:5s} x {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}, "
                     f"y {tuple(y.shape)}: {int((counts > 0).sum())} classes present, "
                     f"{int(counts.min())}..{int(counts.max())} images per class")
    lines.append(f"  {where}")
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[DatasetConfig], str]] = {"download": download, "info": info}


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (0 fine, 2 a user-fixable error)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}.\n",
                  file=sys.stderr)
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    register_configs()
    try:
        names, overrides = split_args(argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    for name in names:  # one dataset failing does not stop the others
        try:
            print(COMMANDS[argv[0]](compose_spec(name, overrides)), flush=True)
        except Exception as exc:
            if not _user_error(exc):
                raise
            print(f"error: {exc}", file=sys.stderr, flush=True)
            status = 2
    return status


def _user_error(exc: Exception) -> bool:
    """Errors whose message is the whole report: ours, and Hydra's config errors."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, FlexexpError | HydraException | OmegaConfBaseException)


if __name__ == "__main__":
    sys.exit(main())
