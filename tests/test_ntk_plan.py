"""The structured NTK's plan (ntk/plan.py): reused per model, replanned when the structure
changes; exact under in-place operations on planned layers' outputs."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from global_convergence.ntk import empirical_ntk
from global_convergence.ntk import plan as ntk_plan

TOL32 = 1e-5     # float32 results vs the float64 reference, relative Frobenius


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Switchable(nn.Module):
    """A flag that routes the forward pass through a second use of ``a`` (a shared module)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
        self.twice = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.softplus(self.a(x), beta=100)
        if self.twice:
            h = F.softplus(self.a(h), beta=100)
        return self.b(h)


def test_plan_is_reused_and_replanned_when_the_structure_changes():
    torch.manual_seed(0)
    model, x = Switchable(), torch.randn(9, 3)
    empirical_ntk(model, x)
    first = ntk_plan._PLANS[model][1]
    empirical_ntk(model, x)
    assert ntk_plan._PLANS[model][1] is first                     # reused
    for change in ("flag", "frozen", "eval"):
        if change == "flag":
            model.twice = True                                    # a is now used twice
        elif change == "frozen":
            model.b.weight.requires_grad_(False)
        else:
            model.eval()
        ntk = empirical_ntk(model, x)
        assert ntk_plan._PLANS[model][1] is not first
        first = ntk_plan._PLANS[model][1]
        ref = empirical_ntk(model, x, method="jacobian", dtype=torch.float64)
        assert rel(ntk, ref) < TOL32
    assert "a.weight" in first.fallback and "b.weight" not in first.fallback
    ntk_plan.forget_plans()
    assert model not in ntk_plan._PLANS


class InPlaceAfterLayer(nn.Module):
    """An in-place operation on a planned layer's output (its gradient must be the original's)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.mul_(2.0).add_(0.5)
        return self.b(torch.tanh(h))


def test_in_place_operation_on_a_layer_output_is_exact():
    torch.manual_seed(0)
    model, x = InPlaceAfterLayer(), torch.randn(10, 3)
    ref = empirical_ntk(model, x, method="jacobian", dtype=torch.float64)
    assert rel(empirical_ntk(model, x, method="structured"), ref) < TOL32


def test_a_module_swapped_in_place_is_replanned_and_exact():
    torch.manual_seed(0)
    model, x = Switchable(), torch.randn(9, 3)
    empirical_ntk(model, x)
    first = ntk_plan._PLANS[model][1]
    model.b = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))    # another structure
    ntk = empirical_ntk(model, x)
    assert ntk_plan._PLANS[model][1] is not first
    assert {lp.path for lp in ntk_plan._PLANS[model][1].layers} == {"a", "b.0", "b.2"}
    assert rel(ntk, empirical_ntk(model, x, method="jacobian", dtype=torch.float64)) < TOL32


def _hooked_mlp(case: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    if case == "forward hook":            # changes the layer's output after it ran
        model[0].register_forward_hook(lambda mod, inputs, out: 3.0 * out + 1.0)
    elif case == "instance forward":      # the instance's map is not nn.Linear's
        model[0].forward = types.MethodType(
            lambda self, x: F.linear(x, 2.0 * self.weight, self.bias), model[0])
    return model


@pytest.mark.parametrize("case", ["forward hook", "instance forward", "global forward hook"])
def test_hooks_and_instance_overrides_that_change_a_layer_keep_the_ntk_exact(case):
    torch.manual_seed(0)
    model, x = _hooked_mlp(case), torch.randn(7, 3)
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, inputs, out: 3.0 * out if isinstance(mod, nn.Linear) and mod.in_features == 3
        else None) \
        if case == "global forward hook" else None
    try:
        ref = empirical_ntk(model, x, method="jacobian", dtype=torch.float64)
        assert rel(empirical_ntk(model, x, method="structured"), ref) < TOL32
    finally:
        if handle is not None:
            handle.remove()
    if case == "global forward hook":     # the hook is gone: the plan is structured again
        empirical_ntk(model, x)
        assert ntk_plan._PLANS[model][1].fallback == []
