"""The wrappers as torch optimizers: schedulers across the switch, exploit_lr, GradScaler, hooks,
checkpoints together with a scheduler's ([KS21] Algorithm 1, [K22] §3.2; docs/design.md)."""
import warnings

import pytest
import torch
from torch import nn

from global_convergence import EEWrapper, TwoPhase, ee_model, two_phase_model
from global_convergence.models import MLP

N, TAU, T = 24, 5, 12
sched = torch.optim.lr_scheduler


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, generator=g)
    return x, torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(N, 1, generator=g)


def _build(method="ee", seed=0, optimizer=None, **kwargs):
    torch.manual_seed(seed)
    base = MLP(3, 1, hidden=(12, 12))
    if method == "ee":
        model = ee_model(base, n=N)
    else:
        model = two_phase_model(base, n=N)
    opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)))(model.parameters())
    if method == "ee":
        return model, EEWrapper(model, opt, tau=TAU, eps=1e-2, seed=seed, **kwargs)
    return model, TwoPhase(model, opt, tau=TAU, delta0=1e-2, seed=seed, **kwargs)


def _batch(step):
    """A minibatch that depends on the step alone (a restored run sees the same ones)."""
    x, y = _data()
    index = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:8]
    return x[index], y[index]


def _train_step(model, wrapper, step):
    x, y = _batch(step)
    wrapper.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    wrapper.step()
    return loss.item()


SCHEDULERS = {
    "step": lambda o: sched.StepLR(o, step_size=3, gamma=0.5),
    "cosine": lambda o: sched.CosineAnnealingLR(o, T_max=T),
    "one-cycle": lambda o: sched.OneCycleLR(o, max_lr=0.2, total_steps=T + 1),
    "sequential": lambda o: sched.SequentialLR(o, [sched.LinearLR(o, start_factor=0.5, total_iters=3),
                                                   sched.ExponentialLR(o, gamma=0.8)], milestones=[3]),
    "plateau": lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=1),
}


def _advance(scheduler):
    if isinstance(scheduler, sched.ReduceLROnPlateau):
        scheduler.step(1.0)         # a metric that never improves: the lr halves every 2 steps
    else:
        scheduler.step()


def _reference_lrs(name, groups=1):
    """The learning rates the same scheduler gives a plain SGD with the same groups."""
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.9)
    scheduler = SCHEDULERS[name](opt)
    lrs = []
    for _ in range(T):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        _advance(scheduler)
    return lrs


@pytest.mark.parametrize("method", ["ee", "two-phase"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_scheduler_on_the_wrapper_keeps_acting_across_the_switch(name, method):
    model, wrapper = _build(method, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    scheduler = SCHEDULERS[name](wrapper)
    seen, used = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no "lr_scheduler.step() before optimizer.step()"
        for step in range(T):
            seen.append([g["lr"] for g in wrapper.param_groups])
            used.append([g["lr"] for g in wrapper.active_optimizer.param_groups])
            _train_step(model, wrapper, step)
            _advance(scheduler)
    assert wrapper.phase == 2
    assert seen == used == _reference_lrs(name)
    assert len(set(lr for (lr,) in seen[TAU - 1:TAU + 2])) > 1 or name == "plateau"


def test_the_exploitation_optimizer_starts_at_the_scheduled_lr_not_the_constructors():
    """Measured before: with StepLR the lr was 0.05 before the switch and G̃ restarted at 0.1."""
    model, wrapper = _build("ee")
    scheduler = sched.StepLR(wrapper, step_size=2, gamma=0.5)
    for step in range(TAU):
        _train_step(model, wrapper, step)
        scheduler.step()
    assert wrapper.active_optimizer is not wrapper.optimizer
    assert wrapper.active_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)
    before = model.head.weight.detach().clone()
    x, y = _batch(99)
    wrapper.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    grad = model.head.weight.grad.clone()
    wrapper.step()          # plain SGD: the update is exactly -lr · gradient
    torch.testing.assert_close(before - model.head.weight.detach(), 0.025 * grad)


def test_several_groups_keep_their_own_schedule_and_only_the_trained_group_moves():
    def two_groups(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:-2]}, {"params": params[-2:], "lr": 0.05}], lr=0.1)
    model, wrapper = _build("ee", optimizer=two_groups)
    scheduler = sched.StepLR(wrapper, step_size=2, gamma=0.5)
    for step in range(TAU + 2):
        _train_step(model, wrapper, step)
        scheduler.step()
    groups = wrapper.active_optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [0, 1] and groups[1]["params"][0] is model.head.weight
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * 0.5 ** 3, 0.05 * 0.5 ** 3])


@pytest.mark.parametrize("method", ["ee", "two-phase"])
def test_a_numeric_exploit_lr_is_set_at_the_switch_and_the_schedule_continues_from_it(method):
    model, wrapper = _build(method, exploit_lr=0.3)
    scheduler = sched.StepLR(wrapper, step_size=TAU + 1, gamma=0.5)
    lrs = []
    for step in range(TAU + 3):
        _train_step(model, wrapper, step)
        scheduler.step()
        lrs.append(wrapper.active_optimizer.param_groups[0]["lr"])
    assert lrs[TAU - 2] == pytest.approx(0.1) and lrs[TAU - 1] == pytest.approx(0.3)
    assert lrs[TAU] == pytest.approx(0.15)      # StepLR's boundary at step TAU + 1 halves it


@pytest.mark.parametrize("method", ["ee", "two-phase"])
def test_exploit_lr_auto_takes_the_certificates_step_and_refuses_to_step_before_it(method):
    from global_convergence import UserInputError
    x, _ = _data()
    model, wrapper = _build(method, exploit_lr="auto")
    with pytest.raises(UserInputError, match="after the switch"):
        wrapper.certify(x, "mse")
    for step in range(TAU):
        _train_step(model, wrapper, step)
    with pytest.raises(UserInputError, match=r"exploit_lr='auto'.*call wrapper.certify\(x, loss\)"):
        _train_step(model, wrapper, TAU)
    assert wrapper.step_count == TAU
    certificate = wrapper.certify(x, "mse", full_batch=True)
    assert wrapper.certificate is certificate and wrapper.state_dict()["certificate"] == certificate
    assert certificate["step_used"] == certificate["step_max"] != 0.1
    assert [g["lr"] for g in wrapper.active_optimizer.param_groups] == [certificate["step_max"]]
    assert certificate["bound_withheld_because"] == []       # full-batch GD at 1/L: every assumption
    _train_step(model, wrapper, TAU)
    assert wrapper.step_count == TAU + 1
    other_model, other = _build(method, exploit_lr="auto")     # another rank, the same state
    for step in range(TAU):
        _train_step(other_model, other, step)
    other.set_certificate(certificate)
    assert [g["lr"] for g in other.active_optimizer.param_groups] == [certificate["step_max"]]


@pytest.mark.parametrize("method", ["ee", "two-phase"])
def test_exploit_lr_auto_holds_every_phase2_step_at_1_over_l_whatever_a_scheduler_writes(method):
    x, _ = _data()
    model, wrapper = _build(method, exploit_lr="auto")
    schedule = sched.LambdaLR(wrapper, lambda t: 2.0 ** t)      # would double the lr every step
    for step in range(TAU):
        _train_step(model, wrapper, step)
        schedule.step()
    step_max = wrapper.certify(x, "mse", full_batch=True)["step_max"]
    used = []
    wrapper.active_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    for step in range(TAU, TAU + 4):
        _train_step(model, wrapper, step)
        schedule.step()
        assert wrapper.param_groups[0]["lr"] > step_max          # the scheduler wrote more
    assert used == [step_max] * 4                               # every step took 1/L


@pytest.mark.parametrize("make, name, failing", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True), "sgd",
     {"no_momentum", "no_weight_decay"}),
    (lambda p: torch.optim.Adam(p, lr=0.01), "adam", {"gradient_descent", "no_momentum"}),
    (lambda p: torch.optim.SGD(p, lr=0.1), "sgd", set()),
])
def test_certify_reads_the_facts_from_the_wrappers_own_optimizer(make, name, failing):
    x, _ = _data()
    model, wrapper = _build("two-phase", optimizer=make)
    for step in range(TAU):
        _train_step(model, wrapper, step)
    certificate = wrapper.certify(x, "mse", full_batch=True)
    assert certificate["optimizer"] == name
    step_failing = {"step_at_most_1_over_L"} if certificate["step_used"] > certificate["step_max"] else set()
    assert set(certificate["bound_withheld_because"]) == failing | step_failing
    assert certificate["step_used"] == wrapper.param_groups[0]["lr"]
    assert "full_batch" in wrapper.certify(x, "mse")["bound_withheld_because"]


def test_certify_reads_the_exploitation_optimizer_not_the_base():
    x, _ = _data()
    model, wrapper = _build("ee", optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                            exploit_optimizer=lambda p: torch.optim.SGD(p, lr=0.125))
    for step in range(TAU):
        _train_step(model, wrapper, step)
    certificate = wrapper.certify(x, "mse", full_batch=True)
    assert certificate["assumptions"]["no_momentum"] and certificate["step_used"] == 0.125
    lbfgs_model, lbfgs = _build("ee", exploit_optimizer="lbfgs")
    for step in range(TAU):
        _train_step(lbfgs_model, lbfgs, step)
    certificate = lbfgs.certify(x, "mse", full_batch=True)
    assert certificate["optimizer"] == "lbfgs" and certificate["step_used"] == 1.0
    assert not certificate["assumptions"]["gradient_descent"]


def test_certify_forwards_features_and_options_and_takes_a_loss_object_or_name():
    from global_convergence import make_loss
    x, _ = _data()
    model, wrapper = _build("ee")
    for step in range(TAU):
        _train_step(model, wrapper, step)
    by_name = wrapper.certify(x, "mse", precision="float64")
    by_object = wrapper.certify(x, make_loss("mse", None, 1), precision="float64")
    assert by_name["constants"] == by_object["constants"] and by_name["condition"]["feature_precision"] == "float64"
    broken = torch.full_like(model.features(x), float("nan"))
    attempt = wrapper.certify(x, "mse", features=broken)["condition"]["float32_attempt"]
    # the tiny trunk's float64 pass costs fewer flops than one check: the attempt on the given
    # features is skipped, and says it had them
    assert attempt["verdict"] is None and attempt["skipped"]["features_given"] is True


@pytest.mark.parametrize("method", ["ee", "two-phase"])
def test_grad_scaler_steps_the_wrapper_and_skips_a_step_with_inf_gradients(method):
    model, wrapper = _build(method)
    plain_model, plain = _build(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(TAU + 2):
        x, y = _batch(step)
        wrapper.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(wrapper)
        scaler.update()
        _train_step(plain_model, plain, step)
    assert wrapper.phase == 2 and wrapper.step_count == TAU + 2
    for a, b in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    wrapper.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")
    scaler.step(wrapper)
    scaler.update()
    assert wrapper.step_count == TAU + 2 and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_wrapper_is_an_optimizer_with_hooks_state_zero_grad_and_param_groups():
    model, wrapper = _build("ee", optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert isinstance(wrapper, torch.optim.Optimizer)
    calls = []
    wrapper.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt.step_count)))
    wrapper.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt.step_count)))
    wrapper.register_state_dict_post_hook(lambda opt, state: {**state, "seen": True})
    for step in range(TAU + 1):
        _train_step(model, wrapper, step)
    assert calls[:2] == [("pre", 0), ("post", 1)] and len(calls) == 2 * (TAU + 1)
    assert wrapper.state_dict()["seen"] is True
    assert set(wrapper.state) == {model.head.weight} and "momentum_buffer" in wrapper.state[model.head.weight]
    assert wrapper.defaults["momentum"] == 0.9 and wrapper.param_groups[0]["params"] == [model.head.weight]
    wrapper.zero_grad()
    assert model.head.weight.grad is None


def test_add_param_group_reaches_the_base_before_the_switch_and_is_refused_after():
    from global_convergence import UserInputError
    model, wrapper = _build("two-phase")
    extra = nn.Parameter(torch.zeros(2))
    wrapper.add_param_group({"params": [extra], "lr": 0.5})
    assert wrapper.optimizer.param_groups[-1]["params"] == [extra]
    for step in range(TAU):
        _train_step(model, wrapper, step)
    with pytest.raises(UserInputError, match="add parameter groups before the switch"):
        wrapper.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_lbfgs_keeps_its_line_search_step_while_a_scheduler_counts_on():
    model, wrapper = _build("ee", exploit_optimizer="lbfgs")
    scheduler = sched.StepLR(wrapper, step_size=1, gamma=0.5)
    for step in range(TAU):
        _train_step(model, wrapper, step)
        scheduler.step()
    x, y = _data()

    def closure():
        wrapper.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    for _ in range(3):
        wrapper.step(closure)
        scheduler.step()
    assert wrapper.active_optimizer.param_groups[0]["lr"] == 1.0
    assert wrapper.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (TAU + 3))


def test_the_analytic_check_names_four_modules_and_both_ways_out():
    from global_convergence import UserInputError
    layers = [nn.Linear(3, 8), nn.ReLU()] + [m for _ in range(5) for m in (nn.Linear(8, 8), nn.ReLU())]
    model = two_phase_model(nn.Sequential(*layers, nn.Linear(8, 1)), n=4)
    with pytest.raises(UserInputError) as err:
        TwoPhase(model, torch.optim.SGD(model.parameters(), lr=0.1), tau=2, delta0=1e-3)
    message = str(err.value)
    assert "trunk.1, trunk.3, trunk.5, trunk.7 and 2 more" in message
    assert "make_analytic" in message and "allow_non_analytic=True" in message


def test_a_factory_exploitation_optimizer_gets_the_schedulers_keys_but_keeps_its_own_facts():
    x, _ = _data()
    model, wrapper = _build("ee", optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                            exploit_optimizer=lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.5, 0.9)))
    scheduler = sched.StepLR(wrapper, step_size=100, gamma=0.5)
    for step in range(TAU):
        _train_step(model, wrapper, step)
        scheduler.step()
    group = wrapper.param_groups[0]
    assert isinstance(wrapper.active_optimizer, torch.optim.Adam) and group["initial_lr"] == 0.1
    assert "momentum" not in group and group["lr"] == 0.01
    certificate = wrapper.certify(x, "mse", full_batch=True)
    assert certificate["optimizer"] == "adam" and not certificate["assumptions"]["no_momentum"]
    assert certificate["step_used"] == 0.01
