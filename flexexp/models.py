"""CIFAR ResNets (He et al. 2016) with pluggable global pooling and auxiliary heads.

``resnet20()`` is the paper's backbone: a 3x3 conv with 16 channels, three stages of
``n`` basic blocks with 16/32/64 channels (``depth = 6n + 2``), stride 2 at the start
of stages 2 and 3 and parameter-free "option A" shortcuts (subsample, then zero-pad
the new channels). With SAC (PAPER.md sec. 2) every stage gets a head
``pool -> (dropout) -> linear``, each pool sized to its stage's map; the last head is
the main classifier.

``downsample`` chooses how stages 2 and 3 halve the map (PAPER.md sec. 5): ``stride``
(He et al.: the first block's first conv has stride 2, the shortcut keeps every second
row and column) or a local pool of :data:`flexexp.pooling.LOCAL_POOLS` (``max``,
``avg``, ``gfgp``, ``s3pool``): that conv runs at stride 1 and is followed by the 2x2,
stride-2 pool, and the shortcut is pooled by the same pool in the same call (one S3Pool
draw, one GFGP lambda for both), so the branch and the identity stay aligned. Every
option halves ``H`` to ``ceil(H/2)``, so ``stage_shapes`` do not depend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from flexexp.pooling import LOCAL_POOLS, LocalPool, build_local_pool, build_pool

__all__ = [
    "build_model",
    "BasicBlock",
    "Head",
    "CifarResNet",
    "resnet20",
    "resnet",
    "VALID_DEPTHS",
    "DOWNSAMPLE_OPTIONS",
]

VALID_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)
#: ``model.downsample`` values: the strided conv of He et al., or a local pool by name.
DOWNSAMPLE_OPTIONS = ("stride", *LOCAL_POOLS)


class ShortcutA(nn.Module):
    """Option-A shortcut: ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)`` without parameters.

    The input's channels land at ``[offset, offset + C_in)`` of the output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels
        self.offset = self.pad // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            # zero channels split before and after, as in He et al.'s CIFAR code
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    With ``stride=2`` and ``downsample`` a local pool name, the block computes
    ``conv1 (stride 1) -> pool -> BN -> ReLU -> conv2 -> BN`` and adds
    ``pad_channels(pool(x))``, both pooled in one :meth:`LocalPool.pool_pair` call.
    Shapes: ``(B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))`` for either form.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        downsample: str = "stride",
        s3pool_grid: int = 2,
    ) -> None:
        super().__init__()
        if downsample not in DOWNSAMPLE_OPTIONS:
            raise ValueError(
                f"unknown downsample {downsample!r}; valid names: {', '.join(DOWNSAMPLE_OPTIONS)}"
            )
        pooled = stride != 1 and downsample != "stride"
        if pooled and stride != 2:
            raise ValueError(
                f"downsample={downsample!r} pools 2x2 at stride 2, got stride {stride}"
            )
        conv_stride = 1 if pooled else stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, conv_stride, 1, bias=False)
        # None unless this block downsamples with a pool (keeps the default's modules as-is)
        self.pool: LocalPool | None = (
            build_local_pool(downsample, out_channels, s3pool_grid) if pooled else None
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            # with a pool the shortcut only pads channels, after the pool downsampled x
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, conv_stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is None:
            out, skip = self.conv1(x), self.shortcut(x)
        else:
            # pool the identity before padding it: half the channels, no zeros to pool
            offset = getattr(self.shortcut, "offset", 0)
            out, skip = self.pool.pool_pair(self.conv1(x), x, offset)
            skip = self.shortcut(skip)
        out = F.relu(self.bn1(out))
        out = self.bn2(self.conv2(out))
        return F.relu(out + skip)


class Head(nn.Module):
    """Classifier head ``(B, C, H, W) -> pool -> (B, C) -> dropout -> linear -> (B, K)``."""

    def __init__(
        self, pool: str, channels: int, height: int, width: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.pool = build_pool(pool, channels, height, width)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(x)))


class CifarResNet(nn.Module):
    """ResNet for small images; see the module docstring.

    ``forward(x)`` returns the main head's logits ``(B, num_classes)``;
    ``forward_heads(x)`` returns every head's logits, auxiliary heads first, main last.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        pool: str = "avg",
        sac: bool = False,
        dropout: float = 0.0,
        width: int = 1,
        downsample: str = "stride",
        s3pool_grid: int = 2,
    ) -> None:
        super().__init__()
        # an unknown downsample name is rejected by the first BasicBlock below
        if s3pool_grid < 1:
            raise ValueError(f"s3pool_grid must be >= 1 (S3Pool grid cell size), got {s3pool_grid}")
        if depth not in VALID_DEPTHS:
            raise ValueError(
                f"ResNet depth must be one of {VALID_DEPTHS} (6n+2 with n blocks per stage), "
                f"got {depth}"
            )
        if image_size < 4:
            raise ValueError(
                f"image_size {image_size} is too small: the three stages halve it twice, "
                "so it must be at least 4"
            )
        blocks = (depth - 2) // 6
        widths = [w * width for w in STAGE_WIDTHS]
        self.depth, self.sac, self.num_classes = depth, sac, num_classes
        self.downsample = downsample
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, sizes = [], []
        c_in, size = widths[0], image_size
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            # ceil: a stride-2 3x3 conv with padding 1, and the ceil-mode 2x2 pools alike
            size = -(-size // stride)
            layers = [BasicBlock(c_in, c_out, stride, downsample, s3pool_grid)]
            layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            sizes.append(size)
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.stage_shapes = [(c, s, s) for c, s in zip(widths, sizes, strict=True)]
        tapped = range(3) if sac else [2]
        self.head_stages = list(tapped)
        self.heads = nn.ModuleList(
            Head(pool, *self.stage_shapes[i], num_classes, dropout) for i in tapped
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Maps after each stage: ``[(B, 16w, H, W), (B, 32w, H/2, W/2), (B, 64w, H/4, W/4)]``."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_heads(self, x: Tensor) -> list[Tensor]:
        """Logits of every head ``[(B, K), ...]``, auxiliary heads first, main head last."""
        feats = self.forward_features(x)
        return [head(feats[i]) for head, i in zip(self.heads, self.head_stages, strict=True)]

    def forward(self, x: Tensor) -> Tensor:
        feats = self.forward_features(x)
        return self.heads[-1](feats[-1])

    def regularization(self) -> Tensor:
        """Sum of Eq. 2 over every pool that has a penalty (zero if none does)."""
        terms = [m.regularization() for m in self.modules() if hasattr(m, "regularization")
                 and m is not self]
        if not terms:
            return torch.zeros((), device=self.heads[-1].fc.weight.device)
        return torch.stack(terms).sum()

    def flex_pools(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every pool with learnt spatial weights."""
        return [(n, m) for n, m in self.named_modules() if hasattr(m, "effective_weight")]


def resnet(depth: int = 20, **kwargs) -> CifarResNet:
    """A CIFAR ResNet of depth 6n+2 in VALID_DEPTHS; see :class:`CifarResNet`."""
    return CifarResNet(depth=depth, **kwargs)


def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    pool: str = "avg",
    sac: bool = False,
    dropout: float = 0.0,
    downsample: str = "stride",
    s3pool_grid: int = 2,
) -> CifarResNet:
    """ResNet20 (0.27M parameters with avg pooling and 10 classes)."""
    return CifarResNet(
        20,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        pool=pool,
        sac=sac,
        dropout=dropout,
        downsample=downsample,
        s3pool_grid=s3pool_grid,
    )


def build_model(cfg: DictConfig) -> CifarResNet:
    """The model a run's config describes (``model``, ``dataset``, ``pool``, ``sac``)."""
    return CifarResNet(
        depth=cfg.model.depth,
        num_classes=cfg.dataset.num_classes,
        in_channels=cfg.dataset.in_channels,
        image_size=cfg.dataset.image_size,
        pool=cfg.pool.layer,
        sac=cfg.sac.enabled,
        dropout=cfg.pool.dropout,
        width=cfg.model.width,
        downsample=cfg.model.downsample,
        s3pool_grid=cfg.model.s3pool_grid,
    )
