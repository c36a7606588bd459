"""Convergence certificates for a run, evaluated on the actual state right after the switch
(docs/verifiers.md "Certificates").

A certificate holds the condition checked on that state (expressivity for two-phase, safe
exploration for every output for EE), the computable constants, the step they allow, the step
used, and the assumptions of the theorem, each true or false. The bound is given **only when every
assumption holds**; otherwise ``bound`` is ``None`` and ``bound_withheld_because`` names the
failing assumptions.

* Two-phase, [KS21] Theorem 1(i): full-batch gradient descent on the output layer with step
  ``1/L_H``, ``L_H = (L_ℓ/n) Σ_i ‖[h(x_i), 1]‖²``, gives ``L(w_t) − L* ≤ R² L_H / (2(t − τ))``.
* EE, [K22] Theorem 5 (gradient descent): step ``1/L̂``, ``L̂ = L_ℓ ‖Z‖² / n`` with
  ``Z_i = max_j ‖[diag(W(H)_j) ⊗ I] ϕ(R(j), θ(1:H−2))_i‖``, gives
  ``L(θ_t) ≤ inf_θ max(L(θ), ε̄) + B_ε̄² L̂ / (2(t − τ))``.

``R`` and ``B_ε̄`` are distances to an unknown minimiser, so the bound is reported as its formula
and the computable coefficient ``L/2``. Both theorems are for full-batch gradient descent with a
step no larger than ``1/L``: minibatches, momentum, weight decay (it changes the objective),
L-BFGS or another optimizer void them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..linalg import Verdict
from ..losses import Loss
from ..models import non_analytic_modules
from .certified import AUTO_BUDGET_FLOPS, certified_features, require_mode
from .expressivity import check_flops as expressivity_check_flops
from .expressivity import expressivity_of_features
from .expressivity import float32_screen as expressivity_screen
from .features import FEATURE_CHUNK, require_ee, require_split
from .safe_exploration import check_flops as safe_check_flops
from .safe_exploration import float32_screen as safe_screen
from .safe_exploration import gate_matrices, gate_values, safe_exploration_of_inputs

GRADIENT_DESCENT_NAMES = ("sgd", "gd", "gradient_descent", "gradient-descent")
"""Optimizer names that run plain gradient descent (``torch.optim.SGD`` without momentum or
weight decay, on the full batch, is gradient descent)."""
STEP_SLACK = 1e-9
"""Relative slack when comparing the step used with ``1/L`` (rounding of the printed lr)."""

TWO_PHASE_FORMULA = "L(w_t) - L* <= R^2 * L_H / (2 (t - tau))"
EE_FORMULA = "L(theta_t) <= inf_theta max(L(theta), eps_bar) + B_eps_bar^2 * L_hat / (2 (t - tau))"


def two_phase_certificate(model: nn.Module, x: Tensor, loss: Loss, *, full_batch: bool,
                          momentum: float, weight_decay: float, optimizer_name: str,
                          lr_used: float | None, analytic: bool | None = None,
                          chunk_size: int = FEATURE_CHUNK, features: Tensor | None = None,
                          precision: str = "auto", mode: str = "auto",
                          budget_flops: float = AUTO_BUDGET_FLOPS) -> dict[str, Any]:
    """The certificate of [KS21] Theorem 1(i) for a two-phase model right after the switch.

    ``analytic=None`` checks the model with :func:`~global_convergence.non_analytic_modules`.
    ``lr_used=None`` means the step ``1/L_H`` itself. ``features`` (e.g. the run's float32
    feature cache), ``precision``, ``mode`` (``"auto"``: cheap routes first and the expensive
    fallback within ``budget_flops``, else *inconclusive* naming ``gconv verify --checkpoint``;
    ``"full"``: decide whatever it costs) as in :func:`~.certified.certified_features`.
    Returns ``{"theorem",
    "condition", "constants", "step_max", "step_used", "assumptions", "bound",
    "bound_withheld_because"}``.
    """
    require_mode(mode, precision)
    model = require_split(model, "two_phase_certificate")

    def check(h: Tensor, error: float | None, fallback: float | None) -> Verdict:
        return expressivity_of_features(h, feature_error=error, fallback_flops=fallback)

    h, verdict = certified_features(model, x, check, features, precision, chunk_size, mode=mode,
                                    budget_flops=budget_flops, condition="expressivity",
                                    check_flops=lambda n, m: expressivity_check_flops(n, m + 1),
                                    screen=expressivity_screen)
    l_h = loss.smoothness / h.shape[0] * float((h.pow(2).sum(dim=1) + 1.0).sum())
    constants = {"L_loss": loss.smoothness, "L_H": l_h}
    bound = {"theorem": "[KS21] Theorem 1(i)", "formula": TWO_PHASE_FORMULA,
             "coefficient": l_h / 2.0, "coefficient_multiplies": "R^2 / (t - tau)",
             "R": "distance from the output layer at tau to a minimiser (unknown)"}
    return _certificate("two-phase", "[KS21] Theorem 1(i)", verdict, constants, l_h, bound,
                        model, analytic, full_batch, momentum, weight_decay, optimizer_name,
                        lr_used)


def ee_certificate(model: nn.Module, x: Tensor, loss: Loss, *, full_batch: bool,
                   momentum: float, weight_decay: float, optimizer_name: str,
                   lr_used: float | None, analytic: bool | None = None,
                   chunk_size: int = FEATURE_CHUNK, features: Tensor | None = None,
                   precision: str = "auto", mode: str = "auto",
                   budget_flops: float = AUTO_BUDGET_FLOPS) -> dict[str, Any]:
    """The certificate of [K22] Theorem 5 (gradient descent) for an EE model right after the
    switch: safe exploration with ``q = R(j)`` for every output, ``L̂`` and the step ``1/L̂``
    (``lr_used=None`` means that step). ``features``, ``precision``, ``mode`` and
    ``budget_flops`` as in :func:`two_phase_certificate`."""
    require_mode(mode, precision)
    model = require_ee(model, "ee_certificate")
    head = model.head

    def check(z_bar: Tensor, error: float | None, fallback: float | None) -> Verdict:
        return safe_exploration_of_inputs(head, head.augmented_input(z_bar), feature_error=error,
                                          fallback_flops=fallback,
                                          stop_unless_verified=error is not None)

    z_bar, verdict = certified_features(model, x, check, features, precision, chunk_size,
                                        mode=mode, budget_flops=budget_flops,
                                        condition="safe-exploration",
                                        check_flops=lambda n, m: safe_check_flops(n, head.width,
                                                                                  m + 1),
                                        screen=safe_screen(head, None, 0))
    z = head.augmented_input(z_bar)
    l_hat = loss.smoothness * float(ee_row_bounds(model, z).pow(2).sum()) / z.shape[0]
    constants = {"L_loss": loss.smoothness, "L_hat": l_hat}
    bound = {"theorem": "[K22] Theorem 5 (gradient descent)", "formula": EE_FORMULA,
             "coefficient": l_hat / 2.0, "coefficient_multiplies": "B_eps_bar^2 / (t - tau)",
             "B_eps_bar": "distance from theta(H-1) at tau to the nearest minimiser of "
                          "max(L, eps_bar) (unknown)"}
    return _certificate("ee", "[K22] Theorem 5", verdict, constants, l_hat, bound, model,
                        analytic, full_batch, momentum, weight_decay, optimizer_name, lr_used)


def ee_row_bounds(model: nn.Module, z: Tensor) -> Tensor:
    """``Z_i = max_j ‖[diag(W(H)_j) ⊗ I] ϕ(R(j))_i‖ = max_j ‖z_i‖ · ‖W(H)_j ⊙ σ̃(R(j) z_i)‖``
    ([K22] §3.3.2), with ``R(j)`` the frozen gates (the tied weights before the switch)."""
    head = model.head
    gates, _ = gate_matrices(head, None, 0, z.dtype, z.device)
    out_weight = head.out_weight.detach().to(z.device, z.dtype)
    per_output = [(gate_values(z, qj, head.gate_sharpness) * out_weight[j]).norm(dim=1)
                  for j, qj in gates]
    return torch.stack(per_output, dim=1).amax(dim=1) * z.norm(dim=1)


def _certificate(method: str, theorem: str, verdict: Verdict, constants: dict[str, float],
                 smoothness: float, bound: dict[str, Any], model: nn.Module,
                 analytic: bool | None, full_batch: bool, momentum: float, weight_decay: float,
                 optimizer_name: str, lr_used: float | None) -> dict[str, Any]:
    """Assemble the certificate; the bound only when every assumption holds. ``lr_used=None``:
    the step is ``1/L`` itself."""
    step_max = 1.0 / smoothness if smoothness > 0 else float("inf")
    lr_used = step_max if lr_used is None else lr_used
    if analytic is None:
        analytic = not non_analytic_modules(model)
    assumptions = {
        "real_analytic": bool(analytic),
        "full_batch": bool(full_batch),
        "gradient_descent": optimizer_name.strip().lower() in GRADIENT_DESCENT_NAMES,
        "no_momentum": float(momentum) == 0.0,
        "no_weight_decay": float(weight_decay) == 0.0,
        "step_at_most_1_over_L": 0.0 < float(lr_used) <= step_max * (1.0 + STEP_SLACK),
        "condition_verified": verdict.verified,
    }
    failing = [name for name, ok in assumptions.items() if not ok]
    return {"method": method, "theorem": theorem, "condition": verdict.to_dict(),
            "constants": constants, "step_max": step_max, "step_used": float(lr_used),
            "optimizer": optimizer_name, "assumptions": assumptions,
            "bound": None if failing else bound, "bound_withheld_because": failing}
