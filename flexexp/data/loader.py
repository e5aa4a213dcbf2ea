"""On-device batches and batched augmentation.

The whole split lives on the training device as uint8 ``(N, C, H, W)``; an epoch is a
random permutation cut into slices, and augmentation is a few tensor operations on the
whole batch with different random parameters for every image. No DataLoader workers
and no per-image Python work: for 32x32 images that is what keeps the GPU busy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "random_flip", "random_affine", "augment", "normalize", "DeviceLoader"]


@dataclass(frozen=True)
class Augment:
    """Batched training augmentation: flip, zoom in ``scale`` and shift up to ``translate`` px."""

    flip: bool = False
    scale: tuple[float, float] = (1.0, 1.0)
    translate: int = 0

    @property
    def geometric(self) -> bool:
        return self.scale != (1.0, 1.0) or self.translate > 0


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (hi - lo) + lo


def random_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> tuple[Tensor, Tensor]:
    """Mirror each image left-right with probability ``p``; returns ``(images, flipped mask)``."""
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(mask[:, None, None, None], x.flip(3), x), mask


def random_affine(
    x: Tensor, scale: tuple[float, float], translate: int, generator: torch.Generator
) -> Tensor:
    """Zoom each image by its own factor in ``scale`` (> 1 zooms in) about its centre and
    shift it by up to ``translate`` pixels; uncovered pixels are zero. Shape and dtype kept.
    """
    b, _, h, w = x.shape
    s = _uniform(b, scale[0], scale[1], generator, x.device)
    # offsets in normalised coordinates (2 / size per pixel)
    tx = _uniform(b, -translate, translate, generator, x.device) * (2.0 / w)
    ty = _uniform(b, -translate, translate, generator, x.device) * (2.0 / h)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    src = x.float()
    grid = F.affine_grid(theta, list(src.shape), align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if x.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(x.dtype)


def augment(x: Tensor, aug: Augment, generator: torch.Generator) -> Tensor:
    """Apply ``aug`` to a batch ``(B, C, H, W)``; every image draws its own parameters."""
    if aug.flip:
        x, _ = random_flip(x, generator)
    if aug.geometric:
        x = random_affine(x, aug.scale, aug.translate, generator)
    return x


def normalize(x: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``(B, C, H, W)`` -> ``(x / 255 - mean) / std`` in ``dtype``."""
    return ((x.to(dtype) / 255.0) - mean) / std


class DeviceLoader:
    """Batches of a split held on ``device``: ``for x, y in loader`` gives normalised
    float images ``(B, C, H, W)`` and labels ``(B,)``.

    ``train=True`` shuffles with ``generator`` and augments; ``train=False`` keeps order
    and augments nothing. The generator lives on the same device as the data.

    Data-parallel training: every rank holds the same ``generator`` state, so all draw
    the same permutation, and rank ``r`` of ``world`` takes every ``world``-th image of
    each global batch of ``batch_size``; ``aug_generator`` (one per rank) draws the
    augmentation parameters (defaults to ``generator``).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        train: bool,
        aug: Augment = Augment(),
        generator: torch.Generator | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        rank: int = 0,
        world: int = 1,
        aug_generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.aug = aug
        self.generator = generator
        self.aug_generator = aug_generator or generator
        self.memory_format = memory_format
        self.rank, self.world = rank, world
        self.drop_last = drop_last  # data-parallel: every rank needs a full share
        c = x.shape[1]
        self.mean = torch.tensor(list(mean), device=device).expand(c).reshape(1, c, 1, 1)
        self.std = torch.tensor(list(std), device=device).expand(c).reshape(1, c, 1, 1)
        if train and generator is None:
            raise ValueError("a training DeviceLoader needs a generator for shuffling")

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.y) // self.batch_size
        return -(-len(self.y) // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.y)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.y)
        if self.train:
            order = torch.randperm(n, generator=self.generator, device=self.device)
        else:
            order = None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                xb = self.x[start : start + self.batch_size]
                yb = self.y[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size][self.rank :: self.world]
                xb, yb = self.x[idx], self.y[idx]
                xb = augment(xb, self.aug, self.aug_generator)
            xb = normalize(xb, self.mean, self.std)
            yield xb.contiguous(memory_format=self.memory_format), yb
