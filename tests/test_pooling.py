"""FlexPool and the pool registry against their formulas (PAPER.md sec. 1)."""

import pytest
import torch
from helpers import assert_within, gamma, sum_error_bound

from flexexp.pooling import GLOBAL_POOLS, FlexPool2d, build_pool

SHAPES = [(2, 64, 8, 8), (3, 16, 32, 32), (1, 5, 3, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [None, "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flexpool_equals_average_pooling_at_init(normalize, shape, dtype):
    """Up to float rounding: y = sum_q fl(1/n) x_q over n = H*W positions is an inner
    product of length n, within gamma_n * sum_q |x_q| / n of the exact mean in any
    summation order, plus u * mean|x| for rounding 1/n itself (and two more roundings
    for the softmax form: exp(0) = 1 exactly, the sum n is exact, one division)."""
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 1).to(dtype)
    pool = FlexPool2d(*shape[1:], normalize=normalize, dtype=dtype)
    y = pool(x)
    assert y.shape == shape[:2] and y.dtype == dtype
    n = shape[2] * shape[3]
    x64 = x.double()
    abs_mean = x64.abs().mean((2, 3))
    bound = (sum_error_bound(abs_mean, n + 3, dtype)  # the pool, in dtype
             + sum_error_bound(abs_mean, n + 1, torch.float64))  # the float64 reference
    assert_within(y, x64.mean((2, 3)), bound, f"FlexPool vs mean, {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [None, "softmax"])
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (3, 16, 32, 32), (2, 3, 4, 2)])
def test_flexpool_equals_average_pooling_exactly_on_dyadic_inputs(normalize, shape, dtype):
    """Bit for bit where no step rounds: integer pixels in [-8, 8] and H*W a power of
    two make 1/(H*W), every product and every partial sum exact (at most 2**13 in steps
    of 2**-10, 23 significant bits), so every summation order gives the same number."""
    torch.manual_seed(0)
    x = torch.randint(-8, 9, shape).to(dtype)
    pool = FlexPool2d(*shape[1:], normalize=normalize, dtype=dtype)
    assert torch.equal(pool(x), x.mean((2, 3)))


def test_flexpool_forward_is_weighted_sum():
    torch.manual_seed(1)
    pool = FlexPool2d(4, 3, 5)
    with torch.no_grad():
        pool.weight.copy_(torch.randn(4, 3, 5))
    x = torch.randn(2, 4, 3, 5)
    w64, x64 = pool.weight.detach().double(), x.double()
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for b in range(2):
        for c in range(4):
            expected[b, c] = sum(w64[c, i, j] * x64[b, c, i, j]
                                 for i in range(3) for j in range(5))
    # an inner product of length 15 in float32 against the float64 loop
    terms = (w64 * x64).abs().sum((2, 3))
    bound = sum_error_bound(terms, 15, torch.float32) + sum_error_bound(terms, 15, torch.float64)
    assert_within(pool(x), expected, bound, "FlexPool vs its formula")


def test_penalty_is_zero_at_init_and_eq2_after_change():
    pool = FlexPool2d(6, 4, 4)
    assert pool.regularization().item() == 0.0  # 16 x 1/16: dyadic, the sum is exactly 1
    torch.manual_seed(2)
    with torch.no_grad():
        pool.weight.add_(torch.randn_like(pool.weight) * 0.1)
    w = pool.weight.detach().double()
    sums = w.sum((1, 2))
    expected = ((sums - 1.0) ** 2).sum().item()  # Eq. 2 as printed, in float64
    assert expected > 0
    # Each float32 channel sum s (16 terms, then - 1) is within e = gamma_17 * (sum|w| + 1)
    # of the exact one, so (s - 1)^2 moves by at most 2 |s - 1| e + e^2; squaring and the
    # sum over 6 channels add gamma_8 of the result.
    e = sum_error_bound(w.abs().sum((1, 2)) + 1, 17, torch.float32)
    bound = (2 * (sums - 1).abs() * e + e**2).sum().item() + gamma(8, torch.float32) * expected
    assert abs(pool.regularization().item() - expected) <= bound


def test_softmax_variant_has_zero_penalty_and_positive_weights():
    pool = FlexPool2d(3, 4, 4, normalize="softmax")
    with torch.no_grad():
        pool.weight.normal_()
    eff = pool.effective_weight()
    assert (eff > 0).all()
    # Each weight exp(z_q) / S, z_q = w_q - max_c w, is off by a relative error of at most
    # (|z_q| + 1) u for rounding z_q (e^(z + d) = e^z e^d), 2 u for exp itself (libm and
    # vectorised exp are within 1 ulp), gamma_15 for the 16-term S and u for the division;
    # adding the 16 weights, each within 1, rounds 15 more times.
    z_max = (pool.weight.detach() - pool.weight.detach().amax((1, 2), keepdim=True)).abs().max()
    k = int(z_max.ceil()) + 1 + 2 + 15 + 1 + 15
    e = sum_error_bound(1.0, k, torch.float32)
    assert_within(eff.sum((1, 2)), torch.ones(3, dtype=torch.float64), e, "softmax weights' sum")
    # Eq. 2 of channel sums within e of 1: at most e^2 for each of the 3 channels
    assert pool.regularization().item() <= 3 * e**2 * (1 + gamma(4, torch.float32))


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
        # 1 * x[0] + 1 * x[1]: one addition, which commutes exactly
        assert torch.equal(pool.weight.grad, x.sum(0))


def test_penalty_gradient_matches_formula():
    pool = FlexPool2d(2, 2, 2)
    with torch.no_grad():
        pool.weight.fill_(0.5)  # channel sums are 2, so dR/dW = 2 * (2 - 1) = 2
    pool.regularization().backward()
    assert torch.equal(pool.weight.grad, torch.full((2, 2, 2), 2.0))  # dyadic: exact


def test_registry_builds_every_pool_and_rejects_unknown_names():
    x = torch.randn(2, 8, 4, 4)
    for name in GLOBAL_POOLS:
        assert build_pool(name, 8, 4, 4)(x).shape == (2, 8)
    assert torch.equal(build_pool("max", 8, 4, 4)(x), x.amax((2, 3)))  # max does not round
    with pytest.raises(ValueError, match="valid names: .*avg.*flex"):
        build_pool("flexx", 8, 4, 4)


def test_flexpool_rejects_wrong_map_size():
    with pytest.raises(ValueError, match=r"built for maps of shape"):
        FlexPool2d(8, 4, 4)(torch.randn(1, 8, 5, 5))


def test_flexpool_is_a_drop_in_layer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), FlexPool2d(8, 6, 6),
                              torch.nn.Linear(8, 2))
    assert net(torch.randn(4, 3, 6, 6)).shape == (4, 2)
