"""Verifiers of the conditions the guarantees rest on ([KS21] §3, [K22] §3; docs/verifiers.md), as verdict objects.

* :func:`expressivity` — [KS21] Assumption 1, ``rank([h_X, 1_n]) = n``.
* :func:`safe_exploration` — [K22] Assumption 10, ``rank ϕ(q, θ(1:H−2)) = n`` per output.
* :func:`alignment` — [K22] Definition 2, ``vec(Y') ∈ Col(J)`` (the paper's float32 rank test).
* :func:`input_distinguishability`, :func:`width_condition` — [KS21] Assumption 3, Theorem 2.
* :func:`two_phase_certificate`, :func:`ee_certificate` — the bounds of [KS21] Theorem 1(i) and
  [K22] Theorem 5, given only when all their assumptions hold.

Rank verdicts are :class:`Verdict` objects (``.verdict`` is ``"verified"``, ``"not-verified"`` or
``"inconclusive"``; ``.to_dict()`` is the JSON of ``gconv verify --json``); the numerics are in
:mod:`global_convergence.linalg`.
"""
from ..linalg import INCONCLUSIVE, NOT_VERIFIED, VERIFIED, Verdict
from .alignment import (RESIDUAL_THRESHOLD, alignment, alignment_of_gram, alignment_of_jacobian,
                        alignment_targets)
from .certificates import ee_certificate, ee_row_bounds, two_phase_certificate
from .expressivity import expressivity, expressivity_of_features
from .features import FEATURE_CHUNK, trunk_features
from .inputs import ConditionReport, hidden_widths, input_distinguishability, width_condition
from .safe_exploration import (gate_matrices, he_initialise, safe_exploration,
                               safe_exploration_of_inputs)

__all__ = ["FEATURE_CHUNK", "INCONCLUSIVE", "NOT_VERIFIED", "RESIDUAL_THRESHOLD", "VERIFIED",
           "ConditionReport", "Verdict", "alignment", "alignment_of_gram", "alignment_of_jacobian",
           "alignment_targets", "ee_certificate", "ee_row_bounds", "expressivity",
           "expressivity_of_features", "gate_matrices", "he_initialise", "hidden_widths",
           "input_distinguishability", "safe_exploration", "safe_exploration_of_inputs",
           "trunk_features", "two_phase_certificate", "width_condition"]
