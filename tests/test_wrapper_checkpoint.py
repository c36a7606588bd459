"""A wrapper and its scheduler saved at step k and restored into fresh objects continue exactly as
the uninterrupted run, before and after the switch."""
import pytest
import torch
from torch import nn

from global_convergence import EEWrapper, TwoPhase, ee_model, two_phase_model
from global_convergence.errors import UserInputError
from global_convergence.models import MLP

N, TAU, T = 24, 5, 11


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    return x, torch.sin(2 * x[:, :1])


SCHEDULES = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T),
    "one-cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=T + 1),
}


def _fresh(method, schedule, exploit_lr, init_seed):
    """Model, wrapper and scheduler as a new process builds them (different initial weights)."""
    torch.manual_seed(init_seed)
    base = MLP(3, 1, hidden=(12, 12))
    model = ee_model(base, n=N) if method == "ee" else two_phase_model(base, n=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    cls, noise = (EEWrapper, dict(eps=1e-2)) if method == "ee" else (TwoPhase, dict(delta0=1e-2))
    wrapper = cls(model, opt, tau=TAU, seed=3, exploit_lr=exploit_lr, **noise)
    return model, wrapper, SCHEDULES[schedule](wrapper)


def _steps(model, wrapper, scheduler, start, stop):
    """Steps ``start..stop-1`` on step-seeded minibatches; losses and the lr of every step."""
    x, y = _data()
    trace = []
    for step in range(start, stop):
        index = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:8]
        wrapper.zero_grad()
        loss = nn.functional.mse_loss(model(x[index]), y[index])
        loss.backward()
        wrapper.step()
        if step + 1 == TAU and wrapper.exploit_lr == "auto":
            wrapper.certify(x, "mse")
        scheduler.step()
        trace.append((loss.item(), [g["lr"] for g in wrapper.active_optimizer.param_groups]))
    return trace


@pytest.mark.parametrize("method", ["ee", "two-phase"])
@pytest.mark.parametrize("schedule, exploit_lr", [("cosine", None), ("one-cycle", None),
                                                  ("cosine", "auto")])
@pytest.mark.parametrize("k", [3, TAU + 2])
def test_a_run_restored_at_step_k_continues_with_the_same_losses_and_learning_rates(
        tmp_path, method, schedule, exploit_lr, k):
    model, wrapper, scheduler = _fresh(method, schedule, exploit_lr, init_seed=0)
    head = _steps(model, wrapper, scheduler, 0, k)
    torch.save({"model": model.state_dict(), "wrapper": wrapper.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp_path / "checkpoint.pt")
    uninterrupted = _steps(model, wrapper, scheduler, k, T)
    assert wrapper.phase == 2 and len(head) == k

    saved = torch.load(tmp_path / "checkpoint.pt")
    model2, wrapper2, scheduler2 = _fresh(method, schedule, exploit_lr, init_seed=1)
    model2.load_state_dict(saved["model"])
    wrapper2.load_state_dict(saved["wrapper"])
    scheduler2.load_state_dict(saved["scheduler"])
    assert wrapper2.phase == (1 if k < TAU else 2)
    assert (wrapper2.certificate is not None) == (exploit_lr == "auto" and k > TAU)
    resumed = _steps(model2, wrapper2, scheduler2, k, T)
    assert resumed == uninterrupted
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    if method == "ee":
        assert torch.equal(model2.head.gates, model.head.gates) and not model2.head.are_gates_tied


@pytest.mark.parametrize("method", ["ee", "two-phase"])
def test_a_phase_1_state_is_refused_by_a_wrapper_that_has_switched(method):
    """Going back would leave the trunk frozen and (EE) the exploitation optimizer active."""
    model, wrapper, scheduler = _fresh(method, "cosine", None, init_seed=0)
    _steps(model, wrapper, scheduler, 0, 2)
    early = wrapper.state_dict()
    _steps(model, wrapper, scheduler, 2, TAU + 1)
    active = wrapper.active_optimizer
    with pytest.raises(UserInputError, match="phase 1"):
        wrapper.load_state_dict(early)
    assert wrapper.phase == 2 and wrapper.active_optimizer is active
    if method == "ee":
        assert not model.head.are_gates_tied
