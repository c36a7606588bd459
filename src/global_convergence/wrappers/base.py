"""What both wrappers share: a ``torch.optim.Optimizer`` that counts steps, switches at τ
(seeded perturbation, batch-norm statistics of the frozen trunk, freezing, the second phase's
optimizer), owns the second phase's policy (``exploit_lr``, :meth:`~PhaseWrapper.certify`) and
checkpoints all of it.

A wrapper is used like any optimizer in the user's own loop: ``zero_grad()``, ``backward()``,
``step()``. ``switch_step`` is τ: steps ``0..τ−1`` are phase 1, and the call of ``step()`` that
completes step τ switches. The wrapper shares ``param_groups`` with the optimizer that is active
(the user's before the switch), so a learning-rate scheduler built on the wrapper keeps acting
across the switch, and the second phase starts at the learning rate the schedule has reached.
``GradScaler.step(wrapper)``, step hooks and ``state_dict()`` behave as for any optimizer.

Batch norm: at the switch, after the perturbation, the trunk's running statistics are recomputed
over ``bn_data`` (as ``torch.optim.swa_utils.update_bn``) and stay fixed in the second phase, whose
guarantee treats the trunk as a fixed function of each input (docs/design.md).

Under ``DistributedDataParallel`` pass the DDP module or the plain one; after the switch re-wrap
only the trainable part (``model.head``) in a new DDP instance: the trunk's ``requires_grad`` flips
at the switch, which a live DDP wrapper does not follow (the loop behind ``gconv train`` does this).
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn

from ..errors import UserInputError
from ..losses import Loss
from ..models import SplitNet
from .policy import AUTO, as_loss, check_analytic, check_exploit_lr, optimizer_facts, set_learning_rate

HOOK_TABLES = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
"""The hook registries ``torch.optim.Optimizer.__init__`` creates (the wrapper holds no
parameters of its own, so it does not call that constructor)."""


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
    as ``torch.optim.swa_utils.update_bn``; batches may be tensors or ``(x, y, ...)`` tuples).
    Returns whether statistics were recomputed."""
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


class PhaseWrapper(torch.optim.Optimizer):
    """Base class of :class:`TwoPhase` and :class:`EEWrapper`; see the module docstring.

    Internally the user's optimizer is ``_base`` (public as ``optimizer``): Lightning's
    ``LightningOptimizer`` subclasses the wrapper's class and forwards unknown attributes to it,
    but defines ``optimizer`` itself.
    """

    model_type: type[SplitNet] = SplitNet
    model_builder = "a SplitNet"
    certificate_name = ""
    """The function of ``global_convergence.conditions`` that :meth:`certify` calls."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, tau: int, *, seed: int = 0,
                 bn_data: Iterable | None = None, total_steps: int | None = None,
                 allow_non_analytic: bool = False, exploit_lr: float | str | None = None) -> None:
        self.model = self._check_model(unwrap_model(model))
        self.analytic = check_analytic(self.model, type(self).__name__, allow_non_analytic)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserInputError(f"optimizer must be a torch.optim.Optimizer, got "
                                 f"{type(optimizer).__name__}")
        if isinstance(optimizer, PhaseWrapper):
            raise UserInputError(f"optimizer is already a {type(optimizer).__name__}: wrap the "
                                 "user's torch.optim optimizer once")
        self._base = optimizer
        self.tau = check_tau(tau, total_steps)
        self.seed = int(seed)
        self.bn_data = bn_data
        self.exploit_lr = check_exploit_lr(exploit_lr)
        self.step_count = 0
        self.statistics_recomputed = False
        self.certificate: dict[str, Any] | None = None
        for name in HOOK_TABLES:
            setattr(self, name, OrderedDict())
        self._patch_step_function()         # step pre/post hooks, as every torch optimizer

    def _check_model(self, model: nn.Module) -> SplitNet:
        if not isinstance(model, self.model_type):
            raise UserInputError(f"{type(self).__name__} needs a model built by {self.model_builder}, "
                                 f"got {type(model).__name__}")
        return model

    # -- what the optimizer interface sees ------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The user's optimizer G (phase 1; for :class:`TwoPhase` also phase 2)."""
        return self._base

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
        return self._base

    @property
    def _group_owner(self) -> torch.optim.Optimizer:
        """The optimizer whose groups the wrapper shares (schedulers act on them)."""
        return self.active_optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:      # type: ignore[override]
        """The active optimizer's groups, shared: a scheduler's changes reach the real thing."""
        return self._group_owner.param_groups

    @property
    def defaults(self) -> dict[str, Any]:                # type: ignore[override]
        return self._group_owner.defaults

    @property
    def state(self) -> dict[Tensor, Any]:                # type: ignore[override]
        """The active optimizer's per-parameter state (momentum buffers, Adam moments, ...)."""
        return self.active_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.active_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the user's optimizer (phase 1 only: the second phase trains exactly the
        layer its theorem names)."""
        if self.phase == 2:
            raise UserInputError(f"{type(self).__name__}.add_param_group after the switch (step "
                                 f"{self.tau}): the second phase trains only its own layer; add "
                                 "parameter groups before the switch")
        self._base.add_param_group(param_group)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step of the current phase; the step that completes step τ switches phases."""
        active = self.active_optimizer
        if closure is None and isinstance(active, torch.optim.LBFGS):
            raise ValueError(f"L-BFGS {'exploitation ' if self.phase == 2 else ''}re-evaluates the "
                             "loss: call step(closure) with a closure that zeroes gradients, "
                             "computes the loss, backpropagates and returns it")
        if self.phase == 2 and self.exploit_lr == AUTO and self.certificate is None:
            raise UserInputError("exploit_lr='auto' takes the second phase's step 1/L from the "
                                 "certificate: call wrapper.certify(x, loss) after the switch (step "
                                 f"{self.tau}) and before the next step")
        if self.phase == 2 and self.exploit_lr == AUTO:
            # [K22] Theorem 5 / [KS21] Theorem 1(i) are for the constant step 1/L: a scheduler's
            # later writes to the learning rate are overridden
            set_learning_rate(active, float(self.certificate["step_used"]), "exploit_lr='auto'")
        loss = active.step(closure)
        self.step_count += 1
        if self.step_count == self.tau:
            self.switch()
        return loss

    # -- the switch ---------------------------------------------------------------------------
    def perturbed_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def noise_std(self) -> float:
        raise NotImplementedError

    def switch(self) -> None:
        """Perturb, fix the trunk's batch-norm statistics, freeze, set up phase 2 (at the
        learning rate the schedule has reached, or ``exploit_lr`` when it is a number)."""
        perturb_parameters(self.perturbed_parameters(), self.noise_std(), self.seed)
        self.statistics_recomputed = refresh_trunk_statistics(self.model, self.bn_data)
        self._enter_phase2()
        if isinstance(self.exploit_lr, float):
            set_learning_rate(self.active_optimizer, self.exploit_lr, "exploit_lr")

    def _enter_phase2(self) -> None:
        """Structural part of the switch (no randomness): also replayed by ``load_state_dict``."""
        raise NotImplementedError

    # -- the certificate ------------------------------------------------------------------------
    def certify(self, x: Tensor, loss: Loss | str, *, full_batch: bool = False,
                features: Tensor | None = None, **options: Any) -> dict[str, Any]:
        """The convergence certificate of the second phase on the actual state after the switch
        ([KS21] Theorem 1(i) for :class:`TwoPhase`, [K22] Theorem 5 for :class:`EEWrapper`).

        ``x``: all n training inputs; ``loss``: a :class:`~global_convergence.losses.Loss` or its
        name (``"ce"``, ``"mse"``); ``full_batch``: whether each phase-2 step uses all n inputs.
        The optimizer, its momentum, weight decay and step are read from the wrapper's active
        optimizer; ``features`` (the trunk's float32 features of ``x``, e.g. a cache) and every
        other keyword (``precision=``, ``mode=``) go to the certificate function unchanged (see
        docs/verifiers.md, "Certificates"). The result is kept in ``wrapper.certificate`` and in
        ``state_dict()``. With ``exploit_lr="auto"`` the step is the certificate's ``1/L``, and
        the second phase's learning rate is set to it.
        """
        if self.phase == 1:
            raise UserInputError(f"{type(self).__name__}.certify: the certificate is of the state "
                                 f"after the switch, at step {self.tau}; the wrapper is at step "
                                 f"{self.step_count}")
        from .. import conditions

        facts = optimizer_facts(self.active_optimizer)
        lr = facts.pop("lr")
        certificate = getattr(conditions, self.certificate_name)(
            self.model, x, as_loss(loss, self.model, x), full_batch=bool(full_batch),
            lr_used=None if self.exploit_lr == AUTO else lr, analytic=self.analytic,
            features=features, **facts, **options)
        self.set_certificate(certificate)
        return certificate

    def set_certificate(self, certificate: dict[str, Any]) -> None:
        """Keep ``certificate`` (from :meth:`certify`, possibly of another process: under DDP one
        rank certifies and broadcasts it) and, with ``exploit_lr="auto"``, take its step."""
        if self.phase == 1:
            raise UserInputError(f"{type(self).__name__}.set_certificate before the switch "
                                 f"(step {self.step_count} of {self.tau})")
        self.certificate = certificate
        if self.exploit_lr == AUTO:
            set_learning_rate(self.active_optimizer, float(certificate["step_used"]),
                              "exploit_lr='auto'")

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapper's whole state (its optimizers', the step count, the certificate); the
        model's state is the model's. Runs the ``register_state_dict_*_hook`` hooks."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self._wrapper_state()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            state = state if result is None else result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a wrapper saved by :meth:`state_dict` (load the model's state as well; build a
        scheduler on the new wrapper before loading, then load the scheduler's state)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        if self.phase == 2 and state_dict["step_count"] < self.tau:
            raise UserInputError(f"{type(self).__name__}.load_state_dict: the state is of phase 1 "
                                 f"(step {state_dict['step_count']}) and this wrapper has switched "
                                 f"at step {self.tau} (trunk frozen, second-phase optimizer built); "
                                 "load it into a new model and wrapper")
        self._load_wrapper_state(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _wrapper_state(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "tau": self.tau, "seed": self.seed,
                "phase": self.phase, "optimizer": self._base.state_dict(),
                "statistics_recomputed": self.statistics_recomputed,
                "exploit_lr": self.exploit_lr, "certificate": copy.deepcopy(self.certificate)}

    def _load_wrapper_state(self, state: dict[str, Any]) -> None:
        if state["tau"] != self.tau:
            raise UserInputError(f"checkpoint was taken with tau={state['tau']}, this wrapper has "
                                 f"tau={self.tau}")
        self.seed = state["seed"]
        self.step_count = state["step_count"]
        self.statistics_recomputed = state.get("statistics_recomputed", False)
        self.certificate = copy.deepcopy(state.get("certificate"))
        if self.phase == 2:
            self._enter_phase2()
        self._base.load_state_dict(state["optimizer"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("step", None)     # a scheduler's patch of step refers to this instance
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tau={self.tau}, step={self.step_count}, phase={self.phase}, "
                f"optimizer={type(self.active_optimizer).__name__})")
