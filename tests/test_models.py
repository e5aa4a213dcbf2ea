"""ResNet20 shapes and parameter counts (He et al.; PAPER.md sec. 2-3)."""


import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within, avg2, avg2_bound, max2, n_params, net, softmax_sum_bound

from flexexp.models import (
    DOWNSAMPLE_OPTIONS,
    BasicBlock,
    CifarResNet,
    make_local_pool,
    resnet,
    resnet20,
)
from flexexp.pooling import (
    gfgp_local_pool,
    max2x2_stride1,
    s3pool_eval,
    s3pool_indices,
    s3pool_sample,
)


def test_resnet20_has_027m_parameters():
    # He et al. 2016, Table 6: 0.27M; the exact count of the option-A network is 269,722
    assert n_params(resnet20(num_classes=10)) == 269_722


def test_flexpool_adds_exactly_its_weights():
    assert n_params(resnet20(pool="flex")) - n_params(resnet20()) == 64 * 8 * 8
    assert n_params(resnet20(pool="flex_softmax")) - n_params(resnet20()) == 64 * 8 * 8


@pytest.mark.parametrize("pool,pool_params", [
    ("avg", lambda c, s: 0),
    ("flex", lambda c, s: c * s * s),
])
def test_sac_adds_its_heads_and_nothing_else(pool, pool_params):
    base = n_params(resnet20(pool=pool))
    sac = n_params(resnet20(pool=pool, sac=True))
    heads = sum(c * 10 + 10 + pool_params(c, s) for c, s in [(16, 32), (32, 16)])
    assert sac - base == heads


def test_forward_shapes_and_heads():
    x = torch.randn(3, 3, 32, 32)
    m = resnet20(pool="flex", sac=True).eval()
    assert m(x).shape == (3, 10)
    outs = m.forward_heads(x)
    assert [o.shape for o in outs] == [(3, 10)] * 3
    assert torch.equal(outs[-1], m(x))  # the same operations on the same numbers
    assert [p.weight.shape for _, p in m.flex_pools()] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_greyscale_and_small_inputs():
    m = resnet20(num_classes=7, in_channels=1, image_size=8, pool="flex").eval()
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    assert m.stage_shapes == [(16, 8, 8), (32, 4, 4), (64, 2, 2)]


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56])
def test_depths(depth):
    m = resnet(depth)
    convs = sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
    linears = sum(isinstance(x, torch.nn.Linear) for x in m.modules())
    assert convs + linears == depth


def test_invalid_depth_and_size_are_clear():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)
    with pytest.raises(ValueError, match="too small"):
        CifarResNet(image_size=2)


def test_regularization_sums_every_flexpool():
    m = resnet20(pool="flex", sac=True)
    with torch.no_grad():
        for _, p in m.flex_pools():
            p.weight.mul_(2.0)  # every channel now sums to 2: penalty 1 per channel
    # 2/(H*W) with H*W = 1024, 256, 64 is dyadic: every channel sums to exactly 2
    assert m.regularization().item() == 16 + 32 + 64
    assert resnet20().regularization().item() == 0.0


def test_dropout_sits_before_the_linear_head():
    m = resnet20(pool="flex", dropout=0.25)
    head = m.heads[-1]
    assert isinstance(head.dropout, torch.nn.Dropout) and head.dropout.p == 0.25
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m(x))  # no dropout at evaluation: the same numbers twice


# ---------------------------------------------------------------------------- the model


@pytest.mark.parametrize("downsample", DOWNSAMPLE_OPTIONS)
@pytest.mark.parametrize("size", [8, 7, 32, 5, 4])
def test_stage_shapes_are_right_for_every_downsample(downsample, size):
    m = net(in_channels=1, image_size=size, downsample=downsample, sac=True, pool="flex")
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
        assert n_params(net(downsample=d)) == base  # parameter-free pools
    # one GFGP guide per pool, the authors': 1x1 convs C -> C/2 -> C with biases and a
    # BatchNorm (weight, bias) after each, for stages 2 and 3 (C = 32, 64) or the head (64)
    def gfgp(c: int) -> int:
        return 2 * c * (c // 2) + (c // 2) + c + 2 * (c // 2) + 2 * c
    assert n_params(resnet20(downsample="gfgp")) - base == gfgp(32) + gfgp(64) == 5_552
    assert n_params(resnet20(pool="gfgp")) - base == gfgp(64) == 4_384
    # guide=simple (the paper's bias-free MLP, U: C/2 x C, V: C x C/2)
    simple = resnet20(downsample="gfgp", downsample_kwargs={"guide": "simple"})
    assert n_params(simple) - base == 2 * 32 * 16 + 2 * 64 * 32
    assert n_params(resnet20(pool="gfgp", pool_kwargs={"guide": "simple"})) - base == 2 * 64 * 32
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
    block = _residual_off(BasicBlock(4, 8, 2, make_local_pool(name))).eval()
    x = torch.randn(2, 4, 6, 6)
    # bn2 = 0 * z + 0 is exactly 0; the block pools before padding, the reference after
    assert_within(block(x), F.relu(pool(_pad(x, 8))), avg2_bound(_pad(x, 8)), name)


def test_s3pool_shortcut_uses_the_branch_draw():
    # per-image draws (draw=image), so s3pool_indices(3, ...) repeats them
    block = _residual_off(BasicBlock(4, 8, 2, make_local_pool("s3pool", grid=2, draw="image"))
                          ).train()
    x = torch.randn(3, 4, 8, 8)
    torch.manual_seed(9)
    y = block(x)
    torch.manual_seed(9)
    rows, cols = s3pool_indices(3, 8, 2), s3pool_indices(3, 8, 2)
    assert torch.equal(y, F.relu(s3pool_sample(max2x2_stride1(_pad(x, 8)), rows, cols)))
    block.eval()
    assert_within(block(x), F.relu(s3pool_eval(_pad(x, 8))),
                  avg2_bound(max2x2_stride1(_pad(x, 8))), "s3pool eval")


def test_gfgp_shortcut_uses_the_branch_lambda():
    # the pool right after conv1 (after_block=False), not GFGP's default at the block's end
    block = _residual_off(BasicBlock(4, 8, 2, make_local_pool(
        "gfgp", guide="simple", after_block=False))).eval()
    x = torch.randn(2, 4, 6, 6)
    lam = block.pool.guide(block.conv1(x))
    big = x.abs().max().item()  # lam in (0, 1)
    assert_within(block(x), F.relu(gfgp_local_pool(_pad(x, 8), lam)),
                  2 * softmax_sum_bound(big, 4, big, x.dtype), "gfgp")


def test_s3pool_model_is_deterministic_in_evaluation():
    m = net(in_channels=1, image_size=8, downsample="s3pool").eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.equal(a, m(x))


def test_model_rejects_unknown_downsample():
    with pytest.raises(ValueError, match="unknown local pool 'conv'; valid names: avg, gfgp, "
                                         "max, s3pool, or the import path of a class"):
        resnet20(downsample="conv")
