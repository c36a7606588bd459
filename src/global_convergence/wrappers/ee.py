"""The exploration-exploitation (EE) wrapper A of [K22] §3.2.

Exploration (``t < τ``): the training algorithm G trains all layers, with tied gates. At ``τ``:
every parameter below the output layer, θ(1:H−1) — the trunk and the head's ``w_{jk}`` — gets
independent ``N(0, ε²)`` noise (what makes the guarantee hold with probability one), then the
gates are frozen, ``R(j) := W(H−1, j)``. Exploitation (``t ≥ τ``): a fresh G̃ trains only
θ(H−1) = ``head.weight``; trunk and output layer stay fixed. The model is linear in the trained
parameters, so this phase is a convex problem while ``∂f/∂θ`` keeps changing.

G̃ is one of

* ``"same"``: a new instance of the base optimizer's class, with the base's groups as they stand at
  the switch (their hyper-parameters and the learning rate the schedule has reached, no state),
  holding only ``head.weight``; a scheduler built on the wrapper keeps acting on it;
* ``"lbfgs"``: ``torch.optim.LBFGS`` with :data:`LBFGS_OPTIONS` (full batch; ``step`` then needs a
  closure); its line search sets the step, so a scheduler keeps counting on the base's groups
  without reaching it;
* a callable ``params -> Optimizer``; it shares the wrapper's groups when it has as many as the
  base (and is not L-BFGS).

Example (a cosine schedule in exploration, the certificate, then the constant step ``1/L̂`` its
bound is for: a schedule built on the wrapper would keep acting on the exploitation's lr)::

    model = ee_model(MLP(1, 1), n=len(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapper = EEWrapper(model, opt, tau=2000, eps=0.01, exploit_lr="auto")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(wrapper, T_max=4000)
    for step in range(4000):
        wrapper.zero_grad()
        loss_fn(model(x), y).backward()
        wrapper.step()
        if wrapper.phase == 1:
            schedule.step()
        if step + 1 == wrapper.switch_step:
            print(wrapper.certify(x, "mse", full_batch=True)["bound"])
"""
from __future__ import annotations

import copy
import inspect
import warnings
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
    """G̃ over ``params``: a fresh copy of ``base`` (its groups as they stand, restricted to
    ``params``), L-BFGS, or the user's factory (given the scheduler's keys of ``base``'s groups
    when it shares the wrapper's groups; its own learning rate is kept)."""
    if callable(spec):
        exploit = spec(params)
        if shares_groups(exploit, base):
            _copy_missing_keys(base, exploit)
        elif not isinstance(exploit, torch.optim.LBFGS) and \
                any("initial_lr" in g for g in base.param_groups):
            warnings.warn(f"the exploitation optimizer has {len(exploit.param_groups)} parameter "
                          f"groups and the base optimizer {len(base.param_groups)}: a learning-rate "
                          "scheduler built on the wrapper does not reach it", stacklevel=3)
        return exploit
    if spec == "same":
        return type(base)(mirrored_groups(base, params), **_constructor_defaults(base))
    if spec == "lbfgs":
        return torch.optim.LBFGS(params, **LBFGS_OPTIONS)
    raise UserInputError(f"unknown exploit_optimizer '{spec}'; expected one of "
                         f"{', '.join(EXPLOIT_CHOICES)} or a callable params -> Optimizer")


def shares_groups(exploit: torch.optim.Optimizer, base: torch.optim.Optimizer) -> bool:
    """Whether G̃ takes over the wrapper's ``param_groups`` (schedulers then act on it)."""
    return not isinstance(exploit, torch.optim.LBFGS) and \
        len(exploit.param_groups) == len(base.param_groups)


def mirrored_groups(base: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """``base``'s groups (every hyper-parameter and scheduler key, copied) holding only those of
    ``params`` they held; groups left empty stay, so a scheduler's per-group lists still match."""
    kept = {id(p) for p in params}
    return [{**copy.deepcopy({k: v for k, v in g.items() if k != "params"}),
             "params": [p for p in g["params"] if id(p) in kept]} for g in base.param_groups]


def _copy_missing_keys(base: torch.optim.Optimizer, exploit: torch.optim.Optimizer) -> None:
    """Give G̃'s groups the keys a scheduler keeps in ``base``'s (``initial_lr``, ``max_lr``, ...):
    those that are not hyper-parameters of ``base``."""
    for source, group in zip(base.param_groups, exploit.param_groups):
        for key, value in source.items():
            if key not in group and key not in base.defaults and key != "params":
                group[key] = copy.deepcopy(value)


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The hyper-parameters of ``optimizer`` that its constructor accepts (``defaults`` may hold
    internal keys, e.g. AdamW's ``decoupled_weight_decay``)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


class EEWrapper(PhaseWrapper):
    """EE wrapper around any ``torch.optim`` optimizer; see the module docstring.

    ``exploit_lr``: ``None`` keeps the learning rate the schedule has reached, a number sets the
    exploitation's learning rate at the switch, ``"auto"`` sets it to the certificate's ``1/L̂``
    when :meth:`certify` runs and holds it there at every phase-2 step, whatever a scheduler
    writes (the theorem's step is constant; a phase-2 step before :meth:`certify` is refused). With
    ``exploit_optimizer="lbfgs"`` the line search sets the step and ``exploit_lr`` must be None.
    """

    model_type = EEModel
    model_builder = "ee_model(base, n)"
    certificate_name = "ee_certificate"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, tau: int, eps: float,
                 exploit_optimizer: ExploitSpec = "same", seed: int = 0,
                 bn_data: Iterable | None = None, *, exploit_lr: float | str | None = None,
                 total_steps: int | None = None, allow_non_analytic: bool = False) -> None:
        super().__init__(model, optimizer, tau, seed=seed, bn_data=bn_data, total_steps=total_steps,
                         allow_non_analytic=allow_non_analytic, exploit_lr=exploit_lr)
        self.eps = check_positive(eps, "eps")
        if not callable(exploit_optimizer) and exploit_optimizer not in EXPLOIT_CHOICES:
            raise UserInputError(f"unknown exploit_optimizer '{exploit_optimizer}'; expected one of "
                                 f"{', '.join(EXPLOIT_CHOICES)} or a callable params -> Optimizer")
        if exploit_optimizer == "lbfgs" and self.exploit_lr is not None:
            raise UserInputError(f"exploit_lr={exploit_lr!r} with exploit_optimizer='lbfgs': the "
                                 "line search sets the step of L-BFGS; leave exploit_lr None")
        weight = self.model.head.weight
        if not any(p is weight for g in optimizer.param_groups for p in g["params"]):
            raise UserInputError("EEWrapper: the optimizer does not hold the head's weight "
                                 "θ(H−1) (build it from model.parameters())")
        self.exploit_spec = exploit_optimizer
        self.exploit_optimizer: torch.optim.Optimizer | None = None

    @property
    def active_optimizer(self) -> torch.optim.Optimizer:
        return self.exploit_optimizer if self.exploit_optimizer is not None else self._base

    @property
    def _group_owner(self) -> torch.optim.Optimizer:
        exploit = self.exploit_optimizer
        return exploit if exploit is not None and shares_groups(exploit, self._base) else self._base

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
        self.exploit_optimizer = build_exploit_optimizer(self.exploit_spec, self._base, [head.weight])

    def _wrapper_state(self) -> dict[str, Any]:
        state = super()._wrapper_state()
        state["eps"] = self.eps
        state["gates"] = self.model.head.gates.detach().clone()
        state["gates_tied"] = self.model.head.are_gates_tied
        if self.exploit_optimizer is not None:
            state["exploit_optimizer"] = self.exploit_optimizer.state_dict()
        return state

    def _load_wrapper_state(self, state: dict[str, Any]) -> None:
        head = self.model.head
        with torch.no_grad():
            head.gates.copy_(state["gates"])
        head.set_tied(state["gates_tied"])
        super()._load_wrapper_state(state)
        if "exploit_optimizer" in state:
            self.exploit_optimizer.load_state_dict(state["exploit_optimizer"])
