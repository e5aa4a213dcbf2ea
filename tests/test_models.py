"""ResNet20 shapes and parameter counts (He et al.; PAPER.md sec. 2-3)."""

import pytest
import torch

from flexexp.models import CifarResNet, resnet, resnet20


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


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
