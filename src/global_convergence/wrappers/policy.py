"""The second phase's policy, read from the wrapper's own optimizer: the facts a certificate
states (optimizer, momentum, weight decay, step), the phase-2 learning rate (``exploit_lr``), the
analytic-model check and the loss a certificate is computed for.

The certificates are those of [KS21] Theorem 1(i) and [K22] Theorem 5: both hold for full-batch
gradient descent with a step no larger than ``1/L`` on a real-analytic model (docs/verifiers.md,
"Certificates"); every fact read here is one of their assumptions.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NumericalError, UserInputError
from ..losses import LOSS_NAMES, Loss
from ..models import non_analytic_modules

AUTO = "auto"
"""``exploit_lr="auto"``: the second phase runs at the certificate's step ``1/L``."""
SHOWN_MODULES = 4
"""How many offending modules the analytic check names before "and k more"."""


def check_exploit_lr(value: float | str | None) -> float | str | None:
    """``None`` (keep the scheduled learning rate), a positive finite number, or ``"auto"``."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise UserInputError(f"exploit_lr must be None, a positive finite number or 'auto', "
                             f"got {value!r}")
    return float(value)


def check_analytic(model: nn.Module, owner: str, allow_non_analytic: bool) -> bool:
    """Whether ``model`` is real-analytic ([KS21] §3, [K22] §3: the guarantees need it).

    A non-analytic model is refused with a :class:`UserInputError` naming the offending modules
    (the first four and how many more), unless ``allow_non_analytic``; its certificate then says
    the assumption ``real_analytic`` fails and withholds the bound.
    """
    offending = non_analytic_modules(model)
    if offending and not allow_non_analytic:
        shown = ", ".join(offending[:SHOWN_MODULES])
        more = len(offending) - SHOWN_MODULES
        names = shown + (f" and {more} more" if more > 0 else "")
        raise UserInputError(f"{owner}: the guarantee needs a real-analytic model, but these "
                             f"modules are not: {names} (convert with make_analytic, or pass "
                             "allow_non_analytic=True to run without it)")
    return not offending


def trained_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The groups of ``optimizer`` that hold a parameter the second phase trains."""
    return [g for g in optimizer.param_groups if any(p.requires_grad for p in g["params"])]


def _largest(groups: Iterable[dict[str, Any]], read) -> float:
    values = [float(read(g)) for g in groups]
    return max(values) if values else 0.0


def _momentum(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """Heavy-ball momentum (SGD, RMSprop) or Adam's first-moment coefficient β1, whichever the
    optimizer's own hyper-parameters have (a group may carry other keys, e.g. a scheduler's)."""
    if "momentum" in optimizer.defaults:
        return group["momentum"]
    if "betas" in optimizer.defaults:
        return group["betas"][0]
    return 0.0


def optimizer_facts(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What the certificate's assumptions ask about the second phase's optimizer.

    ``optimizer_name`` is the class name in lower case (``torch.optim.SGD`` → ``"sgd"``, which is
    gradient descent when momentum and weight decay are 0); ``momentum``, ``weight_decay`` and
    ``lr`` are the largest over the groups that hold trained parameters (the theorems need every
    step at most ``1/L``). L-BFGS's ``lr`` is its initial step, which its line search scales.
    """
    groups = trained_groups(optimizer)
    return {"optimizer_name": type(optimizer).__name__.lower(),
            "momentum": _largest(groups, lambda g: _momentum(optimizer, g)),
            "weight_decay": _largest(groups, lambda g: g.get("weight_decay", 0.0)),
            "lr": _largest(groups, lambda g: g["lr"])}


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, what: str) -> None:
    """Set every group's learning rate to ``lr`` (in place, so a scheduler continues from it)."""
    if not math.isfinite(lr) or lr <= 0:
        raise NumericalError(f"{what}: the step {lr} is not a positive finite number (a "
                             "certificate's 1/L is infinite when the output weights are all "
                             "zero); give exploit_lr a number")
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def as_loss(loss: Loss | str, model: nn.Module, x: Tensor) -> Loss:
    """``loss`` as a :class:`~global_convergence.losses.Loss`; a name (``"ce"``, ``"mse"``) takes
    the number of outputs ``m_y`` from the model's output on ``x[:1]``."""
    if isinstance(loss, Loss):
        return loss
    if loss not in LOSS_NAMES:
        raise UserInputError(f"loss must be a global_convergence Loss or one of "
                             f"{', '.join(LOSS_NAMES)}, got {loss!r}")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = model(x[:1]).shape[1]
    model.train(was_training)
    if loss == "mse":
        return Loss("mse", outputs)
    return Loss("ce", outputs, 2 if outputs == 1 else outputs)
