"""Config composition, validation messages, cell identity, the LR and momentum schedule."""

import math

import pytest
import torch
from helpers import gamma, make_cfg
from omegaconf import open_dict

from flexexp.config import GROUPS, cell_hash, cell_name, check_overrides, group_options, validate
from flexexp.engine import learning_rate, momentum, momentum_key, onecycle_lr, onecycle_momentum
from flexexp.errors import ConfigError
from flexexp.models import DOWNSAMPLE_OPTIONS


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_group_option_composes_and_validates(group):
    for option in group_options(group):
        cfg = make_cfg([f"{group}={option}"])
        validate(cfg)
        if group in ("dataset", "pool", "sac", "optim", "sched"):
            assert cfg[group].name == option  # the option name is recorded as selected


def test_defaults_follow_the_paper():
    cfg = make_cfg(["dataset=cifar10"])
    assert cfg.optim.name == "adam" and cfg.optim.lr == 0.1
    assert cfg.sched.name == "onecycle"
    assert cfg.trainer.batch_size == 1000 and cfg.trainer.epochs == 100
    assert list(cfg.sac.weights) == [0.1, 0.2, 0.7]
    assert make_cfg(["pool=flex_reg_dropout"]).pool.dropout == 0.25
    assert make_cfg(["dataset=digits"]).trainer.batch_size == 128  # the dataset's own
    assert make_cfg(["dataset=digits", "trainer.batch_size=64"]).trainer.batch_size == 64


@pytest.mark.parametrize("name,classes,channels", [
    ("cifar10", 10, 3), ("cifar100", 100, 3), ("fashion_mnist", 10, 1),
    ("tiny_imagenet", 200, 3), ("digits", 10, 1),
])
def test_dataset_shapes(name, classes, channels):
    d = make_cfg([f"dataset={name}"]).dataset
    assert (d.num_classes, d.in_channels) == (classes, channels)
    assert d.image_size == (8 if name == "digits" else 32)


@pytest.mark.parametrize("override,match", [
    (["trainer.epochs=0"], r"trainer.epochs=0 is outside its range \[1, inf\)"),
    (["trainer.batch_size=-5"], r"trainer.batch_size=-5 is outside its range \[1, inf\)"),
    (["optim.lr=0"], r"optim.lr=0 is outside its range \(0, 1e\+06\]"),
    (["sac=on", "sac.weights=[0.5,0.5]"], "must have 3 entries"),
    (["sac=on", "sac.weights=[-0.1,0.2,0.7]"], r"sac.weights\[0\]=-0.1 is outside its range"),
    (["dataset.image_size=2"], "dataset.image_size=2: image_size 2 is too small"),
    (["trainer.device=tpu"], "is not a device"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is unknown"),
    (["trainer.compile=fast"], "trainer.compile='fast' is unknown: use auto .* reduce-overhead"),
    (["trainer.channels_last=maybe"], "trainer.channels_last='maybe' is unknown"),
    (["trainer.gpu_policy=random"], "trainer.gpu_policy='random' is unknown: use least_used or "
                                    "round_robin"),
    (["pool.dropout=1.5"], r"pool.dropout=1.5 is outside its range \[0, 1\)"),
    (["model.depth=21"], r"model.depth=21: ResNet depth must be one of 8, 14, 20.*\(6n\+2"),
    (["dataset=cifar10", "dataset.mean=[0.5,0.5]"], "one value per channel"),
    (["dataset.scale=[0.1,0.2,0.7]"], r"must be a range of two numbers \[min, max\]"),
    # the open sections (pool, optim, sched) check their values' types too
    (["pool.reg=true"], r"pool.reg=True must be a number"),
    (["optim=sgd", "optim.nesterov=no"], r"optim.nesterov='no': SGD's nesterov must be true or "
                                         r"false"),
    (["model.downsample=s3pool", "model.local_pool_args.s3pool.grid=2.5"],
     r"model.local_pool_args.s3pool.grid=2.5.*: S3Pool2x2: grid must be an integer"),
    # a layer is built at the main head's real shape and must map it to (B, C)
    (["dataset.image_size=32", "pool.layer=torch.nn.Identity"],
     r"pool.layer='torch.nn.Identity' with no arguments: it maps a \(2, 64, 8, 8\) map to "
     r"\(2, 64, 8, 8\), not \(2, 64\)"),
])
def test_validation_names_key_and_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(override))


def test_non_increasing_sac_weights_warn():
    with pytest.warns(UserWarning, match="not increasing"):
        validate(make_cfg(["sac=on", "sac.weights=[0.7,0.2,0.1]"]))


@pytest.mark.parametrize("overrides,match", [
    (["pool=flx"], r"Unknown option 'flx' for group 'pool'. Did you mean 'flex'"),
    (["dataset=cifar"], r"Valid names: .*cifar10.*cifar100"),
    (["trainer.epoch=3"], r"Did you mean 'epochs'"),
    (["optim.learning_rate=1"], r"optim=adam has no key .learning_rate.. Its keys are betas, lr"),
    (["+trainer.foo=1"], r"bypasses the schema"),
    (["pool=[0.1,0.2,0.7]"], r"gives the config group 'pool' a list.*pool=avg,flex"),
    (["pool=null"], r"Unknown option 'null' for group 'pool'"),
])
def test_check_overrides_rejects_typos(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_overrides(overrides)


def test_check_overrides_accepts_valid_and_sweep_syntax():
    check_overrides(["pool=flex", "sac=on", "trainer.epochs=3", "pool=avg,flex",
                     "seed=range(3)", "hydra.verbose=true", "-m", "experiment=demo"])


def test_cell_identity():
    a = make_cfg(["pool=flex", "sac=on"])
    assert cell_name(a).startswith("digits/flex/sac_on/seed0-")
    assert cell_hash(a) == cell_hash(make_cfg(["sac=on", "pool=flex"]))
    # anything that changes the result changes the cell ...
    assert cell_hash(a) != cell_hash(make_cfg(["pool=flex", "sac=on", "trainer.epochs=3"]))
    assert cell_hash(a) != cell_hash(make_cfg(["pool=flex", "sac=on", "seed=1"]))
    # ... where and how fast it runs does not
    same = make_cfg(["pool=flex", "sac=on", "trainer.device=cpu", "paths.runs=/x",
                     "trainer.threads=2", "dataset.root=/data", "trainer.cudnn_benchmark=false",
                     "trainer.gpu_policy=round_robin"])
    assert cell_hash(a) == cell_hash(same)
    # the aliases of the speed settings name the same cell; the settings themselves do not
    assert cell_hash(make_cfg(["trainer.compile=true"])) == \
        cell_hash(make_cfg(["trainer.compile=default"]))
    assert cell_hash(make_cfg(["trainer.compile=false"])) == \
        cell_hash(make_cfg(["trainer.compile=none"]))
    assert cell_hash(make_cfg(["trainer.compile=none"])) != cell_hash(make_cfg([]))  # auto
    assert cell_hash(make_cfg(["trainer=plain"])) != cell_hash(make_cfg([]))


@pytest.mark.parametrize("pct,total", [(0.3, 100), (0.25, 37), (0.5, 10)])
def test_onecycle_matches_torch(pct, total):
    # Both sides evaluate lr_end + (lr_start - lr_end) (1 + cos(pi t)) / 2 in float64 in
    # their own order: a dozen roundings (cos within 1 ulp, pi t moves cos by at most
    # pi u) on terms no larger than the peak LR, so they agree within gamma_16 * 0.1
    lr_tol = gamma(16, torch.float64) * 0.1
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total,
                                                pct_start=pct, cycle_momentum=False)
    for step in range(total):
        ours = onecycle_lr(step, total, 0.1, pct, 25.0, 1e4)  # torch's div factors
        assert ours == pytest.approx(sched.get_last_lr()[0], rel=0, abs=lr_tol)
        opt.step()
        sched.step()
    assert onecycle_lr(0, total, 0.1, pct, 25.0, 1e4) == pytest.approx(0.1 / 25, rel=0,
                                                                       abs=lr_tol)
    assert max(onecycle_lr(s, total, 0.1, pct, 25.0, 1e4) for s in range(total)) <= 0.1 + lr_tol
    assert not math.isnan(onecycle_lr(total - 1, total, 0.1, pct, 25.0, 1e4))


def test_unknown_schedule_and_missing_values_are_refused():
    with pytest.raises(ConfigError, match=r"sched.name='cosine' is unknown; valid names: "
                                          r"onecycle, constant"):
        validate(make_cfg(["sched.name=cosine"]))
    with pytest.raises(ConfigError, match=r"schedule 'constant': got an unexpected keyword "
                                          r"argument 'pct_start'"):
        cfg = make_cfg(["sched=constant"])
        with open_dict(cfg):
            cfg.sched.pct_start = 0.3  # a constant LR takes no one-cycle parameters
        validate(cfg)
    with pytest.raises(ConfigError, match=r"no value for dataset.flip: every key of the "
                                          r"schema needs one"):
        validate(make_cfg(["dataset.flip=???"]))


def test_no_dead_keys_and_every_default_written_once():
    """The schema holds types only (MISSING), the YAML the values; options carry only the
    keys their layer, optimiser or schedule takes."""
    import dataclasses

    from flexexp import schema

    for cls in (schema.DatasetConfig, schema.ModelConfig, schema.SacConfig,
                schema.TrainerConfig, schema.PathsConfig):
        for f in dataclasses.fields(cls):
            assert f.default == "???", f"{cls.__name__}.{f.name} has a default in the schema"
    for overrides in ([], ["optim=sgd", "sched=constant"]):
        cfg = make_cfg(overrides)
        assert "name" not in cfg.model and "s3pool_grid" not in cfg.model
        if cfg.optim.name == "adam":
            assert "momentum" not in cfg.optim and "nesterov" not in cfg.optim
        else:
            assert "betas" not in cfg.optim
        if cfg.sched.name == "constant":
            assert list(cfg.sched) == ["name"]


def test_a_run_directory_of_an_older_config_is_refused(tmp_path):
    """Removing dead keys changed every cell's hash: a directory written before is never
    reused silently, it is refused with the keys that differ."""
    import json

    from flexexp.config import cell_config
    from flexexp.trainer import run

    cfg = make_cfg(["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32",
                    "dataset.image_size=8", "trainer.batch_size=32", "trainer.epochs=1",
                    "trainer.progress=false", "trainer.device=cpu"])
    old = cell_config(cfg)
    old["model"] = {**old["model"], "name": "resnet20", "s3pool_grid": 2}
    del old["model"]["local_pool_args"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "cell.json").write_text(json.dumps({"hash": "0ld0ld00", "config": old}))
    with pytest.raises(ConfigError, match=r"holds a run of a different config \(differs in: "
                                          r"model.local_pool_args, model.name, "
                                          r"model.s3pool_grid\)"):
        run(cfg, run_dir)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("downsample", DOWNSAMPLE_OPTIONS)
def test_every_downsample_option_validates(downsample):
    cfg = make_cfg([f"model.downsample={downsample}", "model.local_pool_args.s3pool.grid=4"])
    validate(cfg)
    assert cfg.model.downsample == downsample


@pytest.mark.parametrize("override,match", [
    (["model.downsample=conv"], r"model.downsample='conv' is unknown; valid options: stride, "
                                r"max, avg, gfgp, s3pool"),
    (["model.local_pool_args.s3pool.grid=0"],
     r"model.local_pool_args.s3pool.grid=0.*: S3Pool2x2: grid must be >= 1"),
    (["model.downsample=mypkg.NoSuchPool"],
     r"importing it failed \(ModuleNotFoundError: No module named 'mypkg'\)"),
])
def test_validation_of_the_downsample_keys(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(override))


@pytest.mark.parametrize("name,pool,downsample", [
    ("pools", "avg,max,flex,flex_softmax,gfgp", "stride"),
    ("pools_local", "avg", "stride,max,avg,gfgp,s3pool"),
])
def test_pools_presets_define_the_grids(name, pool, downsample):
    cfg = make_cfg([f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert params.pool == pool and params["model.downsample"] == downsample
    assert params.seed == "0,1,2"
    assert cfg.dataset.name == "digits" and cfg.trainer.epochs == 15
    for p in pool.split(","):
        for d in downsample.split(","):
            validate(make_cfg([f"experiment={name}", f"pool={p}", f"model.downsample={d}"]))


def test_whole_numbers_in_the_open_sections_are_the_same_cell():
    """pool/optim/sched have no schema types: optim.lr=1 must name the cell optim.lr=1.0 does."""
    base = cell_hash(make_cfg([]))
    for override in ("optim.weight_decay=0", "pool.reg=0", "pool.dropout=0", "sched.div_factor=25",
                     "optim.betas=[0.9,0.999]"):
        assert cell_hash(make_cfg([override])) == base, override
    assert cell_hash(make_cfg(["optim.lr=1"])) == cell_hash(make_cfg(["optim.lr=1.0"]))
    assert cell_hash(make_cfg(["optim.lr=1"])) != base


def test_a_misspelled_option_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"pool=avg has no key 'regg'. Did you mean 'reg'\?"):
        check_overrides(["pool.regg=1"])
    # a preset may select another option than the root config's default: left to Hydra
    check_overrides(["experiment=demo", "optim.momentum=0.5"])


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
@pytest.mark.parametrize("pct,total,base,top", [(0.3, 100, 0.85, 0.95), (0.25, 37, 0.85, 0.95),
                                                (0.5, 10, 0.8, 0.9), (0.1, 7, 0.0, 0.99)])
def test_onecycle_lr_and_momentum_match_torch_step_for_step(opt_name, pct, total, base, top):
    # torch's OneCycleLR runs the same Python float operations in the same order (the
    # phase's pct, then end + (start - end) / 2.0 * (cos(pi pct) + 1)) in this process:
    # every step's lr and beta1/momentum are equal to the bit, so no tolerance is needed
    p = torch.nn.Parameter(torch.zeros(1))
    opt = (torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.999)) if opt_name == "adam"
           else torch.optim.SGD([p], lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total,
                                                pct_start=pct, base_momentum=base,
                                                max_momentum=top)  # cycle_momentum=True
    cfg = make_cfg([f"optim={opt_name}", f"sched.pct_start={pct}",
                    f"sched.base_momentum={base}", f"sched.max_momentum={top}"])
    validate(cfg)
    for step in range(total):
        g = opt.param_groups[0]
        used = g["betas"][0] if opt_name == "adam" else g["momentum"]
        assert onecycle_momentum(step, total, pct, base, top) == used, step
        assert momentum(cfg, step, total) == used and learning_rate(cfg, step, total) == g["lr"]
        if opt_name == "adam":
            assert g["betas"][1] == 0.999  # beta2 untouched
        opt.step()
        sched.step()
    assert momentum(cfg, total - 1, total) == top  # back at the top at the last step
    if pct * total > 1:  # a warm-up of two steps or more starts at the top
        assert momentum(cfg, 0, total) == top


def test_momentum_without_the_cycle_is_the_optimisers_own():
    for overrides, key, value in ((["sched.cycle_momentum=false"], "beta1", 0.9),
                                  (["sched=constant", "optim.betas=[0.8,0.99]"], "beta1", 0.8),
                                  (["optim=sgd", "sched.cycle_momentum=false"], "momentum", 0.9),
                                  (["optim=sgd", "sched=constant"], "momentum", 0.9)):
        cfg = make_cfg(overrides)
        validate(cfg)
        assert momentum_key(cfg.optim) == key
        assert {momentum(cfg, s, 50) for s in range(50)} == {value}
    assert "cycle_momentum" not in make_cfg(["sched=constant"]).sched
    assert make_cfg([]).sched.cycle_momentum is True  # torch's default


@pytest.mark.parametrize("overrides,message", [
    (["sched.base_momentum=0.96"], r"sched.base_momentum=0.96 is above sched.max_momentum=0.95"),
    (["sched.max_momentum=1.0"], r"sched.max_momentum=1.0 is outside its range \[0, 1\)"),
    (["sched.base_momentum=-0.1"], r"sched.base_momentum=-0.1 is outside its range \[0, 1\)"),
    (["sched.cycle_momentum=2"], r"sched.cycle_momentum=2 must be true or false"),
])
def test_momentum_cycle_values_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(overrides))


def test_a_constant_schedule_takes_no_momentum_keys():
    cfg = make_cfg(["sched=constant"])
    with open_dict(cfg):
        cfg.sched.cycle_momentum = True
    with pytest.raises(ConfigError, match=r"schedule 'constant': got an unexpected keyword "
                                          r"argument 'cycle_momentum'"):
        validate(cfg)
