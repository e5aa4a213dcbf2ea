"""model.block=authors against a reimplementation of the authors' code, model.block=he
unchanged, and experiment=authors_code (PAPER.md sec. 6; aliman80/FlexPoolU)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import assert_within, gamma, make_cfg, n_params, net, run_cli
from torch import nn

from flexexp.config import validate
from flexexp.errors import ConfigError
from flexexp.models import DOWNSAMPLE_OPTIONS, build_model, resnet20

# ---------------------------------------------------------------- the reference network


class RefBlock(nn.Module):
    """resnet_softflexpool.py / resnet_mscale.py BasicBlock, option A, written from the
    formula; ``he`` gives He et al.'s block instead (no biases, conv-BN-ReLU)."""

    def __init__(self, c_in: int, c_out: int, stride: int, he: bool, conv2_bias: bool):
        super().__init__()
        self.he, self.c_out = he, c_out
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not he)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=conv2_bias and not he)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = stride != 1 or c_in != c_out

    def forward(self, x):
        skip = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.c_out // 4, self.c_out // 4),
                     "constant", 0) if self.down else x
        if self.he:
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(out + skip)
        out = self.conv2(self.bn1(F.relu(self.conv1(x))))
        out += skip
        return self.bn2(F.relu(out))


class RefNet(nn.Module):
    """The authors' ResNet20 (resnet_mscale.py with ``sac``, else resnet_softflexpool.py):
    softmax FlexPool heads, ``(out * softmax(W)).sum((2, 3))``; ``he`` with average pools."""

    def __init__(self, c_in: int, size: int, sac: bool, he: bool = False, classes: int = 10):
        super().__init__()
        self.sac, self.he = sac, he
        self.conv1 = nn.Conv2d(c_in, 16, 3, 1, 1, bias=not he)
        self.bn1 = nn.BatchNorm2d(16)
        dims, sizes = [16, 32, 64], [size, -(-size // 2), -(-size // 4)]
        prev = 16
        for i, (c, s) in enumerate(zip(dims, sizes, strict=True), 1):
            blocks = [RefBlock(prev if j == 0 else c, c, 2 if (i > 1 and j == 0) else 1, he,
                               conv2_bias=not sac) for j in range(3)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            if (sac or i == 3) and not he:
                setattr(self, f"flex_pool{i}", nn.Parameter(torch.ones(c, s, s) / s**2))
            if sac or i == 3:
                setattr(self, f"linear{i}", nn.Linear(c, classes))
            prev = c

    def pooled(self, out, i):
        if self.he:
            return out.mean((2, 3))
        fp = getattr(self, f"flex_pool{i}")
        return (out * fp.view(fp.shape[0], -1).softmax(1).view(fp.shape)).sum((2, 3))

    def forward(self, x):
        """``(features of the three stages, pooled of the heads, logits of the heads)``."""
        out = F.relu(self.bn1(self.conv1(x))) if self.he else self.bn1(F.relu(self.conv1(x)))
        feats, pooled, logits = [], [], []
        for i in (1, 2, 3):
            out = getattr(self, f"layer{i}")(out)
            feats.append(out)
            if self.sac or i == 3:
                pooled.append(self.pooled(out, i))
                logits.append(getattr(self, f"linear{i}")(pooled[-1]))
        return feats, pooled, logits


def _ref_key(key: str, head_stages: list[int]) -> str:
    """Our state-dict key -> the reference's (the authors' names)."""
    key = key.replace("stem.0.", "conv1.").replace("stem.2.", "bn1.").replace("stem.1.", "bn1.")
    key = re.sub(r"^stages\.(\d)\.", lambda m: f"layer{int(m[1]) + 1}.", key)
    key = re.sub(r"^heads\.(\d)\.pool\.weight", lambda m: f"flex_pool{head_stages[int(m[1])] + 1}",
                 key)
    return re.sub(r"^heads\.(\d)\.fc\.", lambda m: f"linear{head_stages[int(m[1])] + 1}.", key)


def _randomised(model: nn.Module) -> nn.Module:
    """Every parameter and BN statistic moved off its init, so a swapped one shows."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen)
                t.copy_(0.5 + noise.abs() if "running_var" in name else t + 0.1 * noise)
    return model


def _pair(sac: bool, he: bool = False, size: int = 12):
    """(our model, the reference with our weights) for 3-channel ``size`` images."""
    torch.manual_seed(0)
    ours = _randomised(resnet20(image_size=size, sac=sac, block="he" if he else "authors",
                                pool="avg" if he else "flex_softmax"))
    ref = RefNet(3, size, sac, he)
    state = {_ref_key(k, ours.head_stages): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(state, strict=True)  # every tensor has its twin, of the same shape
    return ours, ref


@pytest.mark.parametrize("sac", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_authors_block_matches_the_code(sac, training):
    ours, ref = _pair(sac)
    ours.train(training), ref.train(training)
    x = torch.randn(4, 3, 12, 12)
    feats, pooled, logits = ref(x)
    # the same ops (conv with bias, relu, batch_norm, pad, add) in the same order: equal
    for a, b in zip(ours.forward_features(x), feats, strict=True):
        assert torch.equal(a, b)
    heads = ours.forward_heads(x) if training else [ours(x)]
    for k, (head, i) in enumerate(zip(ours.heads, ours.head_stages, strict=True)):
        if not training and k < len(ours.heads) - 1:
            continue  # evaluation runs the main head only, as the code does
        f, p = feats[i], pooled[k - len(ours.heads)]
        # einsum against multiply-then-sum over H*W: each within gamma_(HW+1) of exact
        w = head.pool.effective_weight().detach()
        bound_p = 2 * gamma(f[0, 0].numel() + 1, x.dtype) * (f.abs() * w).sum((2, 3))
        assert_within(head.pool(f), p, bound_p, f"pooled, stage {i + 1}")
        # then the same linear on inputs bound_p apart, each rounding within gamma_(C+1)
        fc = head.fc
        bound = bound_p @ fc.weight.abs().T + 2 * gamma(p.shape[1] + 1, x.dtype) * (
            p.abs() @ fc.weight.abs().T + fc.bias.abs())
        assert_within(heads[k - len(ours.heads)], logits[k - len(ours.heads)], bound.detach(),
                      f"logits, stage {i + 1}")


def test_he_block_is_he_et_al_and_the_default():
    ours, ref = _pair(sac=False, he=True)
    x = torch.randn(4, 3, 12, 12)
    for training in (False, True):  # evaluation first: training moves the BN statistics
        ours.train(training), ref.train(training)
        feats, _, logits = ref(x)
        assert all(torch.equal(a, b) for a, b in zip(ours.forward_features(x), feats, strict=True))
        assert torch.equal(ours(x), logits[-1])  # mean, then the same linear: same ops
    assert not any(k.endswith("bias") and "conv" in k for k in ours.state_dict())
    torch.manual_seed(0)
    default = build_model(make_cfg([])).state_dict()  # the config's default is he
    torch.manual_seed(0)
    he = resnet20(in_channels=1, image_size=8, block="he").state_dict()
    assert list(default) == list(he) and all(torch.equal(default[k], he[k]) for k in he)


def test_parameter_counts():
    # option-A ResNet20: 269,722 (test_models); the code adds a bias to every conv: the
    # stem's 16 and 3 blocks x (16 + 32 + 64) per conv of a block, 336
    he, authors = n_params(resnet20()), n_params(resnet20(block="authors"))
    assert he == 269_722 and authors == he + 16 + 2 * 336
    # with SAC (resnet_mscale.py:30) conv2 has no bias
    he_sac = n_params(resnet20(sac=True, pool="flex_softmax"))
    assert n_params(resnet20(sac=True, pool="flex_softmax", block="authors")) == he_sac + 16 + 336
    for sac in (False, True):
        _, ref = _pair(sac, size=32)
        assert n_params(ref) == n_params(resnet20(sac=sac, pool="flex_softmax", block="authors"))


def test_authors_init_is_kaiming_normal_fan_in():
    """init.kaiming_normal_(m.weight) with torch's defaults: N(0, 2 / fan_in) for every conv
    and linear; biases torch's default U(+-1/sqrt(fan_in)); BN 1 and 0 (never touched).

    With ``n`` draws, ``mean(w^2) / sigma^2`` has mean 1 and standard deviation
    ``sqrt(2 / n)``, the mean ``sigma / sqrt(n)``: both within 6 of those. The code's
    other candidates land far outside: fan-out (the stem: 27 against 144, the heads:
    64 against 10) or torch's default U (variance 1 / (3 fan_in), 6 times smaller)."""
    torch.manual_seed(0)
    m = resnet20(block="authors", sac=True, pool="flex_softmax")
    layers = [x for x in m.modules() if isinstance(x, nn.Conv2d | nn.Linear)]
    assert len(layers) == 19 + 3  # 19 convs, a linear per head
    for layer in layers:
        w = layer.weight.detach().double()
        fan_in, n = w[0].numel(), w.numel()
        ratio = w.pow(2).mean().item() / (2 / fan_in)
        assert abs(ratio - 1) <= 6 * math.sqrt(2 / n), (layer, ratio)
        assert abs(w.mean().item()) <= 6 * math.sqrt(2 / fan_in) / math.sqrt(n), layer
        if layer.bias is not None:  # None: conv2 with SAC (resnet_mscale.py:30)
            b = layer.bias.detach()
            assert 0 < b.abs().max().item() <= 1 / math.sqrt(fan_in), layer
    assert sum(x.bias is None for x in layers) == 9
    for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("downsample", DOWNSAMPLE_OPTIONS)
@pytest.mark.parametrize("pool", ["avg", "max", "flex", "flex_softmax", "gfgp"])
def test_authors_block_takes_every_pool(downsample, pool):
    m = net(in_channels=1, image_size=7, downsample=downsample, sac=True, pool=pool,
            block="authors")
    x = torch.randn(3, 1, 7, 7)
    assert [tuple(f.shape[1:]) for f in m.forward_features(x)] == m.stage_shapes
    outs = m.train().forward_heads(x)
    assert [tuple(o.shape) for o in outs] == [(3, 10)] * 3
    sum(o.logsumexp(1).sum() for o in outs).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters()
               if p.requires_grad and p.grad is not None)
    assert m.stages[0][0].conv1.bias is not None and m.eval()(x).isfinite().all()


def test_unknown_block_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match=r"model.block='resnet' is unknown; valid names: "
                                          r"he, authors"):
        validate(make_cfg(["model.block=resnet"]))
    with pytest.raises(ValueError, match="unknown block 'resnet'; valid names: he, authors"):
        resnet20(block="resnet")


# ---------------------------------------------------------------- experiment=authors_code


def test_preset_shows_the_codes_settings(tmp_path):
    proc = run_cli(["experiment=authors_code", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["block"] == "authors"
    assert cfg["pool"]["layer"] == "flex_softmax" and cfg["pool"]["reg"] == 0
    assert cfg["pool"]["dropout"] == 0
    assert cfg["sac"]["enabled"] and cfg["sac"]["weights"] == [0.01, 0.11, 0.88]
    assert {k: cfg["optim"][k] for k in ("name", "lr", "weight_decay", "momentum", "nesterov")} \
        == {"name": "sgd", "lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False}
    assert cfg["sched"]["name"] == "onecycle"
    assert (cfg["dataset"]["flip"], cfg["dataset"]["scale"], cfg["dataset"]["translate"]) \
        == (True, [1.0, 1.0], 0)
    assert cfg["paths"]["runs"] == "runs/authors-code"
    params = make_cfg(["experiment=authors_code"], return_hydra_config=True).hydra.sweeper.params
    assert dict(params) == {"dataset": "cifar10,fashion_mnist,cifar100,tiny_imagenet",
                            "pool": "avg,flex_softmax", "sac": "off,on", "seed": "0,1,2"}


def test_one_cell_of_the_preset_trains_on_digits(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(["experiment=authors_code", "hydra.mode=RUN", "dataset=digits",
                    "trainer.epochs=1", "trainer.progress=false", "trainer.device=cpu",
                    "trainer.threads=1", f"paths.runs={runs}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(runs.rglob("result.json")).read_text())
    assert result["status"] == "completed"
    cell = json.loads(next(runs.rglob("cell.json")).read_text())["config"]
    assert cell["model"]["block"] == "authors" and cell["pool"]["name"] == "flex_softmax"


def test_every_cell_of_the_preset_validates():
    cfg = make_cfg(["experiment=authors_code"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    for dataset in params.dataset.split(","):
        for pool in params.pool.split(","):
            for sac in params.sac.split(","):
                validate(make_cfg(["experiment=authors_code", f"dataset={dataset}",
                                   f"pool={pool}", f"sac={sac}"]))
