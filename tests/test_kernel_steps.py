"""The coefficient-space SGD of the second phase against the plain autograd step of torch.optim.SGD.

Heads are small (n = 40 inputs, m_H = 12, m_{H−1} = 9) so that 1000 autograd steps take a fraction
of a second; every comparison runs the real optimizer on the real head module.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from global_convergence.losses import make_loss
from global_convergence.models import GatedHead
from global_convergence.training import TrainConfig, load_checkpoint, train
from global_convergence.training.kernel_steps import (STATE_KEY, KernelSteps, build_kernel_steps,
                                                      kernel_steps_reason, loss_and_gradient)

N, IN, WIDTH = 40, 8, 12
STEPS = 1000


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def ee_head(outputs: int = 1, seed: int = 0) -> tuple[GatedHead, torch.Tensor]:
    """A GatedHead after the switch (gates frozen at a perturbed copy) and trunk features."""
    torch.manual_seed(seed)
    head = GatedHead(IN, WIDTH, outputs)
    with torch.no_grad():
        head.weight.mul_(3.0)
    head.freeze_gates()
    with torch.no_grad():
        head.weight.add_(0.1 * torch.randn_like(head.weight))
    head.out_weight.requires_grad_(False)
    return head, torch.randn(N, IN)


def linear_head(outputs: int = 1, bias: bool = True, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(WIDTH, outputs, bias=bias), torch.nn.functional.softplus(torch.randn(N, WIDTH))


def targets(kind: str, outputs: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "mse":
        return torch.randn(N, outputs, generator=g)
    return torch.randint(0, max(2, outputs), (N,), generator=g)


def batches(batch: int, steps: int, seed: int = 2) -> list[torch.Tensor]:
    if batch >= N:
        return [torch.arange(N)] * steps
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(N, generator=g) for _ in range(steps * batch // N + 1)])
    return [order[k * batch:(k + 1) * batch] for k in range(steps)]


def autograd_losses(head: nn.Module, features, y, loss, optimizer, index_list) -> list[float]:
    out = []
    for index in index_list:
        optimizer.zero_grad(set_to_none=True)
        value = loss.per_sample(head(features[index]), y[index]).sum() / len(index)
        value.backward()
        optimizer.step()
        out.append(float(value))
    return out


def trained(head: nn.Module) -> list[nn.Parameter]:
    return [p for p in head.parameters() if p.requires_grad]


SGD_SETTINGS = {
    "plain": dict(lr=0.2),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov-dampening": dict(lr=0.05, momentum=0.8, nesterov=True),
    "weight-decay": dict(lr=0.1, weight_decay=0.05),
    "all": dict(lr=0.03, momentum=0.9, weight_decay=0.01, dampening=0.1),
}


def compare(make_head, settings, batch, kind="ce", outputs=1, warm_steps=0):
    """Autograd SGD vs the engine from the same start: losses and final weights."""
    head, features = make_head(outputs)
    y = targets(kind, outputs)
    loss = make_loss(kind, max(2, outputs) if kind == "ce" else None, outputs if kind == "mse" else None)
    index_list = batches(batch, STEPS + warm_steps)
    twin = copy.deepcopy(head)
    opt_a = torch.optim.SGD(trained(head), **settings)
    opt_b = torch.optim.SGD(trained(twin), **settings)
    # steps before the engine starts leave a momentum buffer it must carry (two-phase's phase 1)
    autograd_losses(head, features, y, loss, opt_a, index_list[:warm_steps])
    autograd_losses(twin, features, y, loss, opt_b, index_list[:warm_steps])
    reference = autograd_losses(head, features, y, loss, opt_a, index_list[warm_steps:])
    engine = build_kernel_steps(opt_b, twin, features, y, loss)
    assert isinstance(engine, KernelSteps)
    fast = [engine.step(index) for index in index_list[warm_steps:]]
    engine.write_back()
    return reference, fast, head, twin, opt_a, opt_b


@pytest.mark.parametrize("name", list(SGD_SETTINGS))
@pytest.mark.parametrize("batch", [N, 16])
def test_ee_engine_follows_autograd_sgd_for_1000_steps(name, batch):
    reference, fast, head, twin, *_ = compare(ee_head, SGD_SETTINGS[name], batch)
    assert max(abs(a - b) for a, b in zip(reference, fast)) < 1e-6
    assert reference[-1] < reference[0]          # the run moved: the comparison is not vacuous
    torch.testing.assert_close(twin.weight, head.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(SGD_SETTINGS))
@pytest.mark.parametrize("batch", [N, 16])
def test_two_phase_engine_follows_autograd_sgd_with_a_phase1_momentum_buffer(name, batch):
    reference, fast, head, twin, opt_a, opt_b = compare(linear_head, SGD_SETTINGS[name], batch,
                                                        warm_steps=5)
    assert max(abs(a - b) for a, b in zip(reference, fast)) < 1e-6
    for p, q in zip(trained(head), trained(twin)):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
        if "momentum" in SGD_SETTINGS[name]:
            torch.testing.assert_close(opt_b.state[q]["momentum_buffer"],
                                       opt_a.state[p]["momentum_buffer"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind, outputs", [("ce", 3), ("mse", 2)])
def test_engine_with_several_outputs_and_other_losses(kind, outputs):
    for make in (ee_head, lambda o: linear_head(o, bias=False)):
        reference, fast, *_ = compare(make, SGD_SETTINGS["all"], 16, kind=kind, outputs=outputs)
        assert max(abs(a - b) for a, b in zip(reference, fast)) < 1e-6


@pytest.mark.parametrize("kind, outputs", [("ce", 1), ("ce", 4), ("mse", 3)])
def test_closed_form_loss_gradient_is_autograds(kind, outputs):
    out = torch.randn(10, outputs, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, outputs) if kind == "mse" else torch.randint(0, max(2, outputs), (10,))
    loss = make_loss(kind, max(2, outputs) if kind == "ce" else None, outputs if kind == "mse" else None)
    value, grad = loss_and_gradient(loss, out.detach(), y)
    reference = loss.per_sample(out, y).mean()
    reference.backward()
    torch.testing.assert_close(value, reference.detach())
    torch.testing.assert_close(grad, out.grad)


def test_written_back_state_lets_autograd_sgd_continue_the_same_trajectory():
    """After write_back, the parameters and momentum buffers are the optimizer's own."""
    settings = SGD_SETTINGS["all"]
    head, features = ee_head()
    y, loss = targets("ce", 1), make_loss("ce", 2)
    index_list = batches(16, 400)
    twin = copy.deepcopy(head)
    opt_a = torch.optim.SGD(trained(head), **settings)
    reference = autograd_losses(head, features, y, loss, opt_a, index_list)
    opt_b = torch.optim.SGD(trained(twin), **settings)
    engine = build_kernel_steps(opt_b, twin, features, y, loss)
    first = [engine.step(index) for index in index_list[:200]]
    engine.write_back()
    rest = autograd_losses(twin, features, y, loss, opt_b, index_list[200:])
    assert max(abs(a - b) for a, b in zip(reference, first + rest)) < 1e-6


def test_engine_refuses_where_the_identity_does_not_hold():
    head, features = ee_head()
    params = trained(head)
    assert "Adam" in kernel_steps_reason(torch.optim.Adam(params), head, N)
    assert "LBFGS" in kernel_steps_reason(torch.optim.LBFGS(params), head, N)
    assert kernel_steps_reason(torch.optim.SGD(params, lr=0.1, maximize=True), head, N) == "maximize=True"
    assert "budget" in kernel_steps_reason(torch.optim.SGD(params, lr=0.1), head, N, max_kernel_bytes=1000)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    assert "exactly" in kernel_steps_reason(other, head, N)
    assert kernel_steps_reason(torch.optim.SGD(params, lr=0.1), head, N) is None
    assert build_kernel_steps(torch.optim.Adam(params), head, features, targets("ce", 1),
                              make_loss("ce", 2)) is None


# -- through the training loop ---------------------------------------------------------------------
def run_config(**overrides) -> TrainConfig:
    options = dict(data="sine", model="mlp", method="ee", n=30, steps=160, tau=20, batch_size=10,
                   eps=0.01, lr=0.1, momentum=0.9, weight_decay=1e-4, log_every=7)
    options.update(overrides)
    return TrainConfig(**options)


def losses(out) -> list[float]:
    import csv
    with open(out / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("overrides", [{}, dict(batch_size=0, momentum=0.0, weight_decay=0.0, lr=0.5),
                                       dict(method="two-phase", tau=None, tau0=0.25, data="two-moons")])
def test_a_run_with_the_engine_logs_the_losses_of_the_autograd_run(tmp_path, overrides):
    """``feature_cache="off"`` keeps the autograd step on the frozen trunk: the reference."""
    fast = train(run_config(**overrides), tmp_path / "fast", progress=False)
    slow = train(run_config(feature_cache="off", **overrides), tmp_path / "slow", progress=False)
    state = load_checkpoint(tmp_path / "fast" / "checkpoint.pt")["wrapper"]
    optimizer_state = state.get("exploit_optimizer", state["optimizer"])["state"]
    assert STATE_KEY in optimizer_state                                # the engine did run
    assert fast["steps"] == slow["steps"] and fast["train_error"] == slow["train_error"]
    a, b = losses(tmp_path / "fast"), losses(tmp_path / "slow")
    assert len(a) == len(b) > 20
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_a_run_resumed_in_phase_2_matches_the_uninterrupted_one_bit_for_bit(tmp_path):
    config = run_config()
    train(config, tmp_path / "whole", progress=False)
    train(config, tmp_path / "parts", progress=False, stop_after=53)     # not a log step
    train(config, tmp_path / "parts", progress=False, resume=True)
    assert (tmp_path / "whole" / "metrics.csv").read_text() == \
        (tmp_path / "parts" / "metrics.csv").read_text()
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_engine_adopts_a_loaded_state_as_its_own_copy():
    """``Optimizer.load_state_dict`` keeps the engine's entry as given; the engine copies it, so
    the state dict it came from is not changed by later steps, and both continue alike."""
    head, features = ee_head()
    twin = copy.deepcopy(head)
    y, loss = targets("ce", 1), make_loss("ce", 2)
    index_list = batches(16, 60)
    opt = torch.optim.SGD(trained(head), **SGD_SETTINGS["all"])
    engine = build_kernel_steps(opt, head, features, y, loss)
    for index in index_list[:20]:
        engine.step(index)
    saved = copy.deepcopy(opt.state_dict())
    kept = copy.deepcopy(saved)
    opt_twin = torch.optim.SGD(trained(twin), **SGD_SETTINGS["all"])
    opt_twin.load_state_dict(saved)
    resumed = build_kernel_steps(opt_twin, twin, features, y, loss)
    first = [engine.step(index) for index in index_list[20:]]
    second = [resumed.step(index) for index in index_list[20:]]
    assert first == second
    assert not torch.equal(resumed.state["coef"], kept["state"][STATE_KEY]["coef"])   # it moved
    torch.testing.assert_close(saved["state"][STATE_KEY]["coef"], kept["state"][STATE_KEY]["coef"],
                               rtol=0, atol=0)
    assert saved["state"][STATE_KEY]["scale"] == kept["state"][STATE_KEY]["scale"]


def test_a_phase_2_without_the_engine_drops_the_coefficients_a_checkpoint_held():
    """Where the autograd step runs (here: no feature cache), saved coefficients would be stale
    for a later resume that uses the engine again: they are dropped."""
    from global_convergence.training.build import build_run
    from global_convergence.training.kernel_steps import kernel_steps_for

    run = build_run(run_config(feature_cache="off"))
    run.wrapper.step_count = run.wrapper.tau - 1
    run.wrapper.step()                               # the switching step, on zero gradients
    optimizer = run.wrapper.active_optimizer
    optimizer.state[STATE_KEY] = {"coef": torch.zeros(3)}
    assert run.phase == 2 and kernel_steps_for(run) is None
    assert STATE_KEY not in optimizer.state


def test_manual_phase_2_steps_reach_the_model_at_sync_model():
    """``loop.train_step`` with the engine leaves the parameters as they were until
    ``sync_model``; then they are the autograd run's (feature cache off)."""
    from global_convergence.training import loop
    from global_convergence.training.switch import on_switch

    runs = []
    for cache in ("memory", "off"):
        run = loop.build_run(run_config(feature_cache=cache, steps=60))
        loop.attach_train_module(run)
        for _ in range(run.wrapper.tau):
            loop.train_step(run)
            run.step += 1
        on_switch(run, None)
        weight = run.model.head.weight.detach().clone()
        for _ in range(15):
            loop.train_step(run)
            run.step += 1
        runs.append((run, torch.equal(run.model.head.weight, weight)))
    (fast, unchanged), (slow, moved_equal) = runs
    assert fast.kernel is not None and slow.kernel is None
    assert unchanged and not moved_equal
    loop.sync_model(fast)
    torch.testing.assert_close(fast.model.head.weight, slow.model.head.weight, rtol=1e-4, atol=1e-6)


# -- blocks of steps ---------------------------------------------------------------------------------
BLOCKS = [1, 7, 64, 300, 128, 500]           # irregular lengths adding up to STEPS


def block_split(index_list: list[torch.Tensor], full: bool) -> list[tuple[int, list | None]]:
    out, done = [], 0
    for length in BLOCKS:
        out.append((length, None if full else index_list[done:done + length]))
        done += length
    assert done == STEPS
    return out


@pytest.mark.parametrize("settings", [SGD_SETTINGS["plain"], SGD_SETTINGS["nesterov-dampening"],
                                      SGD_SETTINGS["all"]], ids=["plain", "nesterov", "all"])
@pytest.mark.parametrize("batch", [N, 16])
@pytest.mark.parametrize("make_head", [ee_head, linear_head], ids=["ee", "two-phase"])
def test_blocks_of_steps_follow_autograd_sgd_and_the_single_steps_bit_for_bit(make_head, settings, batch):
    """``steps`` in blocks of irregular lengths: the losses of autograd SGD (to 1e-6 over 1000
    steps) and, bit for bit, the iterates and losses of the same engine stepped one at a time."""
    head, features = make_head()
    y, loss = targets("ce", 1), make_loss("ce", 2)
    index_list = batches(batch, STEPS)
    heads = [head] + [copy.deepcopy(head) for _ in range(2)]
    optimizers = [torch.optim.SGD(trained(h), **settings) for h in heads]
    warm = batches(16, 5, seed=7)                  # a momentum buffer the engine starts from
    for h, opt in zip(heads, optimizers):
        autograd_losses(h, features, y, loss, opt, warm)
    reference = autograd_losses(heads[0], features, y, loss, optimizers[0], index_list)
    single = build_kernel_steps(optimizers[1], heads[1], features, y, loss)
    blocked = build_kernel_steps(optimizers[2], heads[2], features, y, loss)
    one_by_one = [single.step(index) for index in index_list]
    in_blocks = torch.cat([blocked.steps(length, part) for length, part in
                           block_split(index_list, batch >= N)]).tolist()
    assert max(abs(a - b) for a, b in zip(reference, in_blocks)) < 1e-6
    assert reference[-1] < reference[0]
    assert in_blocks == one_by_one
    assert torch.equal(blocked.coef, single.coef)
    assert (blocked.buffer is None) == (single.buffer is None)
    if blocked.buffer is not None:
        assert torch.equal(blocked.buffer, single.buffer)
    blocked.write_back()
    for p, q in zip(trained(heads[0]), trained(heads[2])):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("settings", [SGD_SETTINGS["plain"], SGD_SETTINGS["all"]], ids=["plain", "all"])
@pytest.mark.parametrize("make_head", [ee_head, linear_head], ids=["ee", "two-phase"])
def test_a_block_interrupted_by_a_checkpoint_continues_bit_for_bit(tmp_path, make_head, settings):
    """300 steps in one block, or 137 then a checkpoint of the optimizer (a file, loaded into a
    fresh optimizer and head) and 163 more: the same losses and weights, bit for bit."""
    head, features = make_head()
    y, loss = targets("ce", 1), make_loss("ce", 2)
    twin = copy.deepcopy(head)
    whole_opt = torch.optim.SGD(trained(head), **settings)
    whole = build_kernel_steps(whole_opt, head, features, y, loss)
    expected = whole.steps(300).tolist()
    part_opt = torch.optim.SGD(trained(twin), **settings)
    first = build_kernel_steps(part_opt, twin, features, y, loss)
    got = first.steps(137).tolist()
    first.write_back()
    torch.save({"head": twin.state_dict(), "optimizer": part_opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed_head = copy.deepcopy(head)
    resumed_head.load_state_dict(saved["head"])
    resumed_opt = torch.optim.SGD(trained(resumed_head), **settings)
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed = build_kernel_steps(resumed_opt, resumed_head, features, y, loss)
    got += resumed.steps(163).tolist()
    assert got == expected
    whole.write_back()
    resumed.write_back()
    assert all(torch.equal(p, q) for p, q in zip(trained(head), trained(resumed_head)))


def test_a_long_block_is_split_within_its_output_budget_with_the_same_result():
    head, features = linear_head(outputs=3)
    y, loss = targets("ce", 3), make_loss("ce", 3)
    engines = []
    for budget in (10 ** 9, 8 * N * 3 * 5):       # everything at once; five steps' outputs
        twin = copy.deepcopy(head)
        engine = build_kernel_steps(torch.optim.SGD(trained(twin), **SGD_SETTINGS["all"]),
                                    twin, features, y, loss)
        engines.append((engine, engine.steps(23, max_output_bytes=budget)))
    (a, la), (b, lb) = engines
    assert torch.equal(la, lb) and torch.equal(a.coef, b.coef) and len(la) == 23


def one_step_blocks(monkeypatch):
    """The loop's blocks cut to single steps: the reference the blocked loop must equal."""
    from global_convergence.training import loop
    monkeypatch.setattr(loop, "_block_end", lambda run, last: run.state.step + 1)


@pytest.mark.parametrize("overrides", [dict(batch_size=0, momentum=0.0, weight_decay=0.0, lr=0.5,
                                            checkpoint_every=25, track_alignment_every=75),
                                       dict(checkpoint_every=25),
                                       dict(method="two-phase", tau=None, tau0=0.25, data="two-moons",
                                            batch_size=0)],
                         ids=["ee-full-batch", "ee-minibatch-momentum", "two-phase"])
def test_the_loop_in_blocks_writes_the_files_of_the_loop_step_by_step(tmp_path, monkeypatch, overrides):
    config = run_config(**overrides)
    blocked = train(config, tmp_path / "blocks", progress=False)
    with monkeypatch.context() as patch:
        one_step_blocks(patch)
        single = train(config, tmp_path / "single", progress=False)
    assert (tmp_path / "blocks" / "metrics.csv").read_text() == \
        (tmp_path / "single" / "metrics.csv").read_text()
    assert blocked["train_error"] == single["train_error"] and blocked["steps"] == single["steps"]
    a = load_checkpoint(tmp_path / "blocks" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    engines = [c["wrapper"].get("exploit_optimizer", c["wrapper"]["optimizer"])["state"][STATE_KEY]
               for c in (a, b)]
    assert torch.equal(engines[0]["coef"], engines[1]["coef"])


def test_a_non_finite_loss_inside_a_block_is_reported_at_its_own_step(monkeypatch):
    from global_convergence.errors import NumericalError

    config = run_config(batch_size=0, momentum=0.0, weight_decay=0.0, exploit_lr=1e308, log_every=50)
    with pytest.raises(NumericalError, match=r"at step (\d+) \(phase 2\)") as blocked:
        train(config, progress=False)
    with monkeypatch.context() as patch:
        one_step_blocks(patch)
        with pytest.raises(NumericalError) as single:
            train(config, progress=False)
    assert str(blocked.value) == str(single.value)
    step = int(str(blocked.value).split("at step ")[1].split(" ")[0])
    assert 20 < step and step % 50 != 0          # inside a block, not at its end
