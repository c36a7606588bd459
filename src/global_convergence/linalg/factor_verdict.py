"""The verdict of :func:`.rank.factor_rank_verdict` from what its routes found (docs/verifiers.md).

Each route leaves its figures in ``details``; this module turns them into one :class:`Verdict`
with the margin to the tolerance and the ``spectrum`` a plot draws
(:mod:`global_convergence.conditions.plot`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .dense import cut, decide, spectrum_tail, target_value
from .factors import RowFactor
from .tolerance import precision_name
from .verdict import INCONCLUSIVE, NOT_VERIFIED, VERIFIED, Verdict

PRECONDITIONED_BOUNDS = {
    "preconditioned": "the certified lower bound (σ_n(ϕC) − error)/‖C‖₂ and the estimate "
                      "σ_n(ϕC)/‖C‖₂ by inverse iteration",
    "shift-preconditioned": "the certified lower bound ℓ·σ_n(L̂⁻¹A) − ‖L̂B̂ − A‖₂ and the "
                            "estimate ℓ·σ_n(B̂) by inverse iteration",
}
"""What the two values at n of a preconditioned certificate's spectrum are, by its kind."""


def assemble_factor_verdict(condition: str, target: int, factor: RowFactor, dtype: torch.dtype,
                            tol: float, band: float, methods: dict[str, int],
                            values: tuple[np.ndarray, np.ndarray] | None,
                            cert: dict[str, Any] | None, details: dict[str, Any]) -> Verdict:
    """Combine the methods' results into one verdict: the factor route's singular values where
    it ran (:func:`.dense.decide`: band and agreement), else a certificate's bound (*verified*),
    else the dimension bound or the Cholesky breakdown (*not-verified* / *inconclusive*)."""
    bounds = details.pop("sketch_lower_bounds", None)
    common = dict(condition=condition, n=target, tolerance=tol, precision=precision_name(dtype),
                  shape=factor.shape, details=details)
    if values is not None:
        svd = cut(values[0], tol)
        deciding = target_value(values[0], target)
        details["margin"] = deciding / tol if tol > 0 else None
        details["spectrum"] = spectrum_tail(values[0], "singular values (SVD of the factor)")
        return Verdict(verdict=decide(target, methods, deciding, tol, band), rank=svd.rank,
                       smallest_kept=svd.smallest_kept, largest_dropped=svd.largest_dropped,
                       methods=methods, agree=len(set(methods.values())) == 1, **common)
    if cert is not None and cert.get("sketch") is not None:
        details["margin"] = cert["lower"] / tol if tol > 0 else None
        details["spectrum"] = {**spectrum_tail(bounds, "certified lower bounds σ_i(ϕΩ)/‖Ω‖₂ "
                                                       "(Khatri–Rao sketch)"),
                               "certified": True}
        return Verdict(verdict=VERIFIED, rank=factor.rows, smallest_kept=cert["lower"],
                       largest_dropped=None, methods=methods, agree=True, **common)
    if cert is not None and cert.get("preconditioned"):
        details["margin"] = cert["lower"] / tol if tol > 0 else None
        how = PRECONDITIONED_BOUNDS[cert.get("kind", "preconditioned")]
        details["spectrum"] = {"kind": f"{cert.get('kind', 'preconditioned')} Gram certificate: "
                                       f"σ_max, and at n {how}",
                               "index": [1, target, target],
                               "values": [details["sigma_max"], cert["lower"], cert["estimate"]],
                               "certified_lower_bound": cert["lower"], "certified": True}
        return Verdict(verdict=VERIFIED, rank=factor.rows, smallest_kept=cert["lower"],
                       largest_dropped=None, methods=methods, agree=True, **common)
    if cert is not None and cert["certified"]:
        details["margin"] = cert["lower"] / tol if tol > 0 else None
        details["spectrum"] = {"kind": "Gram certificate: σ_max, and at n the certified lower "
                                       "bound and the inverse-iteration estimate of σ_n",
                               "index": [1, target, target],
                               "values": [details["sigma_max"], cert["lower"], cert["estimate"]],
                               "certified_lower_bound": cert["lower"]}
        return Verdict(verdict=VERIFIED, rank=factor.rows, smallest_kept=cert["estimate"],
                       largest_dropped=None, methods=methods, agree=True, **common)
    if factor.cols < target:
        details["notes"].append(f"{factor.cols} columns < target {target}: the rank cannot "
                                "reach it")
        return Verdict(verdict=NOT_VERIFIED, rank=factor.cols, smallest_kept=None,
                       largest_dropped=None, methods={"dimension_bound": factor.cols}, agree=True,
                       **common)
    lower = (cert or {}).get("failed_at") or 0
    details["rank_is"] = "a certified lower bound (rows before the Cholesky breakdown)"
    return Verdict(verdict=INCONCLUSIVE, rank=lower, smallest_kept=None, largest_dropped=None,
                   methods={"cholesky_lower_bound": lower}, agree=True, **common)
