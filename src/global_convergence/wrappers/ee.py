"""The exploration-exploitation (EE) wrapper A of [K22] §3.2 (SPEC §3.2).

Exploration (``t < τ``): the training algorithm G trains all layers, with tied gates. At ``τ``:
every parameter below the output layer, θ(1:H−1) — the trunk and the head's ``w_{jk}`` — gets
independent ``N(0, ε²)`` noise (what makes the guarantee hold with probability one), then the
gates are frozen, ``R(j) := W(H−1, j)``. Exploitation (``t ≥ τ``): a fresh G̃ trains only
θ(H−1) = ``head.weight``; trunk and output layer stay fixed. The model is linear in the trained
parameters, so this phase is a convex problem while ``∂f/∂θ`` keeps changing.

G̃ is ``"same"`` (a new instance of the base optimizer's class with its hyper-parameters),
``"lbfgs"`` (``torch.optim.LBFGS``, full batch; ``step`` then needs a closure), or a callable
``params -> Optimizer``.

Example::

    model = ee_model(MLP(1, 1), n=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapper = EEWrapper(model, opt, tau=2000, eps=0.01, exploit_optimizer="lbfgs")
    for step in range(4000):
        def closure():
            wrapper.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        wrapper.step(closure)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError
from ..models import EEModel
from .base import PhaseWrapper, check_positive

ExploitSpec = str | Callable[[list[nn.Parameter]], torch.optim.Optimizer]

EXPLOIT_CHOICES = ("same", "lbfgs")
LBFGS_OPTIONS = {"lr": 1.0, "max_iter": 20, "history_size": 100, "line_search_fn": "strong_wolfe"}
"""L-BFGS for the convex exploitation problem: a strong-Wolfe line search makes lr = 1 safe."""


def build_exploit_optimizer(spec: ExploitSpec, base: torch.optim.Optimizer,
                            params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """G̃ over ``params``: a fresh copy of ``base``'s kind, L-BFGS, or the user's factory."""
    if callable(spec):
        return spec(params)
    if spec == "same":
        return type(base)(params, **_constructor_defaults(base))
    if spec == "lbfgs":
        return torch.optim.LBFGS(params, **LBFGS_OPTIONS)
    raise UserInputError(f"unknown exploit_optimizer '{spec}'; expected one of "
                         f"{', '.join(EXPLOIT_CHOICES)} or a callable params -> Optimizer")


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The hyper-parameters of ``optimizer`` that its constructor accepts (``defaults`` may hold
    internal keys, e.g. AdamW's ``decoupled_weight_decay``)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


class EEWrapper(PhaseWrapper):
    """EE wrapper around any ``torch.optim`` optimizer; see the module docstring."""

    model_type = EEModel
    model_builder = "ee_model(base, n)"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, tau: int, eps: float,
                 exploit_optimizer: ExploitSpec = "same", seed: int = 0,
                 bn_data: Iterable | None = None, *, total_steps: int | None = None,
                 allow_non_analytic: bool = False) -> None:
        super().__init__(model, optimizer, tau, seed=seed, bn_data=bn_data, total_steps=total_steps,
                         allow_non_analytic=allow_non_analytic)
        self.eps = check_positive(eps, "eps")
        if not callable(exploit_optimizer) and exploit_optimizer not in EXPLOIT_CHOICES:
            raise UserInputError(f"unknown exploit_optimizer '{exploit_optimizer}'; expected one of "
                                 f"{', '.join(EXPLOIT_CHOICES)} or a callable params -> Optimizer")
        self.exploit_spec = exploit_optimizer
        self.exploit_optimizer: torch.optim.Optimizer | None = None

    @property
    def active_optimizer(self) -> torch.optim.Optimizer:
        return self.exploit_optimizer if self.exploit_optimizer is not None else self.optimizer

    def noise_std(self) -> float:
        return self.eps

    def perturbed_parameters(self) -> list[nn.Parameter]:
        """θ(1:H−1): the trunk's trainable parameters, then the head's ``w_{jk}``."""
        return [p for p in self.model.trunk.parameters() if p.requires_grad] + [self.model.head.weight]

    def _enter_phase2(self) -> None:
        head = self.model.head
        if head.are_gates_tied:
            head.freeze_gates()
        self.model.freeze_trunk()
        head.out_weight.requires_grad_(False)
        head.out_weight.grad = None
        self.exploit_optimizer = build_exploit_optimizer(self.exploit_spec, self.optimizer, [head.weight])

    def _phase2_step(self, closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
        if closure is None and isinstance(self.exploit_optimizer, torch.optim.LBFGS):
            raise ValueError("L-BFGS exploitation re-evaluates the loss: call step(closure) with a "
                             "closure that zeroes gradients, computes the loss, backpropagates and "
                             "returns it")
        return self.exploit_optimizer.step(closure)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["eps"] = self.eps
        state["gates"] = self.model.head.gates.detach().clone()
        state["gates_tied"] = self.model.head.are_gates_tied
        if self.exploit_optimizer is not None:
            state["exploit_optimizer"] = self.exploit_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        head = self.model.head
        with torch.no_grad():
            head.gates.copy_(state["gates"])
        head.set_tied(state["gates_tied"])
        super().load_state_dict(state)
        if "exploit_optimizer" in state:
            self.exploit_optimizer.load_state_dict(state["exploit_optimizer"])
