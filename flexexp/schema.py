"""Typed schema of the Hydra config: the types of every key, no values.

Imports nothing from flexexp, so every module can use these types without an import
circle (the data sources take a :class:`DatasetConfig`). :mod:`flexexp.config` stores
:class:`Config` as ``flexexp_schema``, named first in ``conf/config.yaml``'s defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

__all__ = ["Config", "DatasetConfig", "ModelConfig", "SacConfig", "TrainerConfig",
           "PathsConfig"]

# The schema holds types; the YAML files under conf/ hold every value, once. A field is
# MISSING here because its group's YAML sets it; a YAML that leaves one out fails in
# validate() with the key's name. The pool, optim and sched sections are open mappings:
# beside their shared keys each option carries the keyword arguments of its own layer,
# optimiser or schedule, which validate() checks against what that constructor takes.


@dataclass
class DatasetConfig:
    name: str = MISSING  # the option name, e.g. cifar10 (set by conf/dataset/<name>.yaml)
    source: str = MISSING  # loader in flexexp.data.sources.DATASETS
    num_classes: int = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    flip: bool = MISSING  # random horizontal flip (off where mirroring changes the label)
    scale: list[float] = MISSING  # random zoom range
    translate: int = MISSING  # random shift of up to this many pixels
    batch_size: int = MISSING  # the dataset's own batch size; trainer.batch_size follows it
    root: str = MISSING
    download: bool = MISSING
    verify_checksums: bool = MISSING
    train_size: int | None = MISSING  # synthetic: images to make; others: null = all
    test_size: int | None = MISSING
    data_seed: int = MISSING  # synthetic data and fixed splits (the validation split too)
    # share of the training images held out as the validation split (stratified, seeded by
    # data_seed; flexexp.data.sources.split_validation); 0 = none
    val_fraction: float = MISSING


@dataclass
class ModelConfig:
    depth: int = MISSING
    width: int = MISSING
    downsample: str = MISSING  # stride | max | avg | gfgp | s3pool | module.Class
    block: str = MISSING  # he | authors (flexexp.models.BLOCKS)
    # keyword arguments of each local pool, by its model.downsample name
    local_pool_args: dict[str, dict[str, Any]] = MISSING


@dataclass
class SacConfig:
    name: str = MISSING  # on | off
    enabled: bool = MISSING
    weights: list[float] = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    device: str = MISSING  # auto | cpu | cuda
    eval_every: int = MISSING  # evaluate on the test split every N epochs (and after the last)
    threads: int = MISSING  # CPU threads for torch (0 = torch's default)
    progress: bool = MISSING  # per-epoch progress bar
    deterministic: bool = MISSING  # torch.use_deterministic_algorithms (slower on GPU)
    precision: str = MISSING  # auto | fp32 | bf16 | fp16 (autocast)
    channels_last: Any = MISSING  # auto | true | false (NHWC memory format)
    # auto | none | default | reduce-overhead | max-autotune (true/false: default/none)
    compile: Any = MISSING
    cudnn_benchmark: bool = MISSING  # CUDA: cuDNN autotuning (off when deterministic)
    gpu_policy: str = MISSING  # least_used | round_robin (machines with several GPUs)
    keep_heap: bool = MISSING  # CPU: large blocks from glibc's heap, not mmap (flexexp.runtime)


@dataclass
class PathsConfig:
    runs: str = MISSING


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # name, layer, reg, dropout, then the layer's own keyword arguments
    pool: dict[str, Any] = MISSING
    sac: SacConfig = field(default_factory=SacConfig)
    # name, lr, weight_decay, no_decay, then the optimiser's own keyword arguments
    optim: dict[str, Any] = MISSING
    # name, then the schedule's own parameters
    sched: dict[str, Any] = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # trackers: {tensorboard|csv|mlflow|wandb: true}, then the chosen trackers' settings
    # (conf/logger/*.yaml; flexexp.trackers checks them)
    logger: dict[str, Any] = MISSING
    seed: int = MISSING
    # python -m flexexp.tune: the study and its search space (flexexp/tune.py). A runtime
    # key (flexexp.config.RUNTIME_KEYS): never part of a cell's identity.
    tune: dict[str, Any] = field(default_factory=dict)
