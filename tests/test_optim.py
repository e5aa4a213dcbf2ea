"""flexexp.optim.Adam: torch.optim.Adam's arithmetic and state format, without TorchDynamo."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flexexp.optim import Adam


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 5))


def _train(model, opt, steps, start=0):
    gen = torch.Generator().manual_seed(1)
    for i in range(start + steps):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        if i < start:
            continue
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (1 + i % 3)  # as the trainer sets the one-cycle LR each step
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_steps_are_bit_identical_to_torch_adam(weight_decay):
    ours, ref = _model(), _model()
    _train(ours, Adam(ours.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay), 5)
    _train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.99),
                                 weight_decay=weight_decay), 5)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_has_torch_adams_format_both_ways():
    ours, ref = _model(), _model()
    o_ours = Adam(ours.parameters(), lr=1e-2)
    o_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    _train(ours, o_ours, 3)
    _train(ref, o_ref, 3)
    s_ours, s_ref = o_ours.state_dict(), o_ref.state_dict()
    assert s_ours["param_groups"] == s_ref["param_groups"]
    assert s_ours["state"].keys() == s_ref["state"].keys()
    for i, st in s_ref["state"].items():
        assert s_ours["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(s_ours["state"][i][k], v) and s_ours["state"][i][k].dtype == v.dtype

    # a checkpoint of either continues in the other exactly as in the same class
    a, b = copy.deepcopy(ours), copy.deepcopy(ref)
    o_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    o_a.load_state_dict(s_ours)
    o_b = Adam(b.parameters(), lr=1e-2)
    o_b.load_state_dict(s_ref)
    _train(a, o_a, 2, start=3)
    _train(b, o_b, 2, start=3)
    _train(ref, o_ref, 2, start=3)
    for pa, pb, pr in zip(a.parameters(), b.parameters(), ref.parameters(), strict=True):
        assert torch.equal(pa, pr) and torch.equal(pb, pr)


def test_loading_a_state_of_another_model_is_refused():
    opt = Adam(_model().parameters())
    other = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="belongs to another model"):
        opt.load_state_dict(other.state_dict())


def test_a_state_with_options_it_does_not_implement_is_refused():
    model = _model()
    ref = torch.optim.Adam(model.parameters(), amsgrad=True)
    opt = Adam(model.parameters())
    with pytest.raises(ValueError, match="does not support amsgrad=True"):
        opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["amsgrad"] is False and opt.state == {}


def test_the_trainer_reaches_its_first_step_without_torchdynamo(tmp_path):
    # torch.optim.Optimizer imports TorchDynamo (~1.5 s of start-up); our Adam does not
    code = (
        "import sys, torch\n"
        "from flexexp.config import compose_config\n"
        "from flexexp.models import build_model\nfrom flexexp.trainer import TrainStep\n"
        "cfg = compose_config(['dataset=synthetic', 'dataset.image_size=8', 'optim=adam'])\n"
        "model = build_model(cfg)\n"
        "step = TrainStep(cfg, model, torch.device('cpu'), None)\n"
        "x = torch.randn(4, 3, 8, 8)\n"
        "step.step(x, torch.tensor([0, 1, 2, 3]), 1e-3)\n"
        "step.step(x, torch.tensor([0, 1, 2, 3]), 1e-3)\n"
        "print(__import__('json').dumps({'dynamo': 'torch._dynamo' in sys.modules,\n"
        "    'optimizer': type(step.optimizer).__module__}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"dynamo": False, "optimizer": "flexexp.optim"}


def test_grad_scaler_skips_a_step_with_inf_gradients_and_takes_the_next():
    # the fp16 path: torch.amp.GradScaler unscales through param_groups and calls step()
    model = _model()
    opt = Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.state == {} and scaler.get_scale() == 2.0**9  # skipped, scale halved
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(float(st["step"]) == 1.0 for st in opt.state.values())
