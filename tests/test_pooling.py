"""FlexPool and the pool registry against their formulas (PAPER.md sec. 1)."""

import pytest
import torch

from flexexp.pooling import GLOBAL_POOLS, FlexPool2d, build_pool


@pytest.mark.parametrize("normalize", [None, "softmax"])
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (3, 16, 32, 32), (1, 5, 3, 7)])
def test_flexpool_equals_average_pooling_at_init(normalize, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    pool = FlexPool2d(*shape[1:], normalize=normalize)
    y = pool(x)
    assert y.shape == shape[:2]
    torch.testing.assert_close(y, x.mean((2, 3)), atol=1e-6, rtol=0)


def test_flexpool_forward_is_weighted_sum():
    torch.manual_seed(1)
    pool = FlexPool2d(4, 3, 5)
    with torch.no_grad():
        pool.weight.copy_(torch.randn(4, 3, 5))
    x = torch.randn(2, 4, 3, 5)
    expected = torch.zeros(2, 4)
    for b in range(2):
        for c in range(4):
            expected[b, c] = sum(pool.weight[c, i, j] * x[b, c, i, j]
                                 for i in range(3) for j in range(5))
    torch.testing.assert_close(pool(x), expected, atol=1e-5, rtol=1e-5)


def test_penalty_is_zero_at_init_and_eq2_after_change():
    pool = FlexPool2d(6, 4, 4)
    assert pool.regularization().item() == pytest.approx(0.0, abs=1e-10)
    torch.manual_seed(2)
    with torch.no_grad():
        pool.weight.add_(torch.randn_like(pool.weight) * 0.1)
    w = pool.weight.detach()
    expected = sum((w[k].sum().item() - 1.0) ** 2 for k in range(6))  # Eq. 2 as printed
    assert pool.regularization().item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_softmax_variant_has_zero_penalty_and_positive_weights():
    pool = FlexPool2d(3, 4, 4, normalize="softmax")
    with torch.no_grad():
        pool.weight.normal_()
    eff = pool.effective_weight()
    assert (eff > 0).all()
    torch.testing.assert_close(eff.sum((1, 2)), torch.ones(3))
    assert pool.regularization().item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("normalize", [None, "softmax"])
def test_gradients_reach_flexpool_weights(normalize):
    pool = FlexPool2d(4, 3, 3, normalize=normalize)
    x = torch.randn(2, 4, 3, 3)
    (pool(x) * torch.randn(2, 4)).sum().backward()
    assert pool.weight.grad is not None
    assert pool.weight.grad.abs().sum() > 0
    # d y[b,c] / d W[c,i,j] = x[b,c,i,j] for the plain form
    if normalize is None:
        pool.weight.grad = None
        pool(x).sum().backward()
        torch.testing.assert_close(pool.weight.grad, x.sum(0))


def test_penalty_gradient_matches_formula():
    pool = FlexPool2d(2, 2, 2)
    with torch.no_grad():
        pool.weight.fill_(0.5)  # channel sums are 2, so dR/dW = 2 * (2 - 1) = 2
    pool.regularization().backward()
    torch.testing.assert_close(pool.weight.grad, torch.full((2, 2, 2), 2.0))


def test_registry_builds_every_pool_and_rejects_unknown_names():
    x = torch.randn(2, 8, 4, 4)
    for name in GLOBAL_POOLS:
        assert build_pool(name, 8, 4, 4)(x).shape == (2, 8)
    torch.testing.assert_close(build_pool("max", 8, 4, 4)(x), x.amax((2, 3)))
    with pytest.raises(ValueError, match="valid names: .*avg.*flex"):
        build_pool("flexx", 8, 4, 4)


def test_flexpool_rejects_wrong_map_size():
    with pytest.raises(ValueError, match=r"built for maps of shape"):
        FlexPool2d(8, 4, 4)(torch.randn(1, 8, 5, 5))


def test_flexpool_is_a_drop_in_layer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), FlexPool2d(8, 6, 6),
                              torch.nn.Linear(8, 2))
    assert net(torch.randn(4, 3, 6, 6)).shape == (4, 2)
