"""GFGP and S3Pool against independent reimplementations of their authors' code.

GFGP: tk1980/GFGP ``models/modules/mylayers.py`` (``MaxEntPoolingCuda2d.ToParam``: GAP ->
1x1 conv C->C/2 with bias -> BatchNorm -> ReLU -> 1x1 conv C/2->C with bias -> BatchNorm,
then sigmoid), ``maxentpool2d_cuda_kernel.cu`` (the window's softmax-weighted mean) and
``models/resnet.py`` ``BasicBlock`` (the block at stride 1, shortcut, ReLU, then the pool).
S3Pool: Shuangfei/s3pool ``build_net.py`` ``StochasticPool2DLayer`` (one draw per call for
the whole batch) and ``train_model.sh`` (``stochastic-16-8``). The references below are
written from those formulas with plain tensor ops, not with flexexp's functions.
"""

import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within, gamma, make_cfg, n_params, softmax_sum_bound, sum_error_bound

from flexexp.config import validate
from flexexp.errors import ConfigError
from flexexp.models import BasicBlock, build_model, make_local_pool
from flexexp.pooling import (
    GFGPGuide,
    GFGPPool2x2,
    GlobalGFGP2d,
    S3Pool2x2,
    layer_kwargs,
    s3pool_eval,
    s3pool_indices,
    s3pool_train,
)

F64 = torch.float64

# ---------------------------------------------------------------------------- GFGP


def _seeded_guide(channels: int, seed: int) -> GFGPGuide:
    """An original guide in float64 with random weights, biases and BatchNorm affines."""
    torch.manual_seed(seed)
    guide = GFGPGuide(channels, "original").double()
    with torch.no_grad():
        for p in guide.parameters():
            p.copy_(torch.randn_like(p))
        guide.bn1.running_mean.copy_(torch.randn_like(guide.bn1.running_mean))
        guide.bn1.running_var.copy_(torch.rand_like(guide.bn1.running_var) + 0.5)
        guide.bn2.running_mean.copy_(torch.randn_like(guide.bn2.running_mean))
        guide.bn2.running_var.copy_(torch.rand_like(guide.bn2.running_var) + 0.5)
    return guide


def _ref_bn(h, bn, train: bool):
    """BatchNorm over the batch ``(B, K)`` from its formula; returns the value, its
    Lipschitz constant in ``h`` (max-norm) and its own rounding bound (both sides)."""
    if train:
        mu, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)  # biased variance (torch's)
    else:
        mu, var = bn.running_mean, bn.running_var
    sd = torch.sqrt(var + bn.eps)
    dev = (h - mu).abs().max().item()
    g, b = bn.weight.detach(), bn.bias.detach()
    out = (h - mu) / sd * g + b
    g_max, sd_min = g.abs().max().item(), sd.min().item()
    # train: h moved by e moves mu by e, h - mu by 2e, var by 4 dev e, sd by 2 dev e / sd
    lip = g_max / sd_min * ((2 + 2 * dev ** 2 / sd_min ** 2) if train else 1)
    n = 2 * h.shape[0] + 12 if train else 8  # the batch sums, then a few roundings
    rounding = 2 * gamma(n, F64) * (4 * g_max * dev / sd_min + b.abs().max().item())
    return out, lip, rounding


def _ref_conv1x1(s, conv, err):
    """``W s + b`` for ``(B, Cin)``; the propagated error ``|W|_inf err`` plus rounding."""
    w, b = conv.weight.detach()[:, :, 0, 0], conv.bias.detach()
    terms = (s.abs() @ w.abs().T + b.abs()).max().item()
    err = w.abs().sum(1).max().item() * err + 2 * sum_error_bound(terms, w.shape[1] + 1, F64)
    return s @ w.T + b, err


def ref_guide(x, guide: GFGPGuide, train: bool):
    """The authors' estimator from its formula: ``lambda (B, C)`` and an error bound."""
    s = x.mean((2, 3))
    err = 2 * sum_error_bound(x.abs().mean((2, 3)).max().item(), x.shape[2] * x.shape[3] + 1, F64)
    h, err = _ref_conv1x1(s, guide.reduce, err)
    h, lip, rnd = _ref_bn(h, guide.bn1, train)
    h, err = _ref_conv1x1(torch.relu(h), guide.expand, lip * err + rnd)  # ReLU: Lipschitz 1
    h, lip, rnd = _ref_bn(h, guide.bn2, train)
    return 1 / (1 + torch.exp(-h)), (lip * err + rnd) / 4 + 2 * gamma(4, F64)  # sigmoid' <= 1/4


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels", [8, 7, 1])
def test_original_guide_matches_its_formula(train, channels):
    guide = _seeded_guide(channels, 0).train(train)
    x = torch.randn(5, channels, 4, 3, dtype=F64) * 2 + 0.5
    ref, bound = ref_guide(x, guide, train)
    assert_within(guide(x), ref, bound, f"guide train={train}")


def test_original_guide_updates_batchnorm_statistics_as_torch_does():
    guide = GFGPGuide(6, "original").double().train()
    x = torch.randn(4, 6, 3, 3, dtype=F64)
    with torch.no_grad():
        h = x.mean((2, 3)) @ guide.reduce.weight[:, :, 0, 0].T + guide.reduce.bias
    guide(x)
    # momentum 0.1 (nn.BatchNorm2d's default, the original's), unbiased running variance
    assert_within(guide.bn1.running_mean, 0.1 * h.mean(0), 1e-12, "running mean")
    assert_within(guide.bn1.running_var, 0.9 + 0.1 * h.var(0, unbiased=True), 1e-12, "running var")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        guide(x[:1])  # its BatchNorms see one value per sample: training needs batches of 2+


def ref_window_pool(x, lam):
    """``y = sum_{q in 2x2 window} x_q softmax_q(lam x_q)`` (the CUDA kernel), loops."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, -(-h // 2), -(-w // 2), dtype=x.dtype)
    for i, j in itertools.product(range(out.shape[2]), range(out.shape[3])):
        win = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].flatten(2)
        out[:, :, i, j] = (win * torch.softmax(lam[:, :, None] * win, -1)).sum(-1)
    return out


@pytest.mark.parametrize("train", [True, False])
def test_original_local_and_global_pools_match_the_formula(train):
    x = torch.randn(4, 6, 6, 5, dtype=F64)
    pool = GFGPPool2x2(6).double()
    pool.guide = _seeded_guide(6, 1)
    pool.train(train)
    lam, lam_err = ref_guide(x, pool.guide, train)
    big = x.abs().max().item()
    # d y / d lam = the softmax-weighted variance of the window, at most (2 big)^2 / 4
    bound = lam_err * big ** 2 + 2 * softmax_sum_bound(big, 4, big, F64)
    assert_within(pool(x), ref_window_pool(x, lam), bound, "local")
    glob = GlobalGFGP2d(6).double()
    glob.guide = _seeded_guide(6, 1)
    glob.train(train)
    flat = x.flatten(2)
    ref = (flat * torch.softmax(lam[..., None] * flat, -1)).sum(-1)
    bound = lam_err * big ** 2 + 2 * softmax_sum_bound(big, 30, big, F64)
    assert_within(glob(x), ref, bound, "global")


@pytest.mark.parametrize("train", [True, False])
def test_gfgp_pools_the_output_of_the_downsampling_block(train):
    """The authors' BasicBlock: conv1 at stride 1, BN, ReLU, conv2, BN, + shortcut, ReLU,
    then the pool; the shortcut is ResNet20's option A (channel padding, no subsampling)."""
    torch.manual_seed(2)
    block = BasicBlock(4, 8, 2, make_local_pool("gfgp")).train(train)
    assert block.conv1.stride == (1, 1) and block.pool.pools_after_block
    x = torch.randn(3, 4, 6, 6)
    y = block(x)
    body = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    ref = block.pool(F.relu(body + F.pad(x, (0, 0, 0, 0, 2, 2))))  # the same ops, in order
    assert y.shape == (3, 8, 3, 3) and torch.equal(y, ref)


def test_gfgp_parameter_counts_on_cifar10():
    """Per pool: 1x1 convs C -> h -> C with biases and two BatchNorms (weight and bias),
    h = C / 2: 2 C h + h + C + 2 h + 2 C."""
    def per_pool(c: int) -> int:
        return 2 * c * (c // 2) + (c // 2) + c + 2 * (c // 2) + 2 * c
    base = n_params(build_model(make_cfg(["dataset=cifar10"])))
    glob = n_params(build_model(make_cfg(["dataset=cifar10", "pool=gfgp"])))
    local = n_params(build_model(make_cfg(["dataset=cifar10", "model.downsample=gfgp"])))
    assert (base, glob - base, local - base) == (269_722, per_pool(64), per_pool(32) + per_pool(64))
    assert (glob - base, local - base) == (4_384, 5_552)


# ---------------------------------------------------------------------------- S3Pool


def original_indices(size: int, grid: int, perms: list[torch.Tensor]) -> torch.Tensor:
    """``StochasticPool2DLayer.get_output_for`` (training) for pool_size 2: ``size // grid``
    cells; cell ``i`` starts at ``grid * i`` and draws from ``grid`` rows, the last one from
    the ``size - 1 - offset`` rows left in the stride-1 max map (``ignore_border``); each
    keeps the sorted first ``grid // 2`` of a random permutation (``perms[i]``)."""
    cells, keep, idx = size // grid, grid // 2, []
    for i in range(cells):
        offset = grid * i
        this_n = grid if i < cells - 1 else size - 1 - offset
        assert perms[i].numel() == this_n
        idx.append(offset + perms[i][:keep].sort().values)
    return torch.cat(idx)


def original_perms(size: int, grid: int, gen: torch.Generator) -> list[torch.Tensor]:
    cells = size // grid
    return [torch.randperm(grid if i < cells - 1 else size - 1 - grid * i, generator=gen)
            for i in range(cells)]


@pytest.mark.parametrize("size,grid", [(32, 16), (16, 8), (8, 2), (8, 4), (12, 4), (16, 16)])
def test_s3pool_training_matches_the_original_for_a_fixed_draw(size, grid):
    gen = torch.Generator().manual_seed(size * grid)
    x = torch.randn(3, 4, size, size)
    for _ in range(5):
        rows = original_indices(size, grid, original_perms(size, grid, gen))
        cols = original_indices(size, grid, original_perms(size, grid, gen))
        # one draw for every image and channel: x[:, :, idx_w][:, :, :, idx_h] of the map
        expected = F.max_pool2d(x, 2, 1)[:, :, rows][:, :, :, cols]
        assert torch.equal(s3pool_train(x, rows[None], cols[None]), expected)  # max: exact


@pytest.mark.parametrize("size,grid", [(32, 16), (16, 8), (8, 4), (8, 2)])
def test_s3pool_draws_are_the_originals(size, grid):
    """Every flexexp draw is one the original can make, and all of them are equally likely:
    each cell keeps grid/2 of its candidates, the last cell's candidates end at size - 2."""
    torch.manual_seed(11)
    n = 6000
    rows = s3pool_indices(n, size, grid)
    cells = []
    for i in range(size // grid):
        lo, hi = grid * i, grid * (i + 1) if i < size // grid - 1 else size - 1
        inside = (rows >= lo) & (rows < hi)
        assert (inside.sum(1) == grid // 2).all()
        cells.append(math.comb(hi - lo, grid // 2))
    if size == 8 and grid == 4:  # 6 x 3 = 18 subsets, each with probability 1/18
        counts = Counter(tuple(r) for r in rows.tolist())
        assert len(counts) == math.prod(cells) == 18
        p = 1 / 18  # 6 standard deviations of a binomial count: a false alarm ~2e-9
        assert all(abs(k - n * p) <= 6 * math.sqrt(n * p * (1 - p)) for k in counts.values())


def test_s3pool_module_shares_one_draw_across_batch_and_channels():
    img = torch.randn(1, 1, 16, 16)
    x = img.expand(4, 3, 16, 16).contiguous()  # four copies of one image, three channels
    pool = S3Pool2x2(8, generator=torch.Generator().manual_seed(3)).train()
    y = pool(x)
    assert (y == y[:1, :1]).all()  # one draw for every image and channel
    gen = torch.Generator().manual_seed(3)
    rows, cols = s3pool_indices(1, 16, 8, generator=gen), s3pool_indices(1, 16, 8, generator=gen)
    assert torch.equal(y, F.max_pool2d(x, 2, 1)[:, :, rows[0]][:, :, :, cols[0]])
    per_image = S3Pool2x2(8, draw="image").train()
    torch.manual_seed(4)
    z = per_image(x)
    assert (z == z[:, :1]).all() and not (z == z[:1]).all()  # channels share, images do not


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 3, 16, 16), (1, 2, 7, 5), (1, 1, 2, 2)])
def test_s3pool_eval_is_the_originals_padded_average(shape):
    """``deterministic=True``: pool_2d(max, ds 2, st 1, ignore_border) then pool_2d(ds 2,
    st 2, padding 1, 'average_exc_pad'): output (i, j) averages the max-map entries at rows
    2i-1, 2i and columns 2j-1, 2j that exist (the map is (H-1) x (W-1))."""
    torch.manual_seed(12)
    x = torch.randn(*shape)
    h, w = shape[2] - 1, shape[3] - 1
    m = torch.stack([torch.stack([x[:, :, i:i + 2, j:j + 2].amax((2, 3)) for j in range(w)], -1)
                     for i in range(h)], -2)
    ho, wo = h // 2 + 1, w // 2 + 1
    ref = torch.empty(*shape[:2], ho, wo)
    for i, j in itertools.product(range(ho), range(wo)):
        rs = [r for r in (2 * i - 1, 2 * i) if 0 <= r < h]
        cs = [c for c in (2 * j - 1, 2 * j) if 0 <= c < w]
        ref[:, :, i, j] = m[:, :, rs][:, :, :, cs].double().mean((2, 3)).float()
    y = S3Pool2x2(16).eval()(x)
    assert y.shape == (*shape[:2], -(-shape[2] // 2), -(-shape[3] // 2))
    # a mean of at most 4 values: 5 roundings; the reference's float64 mean rounds once to float32
    bound = sum_error_bound(x.abs().amax((2, 3), keepdim=True), 5, x.dtype) * 2
    assert_within(y, ref, bound, "S3Pool eval")
    assert torch.equal(s3pool_eval(x),
                       F.avg_pool2d(F.max_pool2d(x, 2, 1), 2, 2, 1, count_include_pad=False))


def test_s3pool_grid_per_downsampling_layer():
    cfg = make_cfg(["experiment=s3pool_cifar", "model.downsample=s3pool", "pool=avg"])
    validate(cfg)
    assert cfg.dataset.name == "cifar10" and list(cfg.model.local_pool_args.s3pool.grid) == [16, 8]
    pools = [m for m in build_model(cfg).modules() if isinstance(m, S3Pool2x2)]
    assert [(p.grid, p.draw) for p in pools] == [(16, "batch"), (8, "batch")]
    one = build_model(make_cfg(["model.downsample=s3pool", "model.local_pool_args.s3pool.grid=4"]))
    assert [m.grid for m in one.modules() if isinstance(m, S3Pool2x2)] == [4, 4]
    assert layer_kwargs({"grid": [16, 8], "draw": "image"}, 1) == {"grid": 8, "draw": "image"}
    for bad in ("[16]", "[16,8,4]"):
        override = f"model.local_pool_args.s3pool.grid={bad}"
        with pytest.raises(ConfigError, match="one per downsampling layer"):
            validate(make_cfg(["model.downsample=s3pool", override]))
    with pytest.raises(ConfigError, match="draw must be one of batch, image"):
        validate(make_cfg(["model.downsample=s3pool", "model.local_pool_args.s3pool.draw=pixel"]))
