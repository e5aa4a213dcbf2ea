"""GFGP and S3Pool (PAPER.md sec. 5): layers against their formulas, the downsample option
of the ResNet, the config keys and presets, and (slow) training on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg

from flexexp.config import validate
from flexexp.errors import ConfigError
from flexexp.models import DOWNSAMPLE_OPTIONS, BasicBlock, resnet20
from flexexp.pooling import (
    GLOBAL_POOLS,
    LOCAL_POOLS,
    GFGPGuide,
    GFGPPool2x2,
    GlobalGFGP2d,
    S3Pool2x2,
    build_local_pool,
    build_pool,
    gfgp_local_pool,
    max2x2_stride1,
    s3pool_eval,
    s3pool_indices,
    s3pool_sample,
    s3pool_train,
)

SIZES = [(2, 3, 8, 8), (2, 4, 4, 4), (3, 2, 7, 5), (1, 3, 1, 3)]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def avg2(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2, 2, ceil_mode=True)


def max2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, 2, ceil_mode=True)


# ---------------------------------------------------------------------------- GFGP


@pytest.mark.parametrize("shape", SIZES)
def test_gfgp_with_lambda_zero_is_average_pooling(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    local = GFGPPool2x2(shape[1])
    torch.testing.assert_close(local.pool_with_lambda(x, 0.0), avg2(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(local.pool_with_lambda(x, torch.zeros(shape[:2])), avg2(x),
                               atol=1e-6, rtol=0)
    glob = GlobalGFGP2d(shape[1])
    torch.testing.assert_close(glob.pool_with_lambda(x, 0.0), x.mean((2, 3)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SIZES)
def test_gfgp_with_large_lambda_approaches_max_pooling(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    local, glob = GFGPPool2x2(shape[1]), GlobalGFGP2d(shape[1])
    # the gap to the max shrinks as lambda grows: at lambda=1e3 it is below 1e-3 here
    gaps = [(local.pool_with_lambda(x, lam) - max2(x)).abs().max().item() for lam in (1, 10, 1e3)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3
    torch.testing.assert_close(glob.pool_with_lambda(x, 1e3), x.amax((2, 3)), atol=1e-3, rtol=0)


def test_gfgp_matches_its_formula_with_the_learnt_lambda():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 4, 6)
    pool = GFGPPool2x2(4)
    lam = torch.sigmoid(pool.guide.expand(F.relu(pool.guide.reduce(x.mean((2, 3))))))
    expected = torch.zeros(2, 4, 2, 3)
    for b in range(2):
        for c in range(4):
            for i in range(2):
                for j in range(3):
                    win = x[b, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].flatten()
                    expected[b, c, i, j] = (win * torch.softmax(lam[b, c] * win, 0)).sum()
    torch.testing.assert_close(pool(x), expected, atol=1e-6, rtol=1e-6)
    glob = GlobalGFGP2d(4)
    lam = glob.guide(x)
    flat = x.flatten(2)
    torch.testing.assert_close(glob(x), (flat * torch.softmax(lam[..., None] * flat, -1)).sum(-1))


def windowed_gfgp(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Reference: a softmax over each unfolded 2x2 window (padding masked to -inf)."""
    b, c, h, w = x.shape
    ph, pw = h % 2, w % 2
    xp = F.pad(x, (0, pw, 0, ph))
    pad = torch.zeros(h + ph, w + pw, dtype=torch.bool)
    pad[h:], pad[:, w:] = True, True
    ho, wo = (h + ph) // 2, (w + pw) // 2
    win = xp.reshape(b, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, ho, wo, 4)
    mask = pad.reshape(ho, 2, wo, 2).permute(0, 2, 1, 3).reshape(ho, wo, 4)
    logits = (lam[:, :, None, None, None] * win).masked_fill(mask, float("-inf"))
    return (torch.softmax(logits, -1) * win).sum(-1)


@pytest.mark.parametrize("shape", SIZES)
def test_gfgp_local_values_and_gradients_match_the_windowed_softmax(shape):
    torch.manual_seed(5)
    x = (torch.randn(*shape) * 2).requires_grad_()
    lam = (torch.rand(shape[:2]) * 3).requires_grad_()
    y, ref = gfgp_local_pool(x, lam), windowed_gfgp(x, lam)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    dx, dlam = torch.autograd.grad(y, (x, lam), g)
    rx, rlam = torch.autograd.grad(ref, (x, lam), g)
    torch.testing.assert_close(dx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dlam, rlam, atol=1e-5, rtol=1e-5)


def test_gfgp_guide_sizes_and_range():
    for channels, hidden in ((64, 32), (32, 16), (3, 1), (1, 1)):
        guide = GFGPGuide(channels)
        assert guide.reduce.weight.shape == (hidden, channels)
        assert guide.expand.weight.shape == (channels, hidden)
        lam = guide(torch.randn(5, channels, 3, 3) * 10)
        assert lam.shape == (5, channels) and ((lam > 0) & (lam < 1)).all()


@pytest.mark.parametrize("pool", [GFGPPool2x2(8), GlobalGFGP2d(8)])
def test_gfgp_gradients_reach_the_mlp(pool):
    torch.manual_seed(3)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    (pool(x) * torch.randn_like(pool(x))).sum().backward()
    for w in (pool.guide.reduce.weight, pool.guide.expand.weight):
        assert w.grad is not None and w.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_gfgp_is_numerically_safe():
    torch.manual_seed(4)
    x = (torch.randn(2, 3, 5, 5) * 1e4).requires_grad_()
    y = gfgp_local_pool(x, 1e3)  # |lambda x| ~ 1e7: exp would overflow without the max shift
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, max2(x), atol=1e-2, rtol=0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    g = GlobalGFGP2d(3)
    assert torch.isfinite(g.pool_with_lambda(x, 1e3)).all() and torch.isfinite(g(x)).all()


# ---------------------------------------------------------------------------- S3Pool


@pytest.mark.parametrize("grid", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("shape", SIZES)
def test_s3pool_shapes_match_stride2_pooling(shape, grid):
    x = torch.randn(*shape)
    pool = S3Pool2x2(grid)
    assert pool.train()(x).shape == max2(x).shape
    assert pool.eval()(x).shape == max2(x).shape


def test_s3pool_training_draws_follow_the_seed():
    x = torch.randn(4, 3, 16, 16)
    pool = S3Pool2x2(4).train()
    torch.manual_seed(0)
    a = pool(x)
    torch.manual_seed(0)
    b = pool(x)
    torch.manual_seed(1)
    c = pool(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    gen = S3Pool2x2(4, generator=torch.Generator().manual_seed(5)).train()
    first = gen(x)
    gen.generator.manual_seed(5)
    torch.testing.assert_close(gen(x), first, atol=0, rtol=0)


@pytest.mark.parametrize("shape", SIZES)
def test_s3pool_eval_is_the_documented_deterministic_form(shape):
    torch.manual_seed(6)
    x = torch.randn(*shape)
    pool = S3Pool2x2(4).eval()
    y = pool(x)
    torch.testing.assert_close(pool(x), y, atol=0, rtol=0)
    # 2x2 max at stride 1 (size kept, partial windows at the bottom/right), then 2x2 average
    h, w = shape[2:]
    m = torch.stack([torch.stack([x[:, :, i:i + 2, j:j + 2].amax((2, 3)) for j in range(w)], -1)
                     for i in range(h)], -2)
    torch.testing.assert_close(max2x2_stride1(x), m)
    torch.testing.assert_close(y, avg2(m))
    torch.testing.assert_close(s3pool_eval(x), y)


def test_s3pool_eval_is_the_expected_training_output_for_grid_2():
    torch.manual_seed(7)
    x = torch.randn(1, 2, 6, 6).expand(20000, 2, 6, 6)  # one image, drawn per sample
    sampled = S3Pool2x2(2).train()(x).mean(0, keepdim=True)
    torch.testing.assert_close(sampled, s3pool_eval(x[:1]), atol=0.05, rtol=0)


def test_s3pool_with_grid_1_is_max_pooling():
    x = torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(S3Pool2x2(1).train()(x), max2(x))


@pytest.mark.parametrize("size,grid", [(8, 2), (8, 4), (7, 3), (16, 16), (5, 2), (9, 4)])
def test_s3pool_keeps_half_of_each_grid_cell(size, grid):
    torch.manual_seed(8)
    rows = s3pool_indices(64, size, grid)
    assert rows.shape == (64, -(-size // 2))
    assert (rows.diff(dim=1) > 0).all()  # ascending, no repeats
    for start in range(0, size, grid):
        end = min(start + grid, size)
        quota = (end + 1) // 2 - (start + 1) // 2
        inside = ((rows >= start) & (rows < end)).sum(1)
        assert (inside == quota).all()
    if grid > 1:
        assert len({tuple(r) for r in rows.tolist()}) > 1  # the draws vary across samples


@pytest.mark.parametrize("shape", SIZES)
def test_s3pool_train_is_max2x2_stride1_then_sampling(shape):
    torch.manual_seed(10)
    x = torch.randn(*shape, requires_grad=True)
    rows = s3pool_indices(shape[0], shape[2], 2)
    cols = s3pool_indices(shape[0], shape[3], 3)
    y, ref = s3pool_train(x, rows, cols), s3pool_sample(max2x2_stride1(x), rows, cols)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_s3pool_sample_gathers_rows_and_columns():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)
    rows, cols = torch.tensor([[0, 3], [1, 2]]), torch.tensor([[1, 2], [0, 3]])
    y = s3pool_sample(x, rows, cols)
    for b in range(2):
        torch.testing.assert_close(y[b, 0], x[b, 0][rows[b]][:, cols[b]])


def test_pool_pair_shares_the_draw():
    x = torch.randn(3, 4, 8, 8)
    a, b = S3Pool2x2(4).train().pool_pair(x, x.clone())
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------- registries


def test_registries_build_every_pool_and_reject_unknown_names():
    assert set(LOCAL_POOLS) == {"max", "avg", "gfgp", "s3pool"}
    assert {"avg", "max", "flex", "flex_softmax", "gfgp"} <= set(GLOBAL_POOLS)
    x = torch.randn(2, 8, 6, 6)
    for name in LOCAL_POOLS:
        assert build_local_pool(name, 8, s3pool_grid=2)(x).shape == (2, 8, 3, 3)
    assert build_pool("gfgp", 8, 6, 6)(x).shape == (2, 8)
    torch.testing.assert_close(build_local_pool("max", 8)(x), max2(x))
    torch.testing.assert_close(build_local_pool("avg", 8)(x), avg2(x))
    assert build_local_pool("s3pool", 8, s3pool_grid=4).grid == 4
    with pytest.raises(ValueError, match="valid names: avg, gfgp, max, s3pool"):
        build_local_pool("stride", 8)
    with pytest.raises(ValueError, match="valid names: .*gfgp"):
        build_pool("gfp", 8, 6, 6)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        S3Pool2x2(0)


# ---------------------------------------------------------------------------- the model


@pytest.mark.parametrize("downsample", DOWNSAMPLE_OPTIONS)
@pytest.mark.parametrize("size", [8, 7, 32, 5, 4])
def test_stage_shapes_are_right_for_every_downsample(downsample, size):
    m = resnet20(in_channels=1, image_size=size, downsample=downsample, sac=True, pool="flex")
    x = torch.randn(2, 1, size, size)
    half, quarter = -(-size // 2), -(-size // 4)
    assert m.stage_shapes == [(16, size, size), (32, half, half), (64, quarter, quarter)]
    for training in (True, False):
        m.train(training)
        assert [tuple(f.shape[1:]) for f in m.forward_features(x)] == m.stage_shapes
        assert [tuple(o.shape) for o in m.forward_heads(x)] == [(2, 10)] * 3


def test_parameter_costs():
    base = n_params(resnet20())
    assert base == 269_722  # the default is unchanged
    for d in ("stride", "max", "avg", "s3pool"):
        assert n_params(resnet20(downsample=d)) == base  # parameter-free pools
    # one GFGP guide (U: C/2 x C, V: C x C/2) after the stride-1 conv of stages 2 and 3
    assert n_params(resnet20(downsample="gfgp")) - base == 2 * 32 * 16 + 2 * 64 * 32
    assert n_params(resnet20(pool="gfgp")) - base == 2 * 64 * 32
    assert n_params(resnet20(pool="max")) == base


def test_default_blocks_keep_their_modules():
    m = resnet20()
    assert all(b.pool is None for stage in m.stages for b in stage)
    assert not any("pool" in k for k in m.state_dict() if not k.startswith("heads"))
    block = resnet20(downsample="max").stages[1][0]
    assert block.conv1.stride == (1, 1) and block.shortcut.stride == 1


def _residual_off(block: BasicBlock) -> BasicBlock:
    """Zero bn2, so the block's output is relu(shortcut): the pooled identity alone."""
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    return block


def _pad(x: torch.Tensor, c_out: int) -> torch.Tensor:
    pad = c_out - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))


@pytest.mark.parametrize("name,pool", [("max", max2), ("avg", avg2)])
def test_shortcut_is_pooled_like_the_branch(name, pool):
    block = _residual_off(BasicBlock(4, 8, 2, name)).eval()
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), F.relu(pool(_pad(x, 8))))


def test_s3pool_shortcut_uses_the_branch_draw():
    block = _residual_off(BasicBlock(4, 8, 2, "s3pool", s3pool_grid=2)).train()
    x = torch.randn(3, 4, 8, 8)
    torch.manual_seed(9)
    y = block(x)
    torch.manual_seed(9)
    rows, cols = s3pool_indices(3, 8, 2), s3pool_indices(3, 8, 2)
    torch.testing.assert_close(y, F.relu(s3pool_sample(max2x2_stride1(_pad(x, 8)), rows, cols)))
    block.eval()
    torch.testing.assert_close(block(x), F.relu(s3pool_eval(_pad(x, 8))))


def test_gfgp_shortcut_uses_the_branch_lambda():
    block = _residual_off(BasicBlock(4, 8, 2, "gfgp")).eval()
    x = torch.randn(2, 4, 6, 6)
    lam = block.pool.guide(block.conv1(x))
    torch.testing.assert_close(block(x), F.relu(gfgp_local_pool(_pad(x, 8), lam)))


def test_s3pool_model_is_deterministic_in_evaluation():
    m = resnet20(in_channels=1, image_size=8, downsample="s3pool").eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.equal(a, m(x))


def test_model_rejects_unknown_downsample():
    with pytest.raises(ValueError, match="valid names: stride, max, avg, gfgp, s3pool"):
        resnet20(downsample="conv")


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("downsample", DOWNSAMPLE_OPTIONS)
def test_every_downsample_option_validates(downsample):
    cfg = make_cfg([f"model.downsample={downsample}", "model.s3pool_grid=4"])
    validate(cfg)
    assert cfg.model.downsample == downsample


@pytest.mark.parametrize("override,match", [
    (["model.downsample=conv"], r"model.downsample='conv' is unknown; valid options: stride, "
                                r"max, avg, gfgp, s3pool"),
    (["model.s3pool_grid=0"], r"model.s3pool_grid=0 must be >= 1"),
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


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("option", [
    "pool=max", "pool=gfgp", *(f"model.downsample={d}" for d in DOWNSAMPLE_OPTIONS),
])
def test_each_option_trains_on_digits(option, tmp_path):
    from flexexp.trainer import run

    cfg = make_cfg([option, "trainer.epochs=6", "trainer.progress=false", "trainer.device=cpu"])
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "completed"
    assert record["config"]["model"]["downsample"] == cfg.model.downsample
    assert record["test_acc"] > 60, f"{option}: {record['test_acc']:.1f}% (chance 10%)"
