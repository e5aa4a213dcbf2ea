"""flexexp.optim.Adam: torch.optim.Adam's arithmetic and state format, without TorchDynamo."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flexexp.optim import Adam, build_optimizer, no_decay_parameters, param_groups


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
        "from flexexp.models import build_model\nfrom flexexp.engine import TrainStep\n"
        "cfg = compose_config(['dataset=synthetic', 'dataset.image_size=8', 'optim=adam'])\n"
        "model = build_model(cfg)\n"
        "from flexexp.engine import resolve_speed\n"
        "cpu = torch.device('cpu')\n"
        "step = TrainStep(cfg, model, cpu, resolve_speed(cfg.trainer, cpu))\n"
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


# ---------------------------------------------------------------------------- parameter groups


def _groups(model: torch.nn.Module) -> list[dict]:
    """Decayed conv/linear weights, and BN + biases without decay, as no_decay builds."""
    return param_groups(model, ["bn", "bias"])


@pytest.mark.parametrize("decoupled", [False, True])
def test_parameter_groups_and_decoupled_decay_are_bit_identical_to_torch(decoupled):
    ours, ref = _model(), _model()
    o_ours = Adam(_groups(ours), lr=1e-2, weight_decay=0.05, decoupled_weight_decay=decoupled)
    ref_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    o_ref = ref_cls(_groups(ref), lr=1e-2, weight_decay=0.05)
    _train(ours, o_ours, 5)
    _train(ref, o_ref, 5)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    s_ours, s_ref = o_ours.state_dict(), o_ref.state_dict()
    assert [g["params"] for g in s_ours["param_groups"]] == \
        [g["params"] for g in s_ref["param_groups"]]
    assert [g["weight_decay"] for g in s_ours["param_groups"]] == [0.05, 0.0]
    # the state round-trips into a fresh optimiser with the same groups, not another's
    again = Adam(_groups(copy.deepcopy(ours)), lr=1e-2, weight_decay=0.05,
                 decoupled_weight_decay=decoupled)
    again.load_state_dict(s_ours)
    with pytest.raises(ValueError, match="another optim.no_decay"):
        Adam(copy.deepcopy(ours).parameters(), lr=1e-2).load_state_dict(s_ours)


def test_no_decay_groups_bn_biases_and_pools():
    from flexexp.models import resnet20

    model = resnet20(pool="flex", sac=True, downsample="gfgp")
    names = {id(p): n for n, p in model.named_parameters()}

    def exempt(kinds):
        return sorted(names[i] for i in no_decay_parameters(model, kinds))

    bn = exempt(["bn"])
    assert bn and all(".bn" in n or "stem.1" in n for n in bn)
    assert all(n.endswith(".bias") for n in exempt(["bias"]))
    pools = exempt(["pool"])
    # each head's FlexPool weight and each downsampling GFGP guide, nothing else
    assert sum(n.startswith("heads.") for n in pools) == 3
    assert {n.split(".pool.")[0] for n in pools if n.startswith("stages.")} == \
        {"stages.1.0", "stages.2.0"}
    assert all(".pool." in n for n in pools)
    groups = param_groups(model, ["bn", "pool"])
    assert [g.get("weight_decay") for g in groups] == [None, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert param_groups(model, []) == [{"params": list(model.parameters())}]


def test_optim_config_builds_groups_and_rejects_unknown_kinds():
    from helpers import make_cfg

    from flexexp.config import validate
    from flexexp.errors import ConfigError
    from flexexp.models import build_model

    cfg = make_cfg(["optim.no_decay=[bn,pool]", "optim.weight_decay=5e-4", "pool=flex"])
    validate(cfg)
    opt = build_optimizer(cfg, build_model(cfg))
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    with pytest.raises(ConfigError, match=r"optim.no_decay=\['batchnorm'\] must list some of "
                                          r"bn, bias, pool"):
        validate(make_cfg(["optim.no_decay=[batchnorm]"]))
    sgd = make_cfg(["optim=sgd", "optim.no_decay=[bn]"])
    validate(sgd)
    assert isinstance(build_optimizer(sgd, build_model(sgd)), torch.optim.SGD)


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_steps_are_bit_identical_to_torch_fused_adam(decoupled):
    # the GPU path: the trainer asks for the fused kernel on CUDA; torch has it on the CPU
    # too, so the same code is checked here against torch's own fused Adam
    ours, ref = _model(), _model()
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.05,
          "decoupled_weight_decay": decoupled, "fused": True}
    _train(ours, Adam(ours.parameters(), **kw), 5)
    _train(ref, torch.optim.Adam(ref.parameters(), **kw), 5)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fused_and_unfused_adam_agree_within_rounding():
    # one step from the same gradients: the fused kernel and the foreach path evaluate
    # p - lr * m_hat / (sqrt(v_hat) + eps) in different orders. Both are within ~10
    # roundings of the exact update u (|u| <= lr * |m_hat| / (sqrt(v_hat) + eps) <= lr
    # after the first step, as |m_hat| = sqrt(v_hat)) and one of the subtraction
    from helpers import gamma

    a, b = _model(), _model()
    opt_a = Adam(a.parameters(), lr=1e-2, fused=True)
    opt_b = Adam(b.parameters(), lr=1e-2)
    _train(a, opt_a, 1)
    _train(b, opt_b, 1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        bound = 2 * gamma(12, torch.float32) * (pb.abs() + 1e-2)
        assert ((pa - pb).abs() <= bound).all()
    assert opt_a.state[next(a.parameters())]["step"].dtype == torch.float32


def test_fused_state_loads_into_unfused_and_back():
    a, b = _model(), _model()
    opt_a = Adam(a.parameters(), lr=1e-2, fused=True)
    _train(a, opt_a, 2)
    opt_b = Adam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())  # a GPU checkpoint resumed on a CPU
    st = opt_b.state[next(b.parameters())]
    assert st["step"].device.type == "cpu" and float(st["step"]) == 2.0
    assert "fused" not in opt_b.param_groups[0] or not opt_b.param_groups[0]["fused"]
    back = Adam(_model().parameters(), lr=1e-2, fused=True)
    back.load_state_dict(opt_b.state_dict())
    assert back.param_groups[0]["fused"] is True


def test_build_optimizer_fuses_only_when_asked_and_the_user_can_say_no():
    from helpers import make_cfg

    model = _model()
    assert not build_optimizer(make_cfg([]), model).param_groups[0].get("fused")
    assert build_optimizer(make_cfg([]), model, fused=True).param_groups[0]["fused"] is True
    sgd = build_optimizer(make_cfg(["optim=sgd"]), model, fused=True)
    assert sgd.param_groups[0]["fused"] is True


def _one_cycle_run(model, opt, steps, total, cfg, torch_sched=None, start=0):
    """``_train``'s batches with the one-cycle LR and beta1 of each step: set as the
    trainer sets them (``engine``'s functions), or by torch's OneCycleLR."""
    from flexexp import engine

    gen = torch.Generator().manual_seed(1)
    for i in range(start + steps):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        if i < start:
            continue
        if torch_sched is None:
            m = engine.momentum(cfg, i, total)
            for g in opt.param_groups:
                g["lr"] = engine.learning_rate(cfg, i, total)
                g["betas"] = (m, g["betas"][1])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if torch_sched is not None:
            torch_sched.step()


def test_cycled_betas_are_bit_identical_to_torch_onecycle_and_resume_exactly():
    from helpers import make_cfg

    cfg = make_cfg(["optim.lr=0.01"])  # one-cycle with cycle_momentum (the default)
    total = 10
    ours, ref, resumed = _model(), _model(), _model()
    o_ours = Adam(ours.parameters(), lr=0.01, betas=(0.9, 0.999))
    o_ref = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(o_ref, max_lr=0.01, total_steps=total)
    _one_cycle_run(ours, o_ours, 4, total, cfg)
    _one_cycle_run(ref, o_ref, 4, total, cfg, sched)
    # a checkpoint after 4 steps: its betas are those of step 3, not the configured ones
    model_state, opt_state = copy.deepcopy(ours.state_dict()), copy.deepcopy(o_ours.state_dict())
    assert opt_state["param_groups"][0]["betas"][0] != 0.9
    _one_cycle_run(ours, o_ours, total - 4, total, cfg, start=4)
    _one_cycle_run(ref, o_ref, total - 4, total, cfg, sched, start=4)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    # resumed from that checkpoint, each step sets its own beta1 again: the same run
    resumed.load_state_dict(model_state)
    o_res = Adam(resumed.parameters(), lr=0.01, betas=(0.9, 0.999))
    o_res.load_state_dict(opt_state)
    _one_cycle_run(resumed, o_res, total - 4, total, cfg, start=4)
    for a, b in zip(ours.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
