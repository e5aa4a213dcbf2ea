"""Pooling layers: global pools before the linear heads, local pools that downsample.

Every global pool maps ``(B, C, H, W) -> (B, C)`` and is built by name with
:func:`build_pool`. Valid names are the keys of :data:`GLOBAL_POOLS`:

- ``avg``: global average pooling, ``y[b, c] = mean_{i,j} x[b, c, i, j]``.
- ``max``: global max pooling, ``y[b, c] = max_{i,j} x[b, c, i, j]``.
- ``flex``: FlexPool (PAPER.md sec. 1), a learnt weight per channel and position,
  ``y[b, c] = sum_{i,j} W[c, i, j] * x[b, c, i, j]``, initialised to ``1/(H*W)``.
- ``flex_softmax``: FlexPool whose weights are softmax-normalised over the ``H*W``
  positions of each channel (the authors' public code).
- ``gfgp``: GFGP (PAPER.md sec. 5) over the whole map,
  ``y[b, c] = sum_q x_q softmax_q(lambda[b, c] x_q)``, ``lambda`` from an MLP on the
  global average.

Every local pool maps ``(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))`` (2x2 windows at
stride 2; an odd size gets a partial last window, like the stride-2 convolution it
replaces) and is built by name with :func:`build_local_pool`. Valid names are the keys
of :data:`LOCAL_POOLS`: ``max``, ``avg``, ``gfgp`` (GFGP over each window) and
``s3pool`` (stochastic spatial sampling, PAPER.md sec. 5).

Both builders also take the import path of a user's class (``mypkg.pools.LSEPool2d``,
built as ``cls(channels, height, width, **kwargs)`` for a global pool and
``cls(channels, **kwargs)`` for a local one), so a pool is added without editing
flexexp; the keyword arguments come from the pool's own config.

Pools that carry a penalty (FlexPool) expose ``regularization()``; the model sums it
over all its pools.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FlexPool2d",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "GlobalGFGP2d",
    "GFGPGuide",
    "LocalPool",
    "MaxPool2x2",
    "AvgPool2x2",
    "GFGPPool2x2",
    "S3Pool2x2",
    "GLOBAL_POOLS",
    "LOCAL_POOLS",
    "build_pool",
    "build_local_pool",
    "local_pool_factory",
    "layer_kwargs",
    "resolve_layer",
    "check_arguments",
    "flex_pool",
    "gfgp_pool",
    "gfgp_local_pool",
    "s3pool_indices",
    "s3pool_sample",
    "s3pool_train",
    "s3pool_eval",
    "max2x2_stride1",
    "GFGP_GUIDES",
    "S3POOL_DRAWS",
]


def flex_pool(x: Tensor, weight: Tensor) -> Tensor:
    """Weighted global pooling: ``(B, C, H, W), (C, H, W) -> (B, C)``."""
    # A multiply-and-sum over the spatial positions; einsum lowers it to one batched
    # matmul over (H*W), which is cheaper than materialising x * weight.
    return torch.einsum("bchw,chw->bc", x, weight.to(x.dtype))


class GlobalAvgPool2d(nn.Module):
    """Global average pooling, ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class GlobalMaxPool2d(nn.Module):
    """Global max pooling, ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax((2, 3))


class FlexPool2d(nn.Module):
    """FlexPool: learnable global pooling with one weight per channel and position.

    Shapes: input ``(B, C, H, W)`` with ``C, H, W`` as given at construction, output
    ``(B, C)``.

    ``normalize=None`` (the paper's FlexPool):
        ``y[b, c] = sum_{i,j} W[c, i, j] * x[b, c, i, j]`` with ``W`` initialised to
        ``1 / (H * W)``, so the layer starts as global average pooling exactly.
    ``normalize="softmax"`` (the authors' code):
        ``y[b, c] = sum_{i,j} softmax_{(i,j)}(W[c])[i, j] * x[b, c, i, j]``; ``W``
        starts at zero, whose softmax is again the uniform ``1 / (H * W)``.

    ``regularization()`` returns Eq. 2 of the paper for the effective weights,
    ``R = sum_c (sum_{i,j} W[c, i, j] - 1)^2`` (zero for the softmax form by
    construction, and zero at initialisation for both).

    ``device`` and ``dtype`` place the weight as torch's own layers do.
    """

    def __init__(
        self, channels: int, height: int, width: int, normalize: str | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if normalize not in (None, "softmax"):
            raise ValueError(f"FlexPool2d: normalize must be None or 'softmax', got {normalize!r}")
        if min(channels, height, width) < 1:
            raise ValueError(
                f"FlexPool2d: channels, height and width must be positive, got "
                f"({channels}, {height}, {width})"
            )
        self.channels, self.height, self.width = channels, height, width
        self.normalize = normalize
        init = 0.0 if normalize == "softmax" else 1.0 / (height * width)
        # built in its final dtype (as torch's layers take ``device``/``dtype``): a float32
        # 1/(H*W) converted with .double() afterwards would keep float32's rounding of it
        self.weight = nn.Parameter(
            torch.full((channels, height, width), init, device=device, dtype=dtype))

    def effective_weight(self) -> Tensor:
        """The weights applied to the feature map, ``(C, H, W)``."""
        if self.normalize == "softmax":
            c, h, w = self.weight.shape
            return self.weight.reshape(c, h * w).softmax(dim=1).reshape(c, h, w)
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != self.weight.shape:
            raise ValueError(
                f"FlexPool2d was built for maps of shape (C, H, W) = {tuple(self.weight.shape)} "
                f"but got {tuple(x.shape[1:])}; build it with the size of the map it pools"
            )
        return flex_pool(x, self.effective_weight())

    def regularization(self) -> Tensor:
        """Eq. 2: ``sum_c (sum_{i,j} W[c, i, j] - 1)^2``, a scalar tensor."""
        sums = self.effective_weight().sum(dim=(1, 2))
        return (sums - 1.0).pow(2).sum()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, height={self.height}, width={self.width}, "
            f"normalize={self.normalize!r}"
        )


# ---------------------------------------------------------------------------- GFGP


def gfgp_pool(x: Tensor, lam: Tensor | float) -> Tensor:
    """GFGP's weighted pooling over the last axis: ``(..., N) -> (...)``.

    ``y = sum_q x_q * softmax_q(lam * x_q)``: ``lam = 0`` is the mean over ``q``,
    ``lam -> +inf`` the max. ``lam`` broadcasts against ``x.shape[:-1]`` (e.g. ``(B, C)``
    per sample and channel, or a scalar).
    """
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    # torch.softmax subtracts the max logit before exponentiating, so a large lam * x
    # cannot overflow to inf/inf = NaN (tested with |lam * x| ~ 1e7).
    weights = torch.softmax(lam.unsqueeze(-1) * x, dim=-1)
    return (weights * x).sum(-1)


GFGP_GUIDES = ("original", "simple")


class GFGPGuide(nn.Module):
    """GFGP's global guidance: ``(B, C, H, W) -> lambda (B, C)`` in ``(0, 1)``.

    ``guide="original"`` (default; the authors' ``MaxEntPoolingCuda2d.ToParam``,
    tk1980/GFGP ``models/modules/mylayers.py``): GAP -> 1x1 conv ``C -> C/2`` with bias
    -> BatchNorm -> ReLU -> 1x1 conv ``C/2 -> C`` with bias -> BatchNorm -> sigmoid,
    ``2 C h + 3 h + 3 C`` parameters for hidden size ``h = max(1, C // 2)`` (BatchNorm's
    running statistics are buffers). Its BatchNorms see one value per sample and channel,
    so training needs batches of at least 2 (as in the original).
    ``guide="simple"`` (the paper's formula): ``sigmoid(V relu(U gap(x)))`` with
    ``U: (h, C)``, ``V: (C, h)``, no biases, no BatchNorm: ``2 C h`` parameters.
    """

    def __init__(self, channels: int, guide: str = "original") -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"GFGPGuide: channels must be positive, got {channels}")
        if guide not in GFGP_GUIDES:
            raise ValueError(f"GFGP: guide must be one of {', '.join(GFGP_GUIDES)}, got {guide!r}")
        self.guide = guide
        hidden = max(1, channels // 2)
        if guide == "original":
            self.reduce: nn.Module = nn.Conv2d(channels, hidden, 1, bias=True)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.expand: nn.Module = nn.Conv2d(hidden, channels, 1, bias=True)
            self.bn2 = nn.BatchNorm2d(channels)
        else:
            self.reduce = nn.Linear(channels, hidden, bias=False)  # U
            self.expand = nn.Linear(hidden, channels, bias=False)  # V

    def forward(self, x: Tensor) -> Tensor:
        if self.guide == "simple":
            return torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3))))))
        s = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        z = self.bn2(self.expand(F.relu(self.bn1(self.reduce(s)))))
        return torch.sigmoid(z).flatten(1)

    def extra_repr(self) -> str:
        return f"guide={self.guide!r}"


class GlobalGFGP2d(nn.Module):
    """GFGP as a global pool (the window is the whole map): ``(B, C, H, W) -> (B, C)``.

    ``y[b, c] = sum_{i,j} x[b,c,i,j] * softmax_{(i,j)}(lambda[b, c] * x[b,c,i,j])`` with
    ``lambda = guide(x)`` (:class:`GFGPGuide`, ``guide="original"`` or ``"simple"``).
    ``pool_with_lambda(x, lam)`` applies the formula with an injected ``lambda`` (tests:
    ``lam=0`` is average pooling, a large ``lam`` approaches max pooling).
    """

    def __init__(self, channels: int, guide: str = "original") -> None:
        super().__init__()
        self.guide = GFGPGuide(channels, guide)

    def pool_with_lambda(self, x: Tensor, lam: Tensor | float) -> Tensor:
        """The pooling formula for a given ``lam`` (scalar or ``(B, C)``): ``-> (B, C)``."""
        return gfgp_pool(x.flatten(2), lam)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_with_lambda(x, self.guide(x))


def _avg(channels: int, height: int, width: int) -> nn.Module:
    return GlobalAvgPool2d()


def _max(channels: int, height: int, width: int) -> nn.Module:
    return GlobalMaxPool2d()


def _flex(channels: int, height: int, width: int, normalize: str | None = None) -> nn.Module:
    return FlexPool2d(channels, height, width, normalize=normalize)


def _flex_softmax(channels: int, height: int, width: int) -> nn.Module:
    return FlexPool2d(channels, height, width, normalize="softmax")


def _gfgp(channels: int, height: int, width: int, guide: str = "original") -> nn.Module:
    return GlobalGFGP2d(channels, guide)


#: Global pools by name: ``factory(channels, height, width, **kwargs) -> module``. A pool
#: config's ``layer`` is one of these names or the import path of a class (or function)
#: called the same way (``mypkg.pools.LSEPool2d``); its other keys are the ``kwargs``.
GLOBAL_POOLS: dict[str, Callable[..., nn.Module]] = {
    "avg": _avg,
    "max": _max,
    "flex": _flex,
    "flex_softmax": _flex_softmax,
    "gfgp": _gfgp,
}


def resolve_layer(name: str, registry: dict[str, Callable[..., nn.Module]], kind: str
                  ) -> Callable[..., nn.Module]:
    """The factory called ``name``: a key of ``registry``, or ``module.attr`` imported.

    Raises ``ValueError`` naming the registry's names and, for an import path, why the
    import failed.
    """
    if name in registry:
        return registry[name]
    names = ", ".join(sorted(registry))
    if "." not in name:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {names}, or the import path "
                         f"of a class, e.g. mypkg.pools.MyPool")
    module, _, attr = name.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"unknown {kind} {name!r}: it is not a registry name ({names}) and importing it "
            f"failed ({type(exc).__name__}: {exc}); put its package on PYTHONPATH"
        ) from None
    if not callable(factory):
        raise ValueError(f"{kind} {name!r} is not a class or function")
    return factory


def check_arguments(factory: Callable[..., nn.Module], args: tuple, kwargs: dict[str, Any],
                    what: str) -> None:
    """Raise ``ValueError`` if ``factory(*args, **kwargs)`` would not bind (a misspelled
    or missing keyword): the message lists the keywords it takes."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        takes = [n for n in list(sig.parameters)[len(args):] if n != "self"]
        raise ValueError(f"{what}: {exc}; it takes {', '.join(takes) or 'no keyword arguments'}"
                         ) from None


def build_pool(name: str, channels: int, height: int, width: int, **kwargs: Any) -> nn.Module:
    """Build the global pool ``name`` (registry name or import path) for maps of shape
    ``(channels, height, width)``, with its own keyword arguments."""
    factory = resolve_layer(name, GLOBAL_POOLS, "global pool")
    check_arguments(factory, (channels, height, width), kwargs, f"global pool {name!r}")
    return factory(channels, height, width, **kwargs)


# ---------------------------------------------------------------------------- local pools


class LocalPool(nn.Module):
    """A downsampler ``(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))`` (2x2 window, stride 2).

    ``pool_pair(x, skip, offset)`` pools a residual branch ``(B, C, H, W)`` and its
    shortcut ``(B, C_skip, H, W)`` in one go, sharing whatever the pool draws or computes
    per call (S3Pool's sampled rows, GFGP's lambda), so the two maps that are added stay
    aligned position by position. The shortcut's channels are the branch's channels
    ``[offset, offset + C_skip)`` (option A zero-pads the rest after pooling).
    """

    def pool_pair(self, x: Tensor, skip: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        return self(x), self(skip)


class MaxPool2x2(LocalPool):
    """``y[b,c,i,j] = max of x[b,c,2i:2i+2,2j:2j+2]`` (a partial window at an odd edge)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2, 2, ceil_mode=True)


class AvgPool2x2(LocalPool):
    """``y[b,c,i,j] = mean of x[b,c,2i:2i+2,2j:2j+2]`` (over the valid entries at an edge)."""

    def forward(self, x: Tensor) -> Tensor:
        # with padding=0, ceil_mode divides a partial window by its valid entries only
        return F.avg_pool2d(x, 2, 2, ceil_mode=True)


def gfgp_local_pool(x: Tensor, lam: Tensor | float) -> Tensor:
    """GFGP over 2x2 windows at stride 2: ``(B, C, H, W), (B, C) -> (B, C, H/2, W/2)``.

    ``y[b,c,i,j] = sum_{q in R_ij} x_q softmax_q(lam[b, c] x_q)`` with ``R_ij`` the 2x2
    window (partial at an odd edge, like :class:`AvgPool2x2`); ``lam`` is ``(B, C)`` or a
    scalar. Computed as ``avgpool(x * e) / avgpool(e)`` with ``e = exp(lam x - m)``: no
    window copies, which makes it ~1.5x faster than a softmax over unfolded windows.
    """
    h, w = x.shape[2:]
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    if lam.dim() == 2:
        lam = lam[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
    z = lam * x
    # m = the window's max logit, spread back over its window: every exponent is <= 0 (no
    # overflow) and the max term is 1 (no 0/0). The softmax does not depend on m, so m
    # needs no gradient.
    m = F.max_pool2d(z.detach(), 2, 2, ceil_mode=True)
    m = F.interpolate(m, scale_factor=2.0, mode="nearest")[:, :, :h, :w]
    e = torch.exp(z - m)
    # a ratio of window averages is a ratio of window sums (partial windows included)
    return F.avg_pool2d(x * e, 2, 2, ceil_mode=True) / F.avg_pool2d(e, 2, 2, ceil_mode=True)


class GFGPPool2x2(LocalPool):
    """GFGP local pooling (Kobayashi, ICCV 2019): ``(B, C, H, W) -> (B, C, H/2, W/2)``.

    ``y[b,c,i,j] = sum_{q in 2x2 window} x_q softmax_q(lambda[b, c] x_q)``, ``lambda`` per
    sample and channel from :class:`GFGPGuide` (``guide="original"``: the authors'
    estimator with biases and BatchNorm; ``"simple"``: the paper's bias-free MLP): between
    average (``lambda=0``) and max (``lambda -> inf``) pooling, chosen from the map's
    global statistics. ``pool_with_lambda(x, lam)`` injects ``lambda``.

    Where it sits in a downsampling block: ``after_block=True`` (default, the authors'
    ``models/resnet.py`` ``BasicBlock``): the block runs at stride 1 (conv, BN, ReLU, conv,
    BN, plus shortcut, ReLU) and this pool halves its output; the block reads
    ``pools_after_block``. ``after_block=False``: right after the block's first conv,
    the shortcut pooled with the branch's ``lambda`` (``pool_pair``).
    """

    def __init__(self, channels: int, guide: str = "original", after_block: bool = True
                 ) -> None:
        super().__init__()
        if not isinstance(after_block, bool):
            raise TypeError(f"GFGP: after_block must be true or false, got {after_block!r}")
        self.guide = GFGPGuide(channels, guide)
        self.pools_after_block = after_block

    def pool_with_lambda(self, x: Tensor, lam: Tensor | float) -> Tensor:
        """The pooling formula for a given ``lam`` (scalar or ``(B, C)``)."""
        return gfgp_local_pool(x, lam)

    def forward(self, x: Tensor) -> Tensor:
        return gfgp_local_pool(x, self.guide(x))

    def pool_pair(self, x: Tensor, skip: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        lam = self.guide(x)
        skip_lam = lam[:, offset:offset + skip.shape[1]]  # the lambda of each skip channel
        return gfgp_local_pool(x, lam), gfgp_local_pool(skip, skip_lam)

    def extra_repr(self) -> str:
        return f"after_block={self.pools_after_block}"


def max2x2_stride1(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, C, H, W)``, max over ``x[i:i+2, j:j+2]``; the bottom row and
    right column see a partial window (padding with -inf). S3Pool's first step is this map
    without its partial last row and column (the original's ``ignore_border=True``)."""
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)


@lru_cache(maxsize=256)
def _s3pool_keep(size: int, grid: int) -> tuple[int, ...]:
    """Positions, in cell-grouped order, that S3Pool keeps: ``k_i`` of each grid cell.

    Cell ``i`` covers rows ``[s, e) = [i*grid, min((i+1)*grid, size))`` and keeps
    ``k_i = ceil(e/2) - ceil(s/2)`` of them, so the cells keep ``ceil(size/2)`` rows in
    all: half of each even cell, and for ``grid=1`` exactly the rows 0, 2, 4, ...
    """
    keep = []
    for start in range(0, size, grid):
        end = min(start + grid, size)
        k = (end + 1) // 2 - (start + 1) // 2
        keep.extend(range(start, start + k))
    return tuple(keep)


def s3pool_indices(
    batch: int, size: int, grid: int, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rows (or columns) S3Pool keeps, ``(batch, ceil(size/2))``, ascending, one draw per
    row of the result (``batch=1``: one draw for the whole batch, as the original).

    The ``size`` rows are split into cells of ``grid`` rows; each cell keeps a uniformly
    random subset of ``k_i`` rows (see :func:`_s3pool_keep`), drawn from ``generator``
    (default: torch's global RNG, so ``torch.manual_seed`` repeats a draw). The last row
    ``size - 1`` (a partial 2x2 window, absent from the original's stride-1 max map) is
    kept only when its cell needs every row (an odd ``size`` with ``grid=1`` or a 1-row last
    cell). Where ``grid`` is even and divides ``size``, this is the original's draw
    (Shuangfei/s3pool ``build_net.py`` ``StochasticPool2DLayer``): ``size/grid`` cells, each
    keeping a sorted random ``grid/2`` of its rows, the last cell from its first
    ``grid - 1``. A ``grid`` above ``size`` is one cell (the original returns nothing).
    """
    cell = torch.arange(size, device=device) // grid
    # keys 2*cell + u, u in [0, 1): sorting groups rows by cell and shuffles within a cell
    # (the gap of 2 keeps float rounding of u -> 1 from crossing into the next cell); the
    # partial last row's key 2*cell + 1.5 sorts it after its cell's other rows
    keys = cell * 2 + torch.rand(batch, size, device=device, generator=generator)
    keys[:, -1] = cell[-1] * 2 + 1.5
    order = keys.argsort(dim=1)
    keep = torch.tensor(_s3pool_keep(size, grid), device=device)
    return order[:, keep].sort(dim=1).values


def s3pool_sample(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``y[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]]``: ``(B, C, H, W) -> (B, C, Ho, Wo)``;
    ``rows``/``cols`` of one row (``(1, Ho)``) are shared by the whole batch."""
    if rows.shape[0] == 1 and cols.shape[0] == 1:
        return x.index_select(2, rows[0]).index_select(3, cols[0])
    b, c, _, w = x.shape
    rows, cols = rows.expand(b, -1), cols.expand(b, -1)
    ho, wo = rows.shape[1], cols.shape[1]
    x = torch.gather(x, 2, rows[:, None, :, None].expand(b, c, ho, w))
    return torch.gather(x, 3, cols[:, None, None, :].expand(b, c, ho, wo))


def s3pool_train(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """S3Pool in training, ``s3pool_sample(max2x2_stride1(x), rows, cols)``, computed at the
    output size: take rows ``r, r+1`` and columns ``c, c+1`` of ``x`` (padded with -inf),
    then a 2x2 max at stride 2. Equal to the two-step form, about 2x faster on CPU.
    ``rows``, ``cols``: ``(B, Ho)`` per image or ``(1, Ho)`` shared by the batch.
    """
    x = F.pad(x, (0, 1, 0, 1), value=float("-inf"))
    rows2 = torch.stack([rows, rows + 1], 2).flatten(1)  # r0, r0+1, r1, r1+1, ...
    cols2 = torch.stack([cols, cols + 1], 2).flatten(1)
    return F.max_pool2d(s3pool_sample(x, rows2, cols2), 2, 2)


def s3pool_eval(x: Tensor) -> Tensor:
    """S3Pool at evaluation, the original's (``build_net.py``, ``deterministic=True``):
    the stride-1 2x2 max without padding (``(H-1, W-1)``), then a 2x2 average at stride 2
    with padding 1 excluded from the average: ``(B, C, H, W) -> (B, C, ceil(H/2),
    ceil(W/2))``. Output row ``i`` averages max-map rows ``2i-1, 2i`` (one row at the edges).
    """
    h, w = x.shape[2:]
    if h < 2 or w < 2:  # a 1-wide map: its one partial window
        x = F.pad(x, (0, int(w < 2), 0, int(h < 2)), value=float("-inf"))
    m = F.max_pool2d(x, 2, 1)
    return F.avg_pool2d(m, 2, 2, padding=1, count_include_pad=False)


S3POOL_DRAWS = ("batch", "image")


class S3Pool2x2(LocalPool):
    """S3Pool (Zhai et al., CVPR 2017): ``(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))``.

    Step 1: ``m`` = the 2x2 max at stride 1. Step 2 in training: ``y[b,c,i,j] =
    m[b, c, rows[i], cols[j]]`` with rows and columns drawn at random inside grid cells of
    ``grid`` rows/columns (:func:`s3pool_indices`; larger grid = more distortion,
    ``grid=1`` = plain 2x2 max pooling at stride 2), both steps fused in
    :func:`s3pool_train`. ``draw="batch"`` (default, the original): one draw shared by the
    whole batch and every channel; ``draw="image"``: one draw per image. In evaluation:
    :func:`s3pool_eval` (the original's padded 2x2 average). ``pool_pair`` uses one draw
    for a branch and its shortcut.
    """

    def __init__(self, grid: int, draw: str = "batch", generator: torch.Generator | None = None
                 ) -> None:
        super().__init__()
        if isinstance(grid, bool) or not isinstance(grid, int):
            raise TypeError(f"S3Pool2x2: grid must be an integer (cell size in rows), got {grid!r}")
        if grid < 1:
            raise ValueError(f"S3Pool2x2: grid must be >= 1 (cell size in rows), got {grid}")
        if draw not in S3POOL_DRAWS:
            raise ValueError(f"S3Pool2x2: draw must be one of {', '.join(S3POOL_DRAWS)}, "
                             f"got {draw!r}")
        self.grid, self.draw = grid, draw
        self.generator = generator

    def _draw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        n = b if self.draw == "image" else 1
        rows = s3pool_indices(n, h, self.grid, x.device, self.generator)
        cols = s3pool_indices(n, w, self.grid, x.device, self.generator)
        return rows, cols

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return s3pool_eval(x)
        return s3pool_train(x, *self._draw(x))

    def pool_pair(self, x: Tensor, skip: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        if not self.training:
            return s3pool_eval(x), s3pool_eval(skip)
        rows, cols = self._draw(x)
        return s3pool_train(x, rows, cols), s3pool_train(skip, rows, cols)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, draw={self.draw!r}"


def _max2(channels: int) -> LocalPool:
    return MaxPool2x2()


def _avg2(channels: int) -> LocalPool:
    return AvgPool2x2()


def _gfgp2(channels: int, guide: str = "original", after_block: bool = True) -> LocalPool:
    return GFGPPool2x2(channels, guide, after_block)


def _s3pool(channels: int, grid: int, draw: str = "batch") -> LocalPool:
    return S3Pool2x2(grid, draw)


#: Local (downsampling) pools by name: ``factory(channels, **kwargs) -> module``; their
#: keyword arguments come from ``model.local_pool_args.<name>`` (S3Pool's ``grid`` and
#: ``draw``, GFGP's ``guide`` and ``after_block``). An import path names a class called
#: the same way; one without ``pool_pair`` pools the branch and the shortcut in two calls.
LOCAL_POOLS: dict[str, Callable[..., nn.Module]] = {
    "max": _max2,
    "avg": _avg2,
    "gfgp": _gfgp2,
    "s3pool": _s3pool,
}


def build_local_pool(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the 2x2 stride-2 pool ``name`` (registry name or import path) for maps with
    ``channels`` channels, with its own keyword arguments (``grid`` for ``s3pool``)."""
    factory = resolve_layer(name, LOCAL_POOLS, "local pool")
    check_arguments(factory, (channels,), kwargs, f"local pool {name!r}")
    return factory(channels, **kwargs)


def layer_kwargs(kwargs: dict[str, Any], layer: int) -> dict[str, Any]:
    """The keyword arguments of downsampling layer ``layer`` (0 = stage 2's): a list or
    tuple value gives one entry per downsampling layer (``grid: [16, 8]``), any other value
    holds for all of them."""
    return {k: v[layer % len(v)] if isinstance(v, list | tuple) and v else v
            for k, v in kwargs.items()}


def local_pool_factory(name: str, **kwargs: Any) -> Callable[[int], nn.Module]:
    """``channels -> pool``: the ``i``-th pool it builds is :func:`build_local_pool`
    with :func:`layer_kwargs` of layer ``i`` (cycling, so a model built twice from one
    factory gets the same layers), i.e. a list argument goes one entry per downsampling
    layer in the order the model builds them (stage 2, then stage 3)."""
    built = [0]

    def factory(channels: int) -> nn.Module:
        layer, built[0] = built[0], built[0] + 1
        return build_local_pool(name, channels, **layer_kwargs(kwargs, layer))
    return factory
