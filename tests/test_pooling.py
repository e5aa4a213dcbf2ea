"""The pools against their formulas: FlexPool (PAPER.md sec. 1), GFGP and S3Pool (sec. 5),
and the registries that build them by name or import path."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DOWN_ARGS,
    assert_within,
    avg2,
    avg2_bound,
    gamma,
    max2,
    softmax_sum_bound,
    sum_error_bound,
)

from flexexp.pooling import (
    GLOBAL_POOLS,
    LOCAL_POOLS,
    FlexPool2d,
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


SIZES = [(2, 3, 8, 8), (2, 4, 4, 4), (3, 2, 7, 5), (1, 3, 1, 3)]


# ---------------------------------------------------------------------------- GFGP


@pytest.mark.parametrize("shape", SIZES)
def test_gfgp_with_lambda_zero_is_average_pooling(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    local = GFGPPool2x2(shape[1])
    # lam = 0: every exp is exp(0) = 1, so avgpool(x * 1) / avgpool(1) is avg2(x) / 1: the
    # same kernel on the same numbers, bit for bit
    assert torch.equal(local.pool_with_lambda(x, 0.0), avg2(x))
    assert torch.equal(local.pool_with_lambda(x, torch.zeros(shape[:2])), avg2(x))
    # global: softmax(0) = fl(1/n), then an inner product of length n (as FlexPool at init)
    glob = GlobalGFGP2d(shape[1])
    n, x64 = shape[2] * shape[3], x.double()
    abs_mean = x64.abs().mean((2, 3))
    bound = sum_error_bound(abs_mean, n + 3, x.dtype) + sum_error_bound(abs_mean, n + 1,
                                                                         torch.float64)
    assert_within(glob.pool_with_lambda(x, 0.0), x64.mean((2, 3)), bound, "GFGP lam=0")


@pytest.mark.parametrize("shape", SIZES)
def test_gfgp_with_large_lambda_approaches_max_pooling(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    local, glob = GFGPPool2x2(shape[1]), GlobalGFGP2d(shape[1])
    # the gap to the max shrinks as lambda grows
    gaps = [(local.pool_with_lambda(x, lam) - max2(x)).abs().max().item() for lam in (1, 10, 1e3)]
    assert gaps[0] > gaps[1] > gaps[2]
    # and is bounded: max - y = sum_q p_q (max - x_q) with p_q <= exp(-lam (max - x_q)),
    # and t exp(-lam t) <= 1 / (e lam), so over a window of n values the gap is at most
    # (n - 1) / (e lam); rounding adds the softmax-weighted sum's error
    lam, big = 1e3, x.abs().max().item()
    window = (min(2, shape[2]) * min(2, shape[3]))
    assert gaps[2] <= ((window - 1) / (math.e * lam)
                       + softmax_sum_bound(big, window, lam * big, x.dtype))
    n = shape[2] * shape[3]
    bound = (n - 1) / (math.e * lam) + softmax_sum_bound(big, n, lam * big, x.dtype)
    assert_within(glob.pool_with_lambda(x, lam), x.amax((2, 3)), bound, "GFGP lam=1e3")


def test_gfgp_matches_its_formula_with_the_learnt_lambda():
    # in float64, against loops that apply the printed formula; lam in (0, 1)
    torch.manual_seed(2)
    x = torch.randn(2, 4, 4, 6, dtype=torch.float64)
    pool = GFGPPool2x2(4).double()
    lam = pool.guide(x)  # the guide itself: tests/test_pools_original.py
    expected = torch.zeros(2, 4, 2, 3, dtype=torch.float64)
    for b in range(2):
        for c in range(4):
            for i in range(2):
                for j in range(3):
                    win = x[b, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].flatten()
                    expected[b, c, i, j] = (win * torch.softmax(lam[b, c] * win, 0)).sum()
    big = x.abs().max().item()  # |lam x| <= big: both sides' rounding, in float64
    assert_within(pool(x), expected, 2 * softmax_sum_bound(big, 4, big, torch.float64), "local")
    glob = GlobalGFGP2d(4).double()
    lam = glob.guide(x)
    flat = x.flatten(2)
    assert_within(glob(x), (flat * torch.softmax(lam[..., None] * flat, -1)).sum(-1),
                  2 * softmax_sum_bound(big, 24, big, torch.float64), "global")


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
    """Both forms in float64. Values: two softmax-weighted sums of a window. Gradients:
    each is a sum over the (at most 4) window terms of products of g, x, the weights and
    lam, at most ``(1 + lam max|x|)`` times the value's scale, then dlam sums over the
    whole map; the bound takes the value's per-term error and those factors."""
    torch.manual_seed(5)
    x = (torch.randn(*shape, dtype=torch.float64) * 2).requires_grad_()
    lam = (torch.rand(shape[:2], dtype=torch.float64) * 3).requires_grad_()
    y, ref = gfgp_local_pool(x, lam), windowed_gfgp(x, lam)
    big, lam_max = x.detach().abs().max().item(), lam.detach().max().item()
    value = 2 * softmax_sum_bound(big, 4, lam_max * big, torch.float64)
    assert_within(y, ref, value, "values")
    g = torch.randn_like(y)
    dx, dlam = torch.autograd.grad(y, (x, lam), g)
    rx, rlam = torch.autograd.grad(ref, (x, lam), g)
    g_max, n_map = g.abs().max().item(), shape[2] * shape[3]
    scale = g_max * (1 + lam_max * big) * (1 + big)
    per_term = 2 * softmax_sum_bound(scale, 4, lam_max * big, torch.float64)
    assert_within(dx, rx, 4 * per_term, "d/dx")
    assert_within(dlam, rlam, n_map * per_term + sum_error_bound(
        n_map * scale, n_map, torch.float64), "d/dlam")


@pytest.mark.parametrize("kind", ["original", "simple"])
def test_gfgp_guide_sizes_and_range(kind):
    for channels, hidden in ((64, 32), (32, 16), (3, 1), (1, 1)):
        guide = GFGPGuide(channels, kind)
        assert guide.reduce.weight.shape[:2] == (hidden, channels)
        assert guide.expand.weight.shape[:2] == (channels, hidden)
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
    lam = 1e3
    y = gfgp_local_pool(x, lam)  # |lambda x| ~ 1e7: exp would overflow without the max shift
    assert torch.isfinite(y).all()
    # y is a convex combination of its window, close to the max: max - y <= sum_q p_q (max -
    # x_q) <= 3 e^d / (e lam) (see above), where d <= 3 u lam max|x| is how far rounding
    # lam x_q (float32 spacing at 1e7 is ~1) can move an exponent; plus the final roundings
    big = x.detach().abs().max().item()
    d = 3 * torch.finfo(x.dtype).eps / 2 * lam * big
    bound = 3 * math.exp(d) / (math.e * lam) + sum_error_bound(big, 8, x.dtype)
    assert_within(y, max2(x), bound, "GFGP lam=1e3 at |x| ~ 1e4")
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
    # the original's: 2x2 max at stride 1 without padding (H-1 x W-1; no partial windows),
    # then a 2x2 average at stride 2, padding 1 excluded (tests/test_pools_original.py)
    h, w = shape[2:]
    m = torch.stack([torch.stack([x[:, :, i:i + 2, j:j + 2].amax((2, 3))
                                  for j in range(max(1, w - 1))], -1)
                     for i in range(max(1, h - 1))], -2)
    assert torch.equal(max2x2_stride1(x)[:, :, :max(1, h - 1), :max(1, w - 1)], m)
    ref = F.avg_pool2d(m, 2, 2, padding=1, count_include_pad=False)
    assert torch.equal(y, ref)  # the same kernel on the same numbers
    assert y.shape == max2(x).shape and torch.equal(s3pool_eval(x), y)


def test_s3pool_with_grid_1_is_max_pooling():
    x = torch.randn(2, 3, 7, 8)
    assert torch.equal(S3Pool2x2(1).train()(x), max2(x))


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
    # an input is the max of at most 4 overlapping windows: its gradient sums at most 4
    # entries of g, in an order each implementation chooses
    assert_within(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                  2 * sum_error_bound(4 * g.abs().max().item(), 4, x.dtype), "gradients")


def test_s3pool_sample_gathers_rows_and_columns():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)
    rows, cols = torch.tensor([[0, 3], [1, 2]]), torch.tensor([[1, 2], [0, 3]])
    y = s3pool_sample(x, rows, cols)
    for b in range(2):
        assert torch.equal(y[b, 0], x[b, 0][rows[b]][:, cols[b]])  # a gather does not round


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
        assert build_local_pool(name, 8, **DOWN_ARGS.get(name, {}))(x).shape == (2, 8, 3, 3)
    assert build_pool("gfgp", 8, 6, 6)(x).shape == (2, 8)
    assert torch.equal(build_local_pool("max", 8)(x), max2(x))
    assert_within(build_local_pool("avg", 8)(x), avg2(x), avg2_bound(x), "avg")
    assert build_local_pool("s3pool", 8, grid=4).grid == 4
    with pytest.raises(ValueError, match="valid names: avg, gfgp, max, s3pool"):
        build_local_pool("stride", 8)
    with pytest.raises(ValueError, match="valid names: .*gfgp"):
        build_pool("gfp", 8, 6, 6)
    # each pool's own keyword arguments, checked against what its constructor takes
    with pytest.raises(ValueError, match="local pool 'max': got an unexpected keyword "
                                         "argument 'grid'; it takes no keyword arguments"):
        build_local_pool("max", 8, grid=2)
    with pytest.raises(ValueError, match="local pool 's3pool': missing a required argument: "
                                         "'grid'; it takes grid, draw"):
        build_local_pool("s3pool", 8)
    with pytest.raises(ValueError, match="unexpected keyword argument 'normalise'; it takes "
                                         "normalize"):
        build_pool("flex", 8, 6, 6, normalise="softmax")
    assert build_pool("flex", 8, 6, 6, normalize="softmax").normalize == "softmax"
    with pytest.raises(ValueError, match="grid must be >= 1"):
        S3Pool2x2(0)
