"""Pooling layers: global pools that turn a feature map into a vector for a linear head.

Every global pool maps ``(B, C, H, W) -> (B, C)`` and is built by name with
:func:`build_pool`. Valid names are the keys of :data:`GLOBAL_POOLS`:

- ``avg``: global average pooling, ``y[b, c] = mean_{i,j} x[b, c, i, j]``.
- ``max``: global max pooling, ``y[b, c] = max_{i,j} x[b, c, i, j]``.
- ``flex``: FlexPool (PAPER.md sec. 1), a learnt weight per channel and position,
  ``y[b, c] = sum_{i,j} W[c, i, j] * x[b, c, i, j]``, initialised to ``1/(H*W)``.
- ``flex_softmax``: FlexPool whose weights are softmax-normalised over the ``H*W``
  positions of each channel (the authors' public code).

Pools that carry a penalty (FlexPool) expose ``regularization()``; the model sums it
over all its pools.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "FlexPool2d",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "GLOBAL_POOLS",
    "build_pool",
    "flex_pool",
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
    """

    def __init__(
        self, channels: int, height: int, width: int, normalize: str | None = None
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
        self.weight = nn.Parameter(torch.full((channels, height, width), init))

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


PoolFactory = Callable[[int, int, int], nn.Module]

#: Global pools by name: ``factory(channels, height, width) -> module``.
GLOBAL_POOLS: dict[str, PoolFactory] = {
    "avg": lambda c, h, w: GlobalAvgPool2d(),
    "max": lambda c, h, w: GlobalMaxPool2d(),
    "flex": lambda c, h, w: FlexPool2d(c, h, w),
    "flex_softmax": lambda c, h, w: FlexPool2d(c, h, w, normalize="softmax"),
}


def build_pool(name: str, channels: int, height: int, width: int) -> nn.Module:
    """Build the global pool called ``name`` for maps of shape ``(channels, height, width)``."""
    try:
        factory = GLOBAL_POOLS[name]
    except KeyError:
        raise ValueError(
            f"unknown global pool {name!r}; valid names: {', '.join(sorted(GLOBAL_POOLS))}"
        ) from None
    return factory(channels, height, width)

