"""The two-phase method A of [KS21] (Algorithm 1).

Phase 1 (``t < τ``): the user's optimizer trains all layers. At ``τ``: every trainable hidden
parameter (all but the output layer; batch-norm γ, β included) gets ``δ ~ N(0, δ0² I)``. Phase 2:
the same optimizer (class, hyper-parameters, and its state for the output layer) continues on the
output layer only, i.e. the learning rate is ``η·[0 for hidden, 1 for output]``. The hidden
parameters are removed from the optimizer's groups, so they get no update at all (no weight
decay, no momentum), and no gradient is computed through them (the trunk is frozen). The groups
stay the same objects, so a scheduler built on the wrapper keeps acting on them.

Example (full-batch gradient descent, the certificate of Theorem 1(i) at the switch, and the
phase-2 step ``1/L_H`` it states)::

    model = two_phase_model(MLP(2, 1), n=len(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = TwoPhase(model, opt, tau=600, delta0=1e-3, exploit_lr="auto")
    for step in range(1000):
        wrapper.zero_grad()
        loss_fn(model(x), y).backward()
        wrapper.step()
        if step + 1 == wrapper.switch_step:
            certificate = wrapper.certify(x, "ce", full_batch=True)
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UserInputError
from ..models import TwoPhaseModel
from .base import PhaseWrapper, check_positive


class TwoPhase(PhaseWrapper):
    """Two-phase wrapper around any ``torch.optim`` optimizer; see the module docstring.

    ``exploit_lr``: ``None`` keeps the learning rate the schedule has reached, a number sets the
    output layer's learning rate at the switch, ``"auto"`` sets it to the certificate's ``1/L_H``
    when :meth:`certify` runs and holds it there at every phase-2 step, whatever a scheduler
    writes (the theorem's step is constant; a phase-2 step before :meth:`certify` is refused).
    """

    model_type = TwoPhaseModel
    model_builder = "two_phase_model(base, n)"
    certificate_name = "two_phase_certificate"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, tau: int, delta0: float,
                 seed: int = 0, bn_data: Iterable | None = None, *,
                 exploit_lr: float | str | None = None, total_steps: int | None = None,
                 allow_non_analytic: bool = False) -> None:
        super().__init__(model, optimizer, tau, seed=seed, bn_data=bn_data, total_steps=total_steps,
                         allow_non_analytic=allow_non_analytic, exploit_lr=exploit_lr)
        self.delta0 = check_positive(delta0, "delta0")
        head_ids = {id(p) for p in self.model.head.parameters()}
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not head_ids <= in_optimizer:
            raise UserInputError("TwoPhase: the optimizer does not hold the output layer's parameters "
                                 "(build it from model.parameters())")

    def noise_std(self) -> float:
        return self.delta0

    def perturbed_parameters(self) -> list[nn.Parameter]:
        """All trainable hidden parameters (the trunk), in registration order."""
        return [p for p in self.model.trunk.parameters() if p.requires_grad]

    def _enter_phase2(self) -> None:
        self.model.freeze_trunk()
        head_ids = {id(p) for p in self.model.head.parameters()}
        for group in self._base.param_groups:
            for p in group["params"]:
                if id(p) not in head_ids:
                    self._base.state.pop(p, None)
            group["params"] = [p for p in group["params"] if id(p) in head_ids]
