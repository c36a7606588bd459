"""Both wrappers inside a plain PyTorch loop ([KS21] Algorithm 1, [K22] §3.2; docs/design.md)."""
import copy

import pytest
import torch
from torch import nn

from global_convergence import EEWrapper, TwoPhase, UserInputError, ee_model, two_phase_model
from global_convergence.models import MLP, LeNet, ResNet18

N = 24


def _data(seed=0, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, 16, 16, generator=g) if image else torch.randn(N, 3, generator=g)
    y = torch.randint(0, 2, (N,), generator=g)
    return x, y


def _loss(model, x, y):
    return nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y.float())


def _run(wrapper, model, x, y, steps, closure=False):
    losses = []
    for _ in range(steps):
        def fn():
            wrapper.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss
        if closure:
            losses.append(float(wrapper.step(fn)))
        else:
            losses.append(float(fn()))
            wrapper.step()
    return losses


def _snapshot(params):
    return [p.detach().clone() for p in params]


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_two_phase_frozen_hidden_parameters_are_bit_identical_in_phase2(name):
    torch.manual_seed(0)
    x, y = _data()
    model = two_phase_model(MLP(3, 1, hidden=(16, 16)), n=8)
    opt = OPTIMIZERS[name](model.parameters())
    wrapper = TwoPhase(model, opt, tau=3, delta0=1e-3)
    _run(wrapper, model, x, y, 3)
    assert wrapper.phase == 2 and wrapper.switch_step == 3
    hidden, head = _snapshot(model.trunk.parameters()), _snapshot(model.head.parameters())
    _run(wrapper, model, x, y, 5)
    for before, after in zip(hidden, model.trunk.parameters()):
        assert torch.equal(before, after)
    assert any(not torch.equal(b, a) for b, a in zip(head, model.head.parameters()))
    assert all(p.grad is None for p in model.trunk.parameters())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_ee_trunk_and_output_layer_are_bit_identical_in_exploitation(name):
    torch.manual_seed(0)
    x, y = _data()
    model = ee_model(MLP(3, 1, hidden=(16, 16)), n=N)
    wrapper = EEWrapper(model, OPTIMIZERS[name](model.parameters()), tau=3, eps=1e-2)
    _run(wrapper, model, x, y, 3)
    frozen = _snapshot(model.trunk.parameters()) + [model.head.out_weight.detach().clone()]
    gates, weight = model.head.gates.clone(), model.head.weight.detach().clone()
    assert torch.equal(gates, weight) and not model.head.are_gates_tied
    _run(wrapper, model, x, y, 5)
    for before, after in zip(frozen, list(model.trunk.parameters()) + [model.head.out_weight]):
        assert torch.equal(before, after)
    assert torch.equal(model.head.gates, gates)
    assert not torch.equal(model.head.weight, weight)
    assert type(wrapper.active_optimizer) is type(wrapper.optimizer)
    assert wrapper.active_optimizer is not wrapper.optimizer


def test_perturbation_is_reproducible_from_the_seed_and_has_the_asked_scale():
    def params_after_switch(seed):
        torch.manual_seed(0)
        model = two_phase_model(MLP(3, 1, hidden=(64, 64)), n=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)     # lr 0: only the perturbation moves θ
        before = _snapshot(model.trunk.parameters())
        wrapper = TwoPhase(model, opt, tau=1, delta0=0.01, seed=seed)
        x, y = _data()
        _run(wrapper, model, x, y, 1)
        return [a - b for a, b in zip(model.trunk.parameters(), before)]

    a, b, c = params_after_switch(5), params_after_switch(5), params_after_switch(6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    noise = torch.cat([d.flatten() for d in a])
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)


def test_ee_perturbs_hidden_and_head_weight_but_not_output_layer():
    torch.manual_seed(0)
    model = ee_model(MLP(3, 1, hidden=(32, 32)), n=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out_before, w_before = model.head.out_weight.detach().clone(), model.head.weight.detach().clone()
    wrapper = EEWrapper(model, opt, tau=1, eps=0.1)
    _run(wrapper, model, *_data(), 1)
    assert torch.equal(model.head.out_weight, out_before)
    assert (model.head.weight - w_before).std().item() == pytest.approx(0.1, rel=0.1)


def test_batchnorm_statistics_are_recomputed_at_switch_and_fixed_afterwards():
    torch.manual_seed(0)
    x, y = _data(image=True)
    model = ee_model(ResNet18(1, 1), n=N, head_width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = list(torch.split(x, 8))
    wrapper = EEWrapper(model, opt, tau=2, eps=1e-3, bn_data=batches)
    _run(wrapper, model, x, y, 2)
    bn = model.trunk.stem[1]
    # update_bn semantics: running mean = average over batches of each batch's mean
    with torch.no_grad():
        expected = torch.stack([model.trunk.stem[0](b).mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-6)
    stats = bn.running_mean.clone()
    model.train()
    _run(wrapper, model, x, y, 3)
    assert torch.equal(bn.running_mean, stats)
    assert wrapper.statistics_recomputed


def test_lbfgs_exploitation_needs_a_closure_and_solves_the_convex_phase():
    torch.manual_seed(0)
    x = torch.rand(40, 1) * 2 - 1
    y = (torch.sin(20 * x[:, 0]) < 0).long()
    model = ee_model(MLP(1, 1, hidden=(64, 64)), n=40)
    wrapper = EEWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), tau=2, eps=1e-2,
                        exploit_optimizer="lbfgs")
    _run(wrapper, model, x, y, 2)
    assert isinstance(wrapper.active_optimizer, torch.optim.LBFGS)
    with pytest.raises(ValueError, match="closure"):
        wrapper.step()
    losses = _run(wrapper, model, x, y, 15, closure=True)
    assert losses[-1] < 0.05 * losses[0]


def test_state_dict_round_trip_after_switch_continues_identically():
    torch.manual_seed(0)
    x, y = _data()
    model = ee_model(MLP(3, 1, hidden=(16, 16)), n=N)
    wrapper = EEWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), tau=3, eps=1e-2)
    _run(wrapper, model, x, y, 5)
    model_state, wrapper_state = copy.deepcopy(model.state_dict()), copy.deepcopy(wrapper.state_dict())
    reference = _run(wrapper, model, x, y, 4)

    torch.manual_seed(123)
    fresh = ee_model(MLP(3, 1, hidden=(16, 16)), n=N)
    fresh_wrapper = EEWrapper(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9), tau=3, eps=1e-2)
    fresh.load_state_dict(model_state)
    fresh_wrapper.load_state_dict(wrapper_state)
    assert fresh_wrapper.phase == 2 and not fresh.head.are_gates_tied
    assert _run(fresh_wrapper, fresh, x, y, 4) == reference


def test_two_phase_keeps_the_users_optimizer_and_its_output_layer_state():
    torch.manual_seed(0)
    model = two_phase_model(MLP(3, 1, hidden=(16, 16)), n=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = TwoPhase(model, opt, tau=2, delta0=1e-3)
    _run(wrapper, model, *_data(), 2)
    assert wrapper.active_optimizer is opt and wrapper.param_groups is opt.param_groups
    assert set(opt.state) == set(model.head.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scheduler.step()
    assert wrapper.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tau=0, eps=1e-3), "tau must be a positive integer"),
    (dict(tau=10, eps=1e-3, total_steps=10), r"tau=10 is beyond the run: it must satisfy 0 < tau < T=10"),
    (dict(tau=2, eps=0.0), "eps must be a positive finite number, got 0.0"),
    (dict(tau=2, eps=-1.0), "eps must be a positive finite number, got -1.0"),
    (dict(tau=2, eps=1e-3, exploit_optimizer="newton"), "unknown exploit_optimizer 'newton'"),
])
def test_ee_wrapper_rejects_bad_arguments(kwargs, message):
    model = ee_model(MLP(3, 1, hidden=(8, 8)), n=N)
    with pytest.raises(UserInputError, match=message):
        EEWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_wrappers_refuse_models_they_cannot_guarantee():
    plain = MLP(3, 1)
    with pytest.raises(UserInputError, match=r"needs a model built by two_phase_model\(base, n\), got MLP"):
        TwoPhase(plain, torch.optim.SGD(plain.parameters(), lr=0.1), tau=2, delta0=1e-3)
    relu = two_phase_model(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)), n=4)
    with pytest.raises(UserInputError, match=r"real-analytic model, but these modules are not: trunk.1"):
        TwoPhase(relu, torch.optim.SGD(relu.parameters(), lr=0.1), tau=2, delta0=1e-3)
    wrapper = TwoPhase(relu, torch.optim.SGD(relu.parameters(), lr=0.1), tau=2, delta0=1e-3,
                       allow_non_analytic=True)
    assert wrapper.analytic is False
    with pytest.raises(UserInputError, match="delta0 must be a positive finite number"):
        TwoPhase(relu, torch.optim.SGD(relu.parameters(), lr=0.1), tau=2, delta0=float("nan"),
                 allow_non_analytic=True)


def test_lenet_two_phase_runs_end_to_end():
    torch.manual_seed(0)
    x, y = _data(image=True)
    model = two_phase_model(LeNet(1, 1), n=N)
    wrapper = TwoPhase(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), tau=4, delta0=1e-3)
    losses = _run(wrapper, model, x, y, 10)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert wrapper.phase == 2
