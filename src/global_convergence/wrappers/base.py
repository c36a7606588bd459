"""What both wrappers share: step counting, the switch at τ, the seeded perturbation, the
batch-norm statistics of the frozen trunk, validation and checkpoint state.

A wrapper is used like an optimizer inside the user's own loop (as ``torch.optim.swa_utils`` is):
``zero_grad()``, ``loss.backward()``, ``step()``. The call of ``step()`` that completes step τ
switches: perturb, recompute batch-norm statistics of the trunk (SPEC §3.3), freeze, and set up
the second-phase optimizer. ``switch_step`` is τ: steps ``0..τ−1`` are phase 1.

Under ``DistributedDataParallel`` pass the DDP module or the plain one; after the switch re-wrap
only the trainable part (``model.head``) in a new DDP instance: the trunk's ``requires_grad`` flips
at the switch, which a live DDP wrapper does not follow (the loop behind ``gconv train`` does this).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn

from ..errors import UserInputError
from ..models import SplitNet, non_analytic_modules


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper."""
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def perturb_parameters(params: Iterable[nn.Parameter], std: float, seed: int) -> None:
    """Add independent ``N(0, std²)`` noise to every parameter, in the given order.

    The noise is drawn on the CPU from a generator seeded with ``seed``, so it is identical on
    every device and every rank of a distributed run.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_(noise.to(device=p.device, dtype=p.dtype), alpha=std)


def refresh_trunk_statistics(model: SplitNet, bn_data: Iterable | None) -> bool:
    """Recompute the trunk's batch-norm running statistics over ``bn_data`` (cumulative average,
    as ``torch.optim.swa_utils.update_bn``). Returns whether statistics were recomputed."""
    if not has_batchnorm(model.trunk):
        return False
    if bn_data is None:
        warnings.warn("the trunk has batch normalisation but no bn_data was given: its current "
                      "running statistics become the fixed ones of the second phase", stacklevel=3)
        return False
    device = next(model.trunk.parameters()).device
    update_bn(bn_data, model.trunk, device=device)
    return True


def check_positive(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or value != value or value == float("inf"):
        raise UserInputError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_tau(tau: int, total_steps: int | None) -> int:
    if not isinstance(tau, int) or isinstance(tau, bool) or tau < 1:
        raise UserInputError(f"tau must be a positive integer number of steps, got {tau!r}")
    if total_steps is not None and tau >= total_steps:
        raise UserInputError(f"tau={tau} is beyond the run: it must satisfy 0 < tau < T={total_steps}")
    return tau


class PhaseWrapper:
    """Base class of :class:`TwoPhase` and :class:`EEWrapper`; see the module docstring."""

    model_type: type[SplitNet] = SplitNet
    model_builder = "a SplitNet"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, tau: int, *, seed: int = 0,
                 bn_data: Iterable | None = None, total_steps: int | None = None,
                 allow_non_analytic: bool = False) -> None:
        self.model = self._check_model(unwrap_model(model), allow_non_analytic)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserInputError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.tau = check_tau(tau, total_steps)
        self.seed = int(seed)
        self.bn_data = bn_data
        self.analytic = not non_analytic_modules(self.model)
        self.step_count = 0
        self.statistics_recomputed = False

    def _check_model(self, model: nn.Module, allow_non_analytic: bool) -> SplitNet:
        if not isinstance(model, self.model_type):
            raise UserInputError(f"{type(self).__name__} needs a model built by {self.model_builder}, "
                                 f"got {type(model).__name__}")
        offending = non_analytic_modules(model)
        if offending and not allow_non_analytic:
            raise UserInputError(f"{type(self).__name__}: the guarantee needs a real-analytic model, "
                                 f"but these modules are not: {', '.join(offending)} (convert with "
                                 "make_analytic, or pass allow_non_analytic=True to run without it)")
        return model

    # -- the optimizer interface -------------------------------------------------------------
    @property
    def phase(self) -> int:
        """1 (exploration / all layers) before τ steps, 2 after."""
        return 1 if self.step_count < self.tau else 2

    @property
    def switch_step(self) -> int:
        return self.tau

    @property
    def active_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that the next ``step()`` uses."""
        return self.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The active optimizer's groups (shared, so LR schedulers act on the real thing)."""
        return self.active_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.active_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One step of the current phase; the step that completes step τ switches phases."""
        loss = self.active_optimizer.step(closure) if self.phase == 1 else self._phase2_step(closure)
        self.step_count += 1
        if self.step_count == self.tau:
            self.switch()
        return loss

    def _phase2_step(self, closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
        return self.active_optimizer.step(closure)

    # -- the switch ---------------------------------------------------------------------------
    def perturbed_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def noise_std(self) -> float:
        raise NotImplementedError

    def switch(self) -> None:
        """Perturb, fix the trunk's batch-norm statistics, freeze, set up phase 2."""
        perturb_parameters(self.perturbed_parameters(), self.noise_std(), self.seed)
        self.statistics_recomputed = refresh_trunk_statistics(self.model, self.bn_data)
        self._enter_phase2()

    def _enter_phase2(self) -> None:
        """Structural part of the switch (no randomness): also replayed by ``load_state_dict``."""
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "tau": self.tau, "seed": self.seed,
                "phase": self.phase, "optimizer": self.optimizer.state_dict(),
                "statistics_recomputed": self.statistics_recomputed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a wrapper saved by :meth:`state_dict` (load the model's state as well)."""
        if state["tau"] != self.tau:
            raise UserInputError(f"checkpoint was taken with tau={state['tau']}, this wrapper has "
                                 f"tau={self.tau}")
        self.seed = state["seed"]
        self.step_count = state["step_count"]
        self.statistics_recomputed = state.get("statistics_recomputed", False)
        if self.phase == 2:
            self._enter_phase2()
        self.optimizer.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tau={self.tau}, step={self.step_count}, phase={self.phase}, "
                f"optimizer={type(self.active_optimizer).__name__})")
