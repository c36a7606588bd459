"""A row preconditioner for the Gram certificate of a dense factor, from a shifted Cholesky factor.

When ``σ_n(A)² = λ_min(A Aᵀ)`` lies below the Gram certificate's rounding floor (``δ_G + c_chol``,
proportional to ``tr(A Aᵀ)``, :mod:`.tolerance`), the Gram matrix cannot decide, although ``A``
itself has full row rank with a wide margin — the ``[h_X, 1]`` of a trained ``mlp`` has
``σ_n/σ_max ≈ 5e−9``. Shifting the other way works: ``Ĝ + sI`` with ``s`` above that floor always
factorises, ``Ĝ + sI ≈ L̂ L̂ᵀ``, and ``B̂ = L̂⁻¹A`` has singular values ``σ_i/√(σ_i² + s)``: the
directions that hold the trace are squashed to 1, the small ones are lifted by ``1/√s``, and the
Gram certificate of ``B̂`` decides. Then

    σ_n(A) ≥ σ_min(L̂) σ_n(B̂) − ‖L̂ B̂ − A‖₂,

and every term is bounded (Higham, *Accuracy and Stability of Numerical Algorithms*, with
``γ_k = ku/(1 − ku)``):

* **σ_min(L̂).** ``M = fl(Ĝ + sI)`` differs from ``Ĝ + sI`` by ``u(Ĝ_ii + s)`` on the diagonal, and
  ``λ_min(Ĝ) ≥ −δ_G`` (``G = AAᵀ`` is positive semi-definite). The computed factor satisfies
  ``L̂L̂ᵀ = M + ΔM``, ``|ΔM| ≤ γ_{n+2}|L̂||L̂ᵀ|`` (Thm 10.3's ``γ_{n+1}``, plus one rounding where
  LAPACK multiplies by the reciprocal of the pivot instead of dividing), so
  ``‖ΔM‖₂ ≤ γ_{n+2}‖L̂‖_F²`` and ``σ_min(L̂)² ≥ s − δ_G − u·max_i(Ĝ_ii + s) − γ_{n+2}‖L̂‖_F²``.
* **‖L̂B̂ − A‖₂.** The triangular solve for each column satisfies ``(L̂ + ΔL_j) b̂_j = a_j``,
  ``|ΔL_j| ≤ γ_{n+1}|L̂|`` (Thm 8.5's ``γ_n``, plus the rounding of the pivot's reciprocal; the
  same model of the blocked BLAS that Rump's bound for the Cholesky certificate takes), so
  ``‖L̂B̂ − A‖₂ ≤ γ_{n+1} ‖L̂‖_F ‖B̂‖_F``.

With ``ℓ ≤ σ_min(L̂)`` and ``e ≥ ‖L̂B̂ − A‖₂`` this is ``σ_n(A) ≥ (σ_n(B̂) − e/ℓ) / (1/ℓ)``: the
form of :class:`.preconditioning.PreconditionedFactor` with ``‖C‖₂ ≤ 1/ℓ`` and forming error ``e/ℓ``,
so the same certificate, tightening and verdict apply. Cost: two ``n³/3`` factorisations, the
solve and ``B̂B̂ᵀ`` (``n² cols`` each); no SVD, no pivoted QR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .factors import DenseFactor
from .lapack import cholesky_lower, solve_lower
from .preconditioning import PreconditionedFactor
from .tolerance import CHOLESKY_SAFETY, cholesky_rounding_bound, gamma, unit_roundoff


def shift_preconditioning_flops(rows: int, cols: int) -> float:
    """Flops of the route: the shifted factorisation and the certificate's (``n³/3`` each), the
    triangular solve and the Gram matrix of ``B̂`` (``n² cols`` each)."""
    n, c = float(rows), float(cols)
    return 2.0 * n * n * c + 2.0 * n ** 3 / 3.0


@dataclass(frozen=True)
class ShiftedFactor:
    """``L̂``, the Cholesky factor of ``fl(Ĝ + shift·I)``, with ``σ_min(L̂) ≥ sigma_min_bound``
    and ``‖L̂‖_F² ≤ frobenius_sq``."""

    lower: Tensor
    shift: float
    sigma_min_bound: float
    frobenius_sq: float


def shifted_factor(gram: Tensor, delta_gram: float) -> ShiftedFactor | None:
    """:class:`ShiftedFactor` of ``Ĝ = gram`` (``‖Ĝ − AAᵀ‖₂ ≤ delta_gram``, overwritten) at
    ``s = CHOLESKY_SAFETY · (δ_G + γ_{n+2} tr Ĝ)``; None when the factorisation breaks down or
    the bound on ``σ_min(L̂)`` is not positive (module docstring)."""
    n, dtype = gram.shape[0], gram.dtype
    diagonal = gram.diagonal()
    trace, top = float(diagonal.sum()), float(diagonal.max())
    shift = CHOLESKY_SAFETY * (delta_gram + cholesky_rounding_bound(n, trace, dtype))
    diagonal.add_(shift)
    lower, info = cholesky_lower(gram, overwrite=True)
    if info != 0:
        return None
    frobenius_sq = float(lower.pow(2).sum()) * (1 + 2 * gamma(n * n, dtype))
    bound_sq = (shift - delta_gram - unit_roundoff(dtype) * (top + shift)
                - gamma(n + 2, dtype) * frobenius_sq)
    if not bound_sq > 0:
        return None
    return ShiftedFactor(lower, shift, math.sqrt(bound_sq), frobenius_sq)


def shift_precondition(factor: DenseFactor, gram: Tensor, delta_gram: float
                       ) -> PreconditionedFactor | None:
    """``B̂ = L̂⁻¹A`` (:func:`shifted_factor` of ``gram = fl(AAᵀ)``, overwritten) as a
    :class:`PreconditionedFactor`: ``‖C‖₂ ≤ 1/ℓ`` and forming error ``e/ℓ`` with
    ``e = γ_{n+1} ‖L̂‖_F ‖B̂‖_F ≥ ‖L̂B̂ − A‖₂`` (module docstring); None where :func:`shifted_factor`
    is."""
    shifted = shifted_factor(gram, delta_gram)
    if shifted is None:
        return None
    b = solve_lower(shifted.lower, factor.a)
    conditioned = DenseFactor(b)
    b_trace = conditioned.trace()
    error = gamma(factor.rows + 1, factor.dtype) * math.sqrt(
        shifted.frobenius_sq * b_trace * (1 + 2 * gamma(b.numel(), factor.dtype)))
    ell = shifted.sigma_min_bound
    return PreconditionedFactor(factor=conditioned, norm_bound=1.0 / ell, forming_error=error / ell,
                                trace_ratio=factor.trace() / b_trace if b_trace > 0 else 0.0)
