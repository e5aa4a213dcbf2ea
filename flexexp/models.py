"""CIFAR ResNets (He et al. 2016) with pluggable global pooling and auxiliary heads.

``resnet20()`` is the paper's backbone: a 3x3 conv with 16 channels, three stages of
``n`` basic blocks with 16/32/64 channels (``depth = 6n + 2``), stride 2 at the start
of stages 2 and 3 and parameter-free "option A" shortcuts (subsample, then zero-pad
the new channels). With SAC (PAPER.md sec. 2) every stage gets a head
``pool -> (dropout) -> linear``, each pool sized to its stage's map; the last head is
the main classifier.

``local_pool`` chooses how stages 2 and 3 halve the map (PAPER.md sec. 5): ``None``
(He et al.: the first block's first conv has stride 2, the shortcut keeps every second
row and column) or a factory ``channels -> pool`` of a 2x2, stride-2 local pool
(:data:`flexexp.pooling.LOCAL_POOLS`: ``max``, ``avg``, ``gfgp``, ``s3pool``): that conv
runs at stride 1 and is followed by the pool, and the shortcut is pooled by the same
pool in the same call (one S3Pool draw for both), so the branch and the identity stay
aligned; a pool with ``pools_after_block`` (GFGP, where its authors put it) instead lets
the whole block run at stride 1 and pools its output. Every option halves ``H`` to
``ceil(H/2)``, so ``stage_shapes`` do not depend on it.

``block`` chooses the residual block, stem and init: ``he`` (the above, He et al.'s
conv-BN-ReLU, Kaiming fan-out init) or ``authors`` (the authors' public code, PAPER.md
sec. 6: conv -> ReLU -> BN with conv biases, the shortcut added before the block's last
ReLU and BN, Kaiming-normal fan-in init of convs and linears; :class:`AuthorsBlock`).

The model and its blocks take factories, not pool names and their parameters: a pool's
own settings (FlexPool's ``normalize``, S3Pool's ``grid``, dropout before the head)
travel inside the factory, from the pool's config to its constructor
(:func:`build_model`, :func:`make_head`, :func:`make_local_pool`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from flexexp.pooling import (
    LOCAL_POOLS,
    build_pool,
    check_arguments,
    layer_kwargs,
    local_pool_factory,
    resolve_layer,
)

__all__ = [
    "build_model",
    "stage_shapes",
    "check_depth",
    "check_image_size",
    "make_head",
    "make_local_pool",
    "pool_kwargs",
    "BasicBlock",
    "Head",
    "CifarResNet",
    "resnet20",
    "resnet",
    "VALID_DEPTHS",
    "DOWNSAMPLE_OPTIONS",
    "BLOCKS",
    "AuthorsBlock",
    "check_block",
]

VALID_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)
#: ``model.downsample`` values: the strided conv of He et al., or a local pool by name
#: (or by import path).
DOWNSAMPLE_OPTIONS = ("stride", *LOCAL_POOLS)
#: ``model.block`` values: He et al.'s block (:class:`BasicBlock`) or the authors' code's
#: (:class:`AuthorsBlock`, with its stem and init).
BLOCKS = ("he", "authors")
#: ``(channels, height, width, num_classes) -> head``: ``(B, C, H, W) -> (B, K)`` logits.
HeadFactory = Callable[[int, int, int, int], nn.Module]
#: ``channels -> local pool``: ``(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))``.
LocalPoolFactory = Callable[[int], nn.Module]
#: Keys of a pool config that are not the layer's keyword arguments.
POOL_SHARED_KEYS = ("name", "layer", "reg", "dropout")


def stage_shapes(image_size: int, width: int = 1) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of the three stages' maps: 16/32/64 channels times ``width``; stages 2
    and 3 halve the map with ceil (a stride-2 3x3 conv with padding 1, or a ceil-mode 2x2
    pool), whichever way the model downsamples."""
    shapes, size = [], image_size
    for i, channels in enumerate(STAGE_WIDTHS):
        size = size if i == 0 else -(-size // 2)
        shapes.append((channels * width, size, size))
    return shapes


def check_depth(depth: int) -> None:
    """Raise ``ValueError`` unless ``depth`` is a CIFAR ResNet depth (6n+2, listed)."""
    if depth not in VALID_DEPTHS:
        raise ValueError(
            f"ResNet depth must be one of {', '.join(map(str, VALID_DEPTHS))} (6n+2 with n "
            f"blocks per stage), got {depth}"
        )


def check_image_size(image_size: int) -> None:
    """Raise ``ValueError`` if the three stages cannot halve ``image_size`` twice."""
    if image_size < 4:
        raise ValueError(
            f"image_size {image_size} is too small: the three stages halve it twice, "
            "so it must be at least 4 (e.g. 32)"
        )


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

    With ``stride=2`` and a ``local_pool`` factory, the block computes
    ``conv1 (stride 1) -> pool -> BN -> ReLU -> conv2 -> BN`` and adds
    ``pad_channels(pool(x))``, both pooled in one ``pool_pair`` call where the pool has
    one (:class:`flexexp.pooling.LocalPool`), else in two calls. A pool whose
    ``pools_after_block`` is true (GFGP's default) instead halves the block's output:
    the whole block at stride 1 (shortcut only padding channels), then the pool.
    Shapes: ``(B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))`` for either form.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        local_pool: LocalPoolFactory | None = None,
        bias: bool = False,
        conv2_bias: bool | None = None,
    ) -> None:
        super().__init__()
        conv2_bias = bias if conv2_bias is None else conv2_bias
        pooled = stride != 1 and local_pool is not None
        if pooled and stride != 2:
            raise ValueError(f"a local pool downsamples 2x2 at stride 2, got stride {stride}")
        conv_stride = 1 if pooled else stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, conv_stride, 1, bias=bias)
        # None unless this block downsamples with a pool (keeps the default's modules as-is)
        self.pool: nn.Module | None = local_pool(out_channels) if pooled else None
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=conv2_bias)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            # with a pool the shortcut only pads channels, after the pool downsampled x
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, conv_stride)
        else:
            self.shortcut = nn.Identity()

    def conv1_and_shortcut(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``conv1(x)`` (then the local pool, if any) and the shortcut, aligned."""
        if self.pool is None:
            return self.conv1(x), self.shortcut(x)
        # pool the identity before padding it: half the channels, no zeros to pool
        offset = getattr(self.shortcut, "offset", 0)
        if hasattr(self.pool, "pool_pair"):
            out, skip = self.pool.pool_pair(self.conv1(x), x, offset)
            return out, self.shortcut(skip)
        # a user's pool, built for C_out channels: pad the shortcut, then pool it
        return self.pool(self.conv1(x)), self.pool(self.shortcut(x))

    def forward(self, x: Tensor) -> Tensor:
        if getattr(self.pool, "pools_after_block", False):  # the block at stride 1, then the pool
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return self.pool(F.relu(out + self.shortcut(x)))
        out, skip = self.conv1_and_shortcut(x)
        out = F.relu(self.bn1(out))
        out = self.bn2(self.conv2(out))
        return F.relu(out + skip)


class AuthorsBlock(BasicBlock):
    """The block of the authors' code (aliman80/FlexPoolU, PAPER.md sec. 6):
    ``bn2(relu(conv2(bn1(relu(conv1(x)))) + shortcut(x)))``, convs with biases.

    Every choice follows ``resnet_softflexpool.py`` (the code's model without SAC):
    - conv1 and conv2 3x3, padding 1, with biases (torch's default ``bias=True``): lines 28, 30;
      ``resnet_mscale.py`` (the code's model with SAC) gives conv2 ``bias=False`` at its
      line 30, hence ``conv2_bias`` (:class:`CifarResNet` passes ``not sac``);
    - conv -> ReLU -> BN, the shortcut added before the last ReLU and BN: lines 49-53
      (the same in resnet_mscale.py 49-53);
    - option-A shortcut when the stride or the width changes, ``x[:, :, ::2, ::2]`` padded
      with ``out // 4`` zero channels before and after: lines 36-43. For the doubling
      widths of these ResNets that is :class:`ShortcutA` (``(out - in) // 2 == out // 4``).
    With a ``local_pool`` the pool follows conv1 (at stride 1) as in :class:`BasicBlock`,
    before the ReLU, and pools the shortcut in the same call; a pool with
    ``pools_after_block`` (GFGP, as its authors place it) pools the block's output instead.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        local_pool: LocalPoolFactory | None = None,
        conv2_bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, local_pool, bias=True,
                         conv2_bias=conv2_bias)

    def forward(self, x: Tensor) -> Tensor:
        if getattr(self.pool, "pools_after_block", False):  # at stride 1, then the pool
            out = self.conv2(self.bn1(F.relu(self.conv1(x))))
            return self.pool(self.bn2(F.relu(out + self.shortcut(x))))
        out, skip = self.conv1_and_shortcut(x)
        out = self.conv2(self.bn1(F.relu(out)))
        return self.bn2(F.relu(out + skip))


class Head(nn.Module):
    """Classifier head ``(B, C, H, W) -> pool -> (B, C) -> dropout -> linear -> (B, K)``."""

    def __init__(self, pool: nn.Module, channels: int, num_classes: int, dropout: float = 0.0
                 ) -> None:
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(x)))


def check_block(block: str) -> None:
    """Raise ``ValueError`` unless ``block`` is one of :data:`BLOCKS`."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; valid names: {', '.join(BLOCKS)}")


def _stem(in_channels: int, channels: int, block: str) -> nn.Sequential:
    """He et al.: conv (no bias) -> BN -> ReLU. The authors' code: ``bn1(relu(conv1(x)))``
    with a conv bias (resnet_softflexpool.py lines 67-68 and 87)."""
    if block == "authors":
        return nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1),
                             nn.ReLU(inplace=True), nn.BatchNorm2d(channels))
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


def _block_factory(block: str, sac: bool) -> Callable[..., nn.Module]:
    """``(c_in, c_out, stride=1, local_pool=None) -> block``. The authors' model with SAC
    (resnet_mscale.py line 30) has no conv2 bias, the one without (resnet_softflexpool.py
    line 30) has one."""
    if block == "authors":
        return lambda c_in, c_out, stride=1, local_pool=None: AuthorsBlock(
            c_in, c_out, stride, local_pool, conv2_bias=not sac)
    return BasicBlock


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
        head: HeadFactory | None = None,
        sac: bool = False,
        width: int = 1,
        local_pool: LocalPoolFactory | None = None,
        block: str = "he",
    ) -> None:
        super().__init__()
        head = head or make_head("avg")
        check_block(block)
        check_depth(depth)
        check_image_size(image_size)
        blocks = (depth - 2) // 6
        self.stage_shapes = stage_shapes(image_size, width)
        widths = [c for c, _, _ in self.stage_shapes]
        self.depth, self.sac, self.num_classes = depth, sac, num_classes
        self.block = block
        self.stem = _stem(in_channels, widths[0], block)
        make_block = _block_factory(block, sac)
        stages = []
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = [make_block(c_in, c_out, stride, local_pool)]
            layers += [make_block(c_out, c_out) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        tapped = range(3) if sac else [2]
        self.head_stages = list(tapped)
        self.heads = nn.ModuleList(
            head(*self.stage_shapes[i], num_classes) for i in tapped
        )
        if block == "authors":
            self._init_weights_authors()
        else:
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _init_weights_authors(self) -> None:
        """The authors' ``self.apply(_weights_init)``: ``init.kaiming_normal_(m.weight)``
        on every ``nn.Linear`` and ``nn.Conv2d`` (resnet_softflexpool.py lines 9-11 and 76;
        resnet_mscale.py 9-11 and 84), with torch's defaults ``a=0, mode="fan_in",
        nonlinearity="leaky_relu"``: std ``sqrt(2 / fan_in)``. Biases keep torch's default
        (uniform in ``+-1/sqrt(fan_in)``), BN its default (weight 1, bias 0): the code
        touches neither. The layers inside pools (GFGP's guide) keep their own init: the
        code's pools are bare parameters, so it says nothing about them."""
        inside_pools = {id(m) for owner in self.modules()
                        if isinstance(getattr(owner, "pool", None), nn.Module)
                        for m in owner.pool.modules()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and id(m) not in inside_pools:
                nn.init.kaiming_normal_(m.weight)

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


def make_head(pool: str = "avg", dropout: float = 0.0, **pool_kwargs: Any) -> HeadFactory:
    """A :class:`Head` factory: the global pool ``pool`` (registry name or import path)
    built with ``pool_kwargs`` for each head's map, dropout ``dropout`` before the linear."""
    def head(channels: int, height: int, width: int, num_classes: int) -> nn.Module:
        return Head(build_pool(pool, channels, height, width, **pool_kwargs), channels,
                    num_classes, dropout)
    return head


def make_local_pool(downsample: str, **kwargs: Any) -> LocalPoolFactory | None:
    """``None`` for ``stride``, else a factory of the local pool ``downsample`` (registry
    name or import path) built with ``kwargs``."""
    if downsample == "stride":
        return None
    # fail here on a bad name or argument (without building: no random draws)
    check_arguments(resolve_layer(downsample, LOCAL_POOLS, "local pool"), (1,),
                    layer_kwargs(kwargs, 0), f"local pool {downsample!r}")
    return local_pool_factory(downsample, **kwargs)  # a list argument: one per layer


def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    pool: str = "avg",
    sac: bool = False,
    dropout: float = 0.0,
    downsample: str = "stride",
    pool_kwargs: dict[str, Any] | None = None,
    downsample_kwargs: dict[str, Any] | None = None,
    block: str = "he",
) -> CifarResNet:
    """ResNet20 (0.27M parameters with avg pooling and 10 classes), by pool names."""
    return CifarResNet(
        20,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        head=make_head(pool, dropout, **(pool_kwargs or {})),
        sac=sac,
        local_pool=make_local_pool(downsample, **(downsample_kwargs or {})),
        block=block,
    )


def pool_kwargs(pool_cfg: Any) -> dict[str, Any]:
    """The keyword arguments of a pool config's layer: its keys but the shared ones."""
    items = OmegaConf.to_container(pool_cfg, resolve=True) if isinstance(pool_cfg, DictConfig) \
        else dict(pool_cfg)
    return {k: v for k, v in items.items() if k not in POOL_SHARED_KEYS}


def build_model(cfg: DictConfig) -> CifarResNet:
    """The model a run's config describes (``model``, ``dataset``, ``pool``, ``sac``)."""
    local_args = OmegaConf.to_container(cfg.model.local_pool_args, resolve=True).get(
        cfg.model.downsample) or {}
    return CifarResNet(
        depth=cfg.model.depth,
        num_classes=cfg.dataset.num_classes,
        in_channels=cfg.dataset.in_channels,
        image_size=cfg.dataset.image_size,
        head=make_head(cfg.pool.layer, cfg.pool.dropout, **pool_kwargs(cfg.pool)),
        sac=cfg.sac.enabled,
        width=cfg.model.width,
        local_pool=make_local_pool(cfg.model.downsample, **dict(local_args)),
        block=cfg.model.block,
    )
