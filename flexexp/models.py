"""CIFAR ResNets (He et al. 2016) with pluggable global pooling and auxiliary heads.

``resnet20()`` is the paper's backbone: a 3x3 conv with 16 channels, three stages of
``n`` basic blocks with 16/32/64 channels (``depth = 6n + 2``), stride 2 at the start
of stages 2 and 3 and parameter-free "option A" shortcuts (subsample, then zero-pad
the new channels). With SAC (PAPER.md sec. 2) every stage gets a head
``pool -> (dropout) -> linear``, each pool sized to its stage's map; the last head is
the main classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexexp.pooling import build_pool

__all__ = ["BasicBlock", "Head", "CifarResNet", "resnet20", "resnet", "VALID_DEPTHS"]

VALID_DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Option-A shortcut: ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)`` without parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            # zero channels split before and after, as in He et al.'s CIFAR code
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


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
        if downsample != "stride":
            raise ValueError(f"downsample={downsample!r} is not available yet; use 'stride'")
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
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, sizes = [], []
        c_in, size = widths[0], image_size
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            size = -(-size // stride)  # ceil: a stride-2 3x3 conv with padding 1
            layers = [BasicBlock(c_in, c_out, stride)]
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
    """A CIFAR ResNet of the given depth (20, 32, 44, 56 or 110); see :class:`CifarResNet`."""
    return CifarResNet(depth=depth, **kwargs)


def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    pool: str = "avg",
    sac: bool = False,
    dropout: float = 0.0,
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
    )
