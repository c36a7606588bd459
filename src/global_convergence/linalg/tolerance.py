"""Tolerances, the inconclusive band and rounding-error bounds of the rank decisions.

Conventions (docs/verifiers.md):

* **Tolerance.** Unless one is given, a singular value counts as nonzero when it exceeds
  ``σ_max · max(rows, cols) · ε`` — ``numpy.linalg.matrix_rank``'s default, the paper's check —
  with ``ε`` the machine epsilon of the working precision.
* **Band.** A deciding value within a factor :data:`RANK_BAND` of the tolerance is too close to
  call: the verdict is *inconclusive*.
* **Rounding bounds.** ``u = ε/2`` is the unit roundoff and ``γ_k = k u / (1 − k u)`` (Higham,
  *Accuracy and Stability of Numerical Algorithms*, §3.1). A Gram matrix computed from a factor
  whose rows have inner length k carries an error ``‖ΔG‖₂ ≤ γ_k tr(G)`` (each entry
  ``|ΔG_il| ≤ γ_k ‖a_i‖ ‖a_l‖``, and ``‖(‖a_i‖‖a_l‖)_{il}‖₂ = Σ_i ‖a_i‖² = tr G``); a successful
  floating-point Cholesky factorisation of ``A − cI`` proves ``A`` positive definite when
  ``c ≥ γ_{n+2} tr(A)`` (Rump, *Verification of positive definiteness*, BIT 46, 2006, Thm 2.3,
  up to underflow terms; his ``γ_{n+1}`` plus one rounding, as LAPACK multiplies by the pivot's
  reciprocal instead of dividing by it). Both are worst-case bounds, far above typical errors.
"""
from __future__ import annotations

import torch

RANK_BAND = 10.0
"""A deciding singular value ``s`` with ``tol / RANK_BAND < s < RANK_BAND · tol`` is inside the
band around the tolerance: whether it counts depends on the exact tolerance convention (numpy's
``max(rows, cols)·ε`` against, e.g., ``sqrt(rows·cols)·ε`` or a forward-pass noise floor) and on
rounding, so the verdict there is *inconclusive*. One decade on each side."""

CHOLESKY_SAFETY = 2.0
"""Factor on the worst-case rounding bounds in the Cholesky shift: covers the second-order terms
left out of ``γ_k`` and the rounding of forming ``G − μI``."""

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def precision_name(dtype: torch.dtype) -> str:
    """``"float64"`` or ``"float32"`` (other dtypes by their torch name)."""
    for name, value in PRECISIONS.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def dtype_of(precision: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a precision name (``"float64"``/``"float32"``) or dtype."""
    if isinstance(precision, torch.dtype):
        return precision
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, "
                         f"got {precision!r}") from None


def machine_epsilon(dtype: torch.dtype) -> float:
    """``ε``: the spacing of floating-point numbers at 1 (``numpy.finfo(dtype).eps``)."""
    return float(torch.finfo(dtype).eps)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = ε / 2``: the relative error bound of one rounding to nearest."""
    return machine_epsilon(dtype) / 2.0


def gamma(k: int, dtype: torch.dtype) -> float:
    """``γ_k = k u / (1 − k u)``; infinite when ``k u ≥ 1`` (no bound)."""
    ku = k * unit_roundoff(dtype)
    return ku / (1.0 - ku) if ku < 1.0 else float("inf")


def numpy_tolerance(sigma_max: float, shape: tuple[int, int] | list[int],
                    dtype: torch.dtype) -> float:
    """``σ_max · max(rows, cols) · ε`` — ``numpy.linalg.matrix_rank``'s default tolerance."""
    return float(sigma_max) * max(int(shape[0]), int(shape[1])) * machine_epsilon(dtype)


def gram_rounding_bound(inner: int, trace: float, dtype: torch.dtype) -> float:
    """Worst-case ``‖ΔG‖₂ ≤ γ_inner · tr(G)`` of a Gram matrix formed from rows of length
    ``inner`` (for ``ϕϕᵀ = (SSᵀ) ⊙ (ZZᵀ)``, ``inner = m_H + m_{H−1} + 1``)."""
    return gamma(inner, dtype) * float(trace)


def cholesky_rounding_bound(n: int, trace: float, dtype: torch.dtype) -> float:
    """Rump's shift ``γ_{n+2} · tr(G)``: if floating-point Cholesky of ``G − cI`` succeeds for a
    ``c`` at least this, ``G`` (as stored) is positive definite. (Rump's ``γ_{n+1}`` is for the
    algorithm that divides by the pivot; LAPACK multiplies by its reciprocal, one rounding more.)"""
    return gamma(n + 2, dtype) * float(trace)


def in_band(value: float, tol: float, band: float = RANK_BAND) -> bool:
    """Whether ``tol / band < value < band · tol`` (too close to the tolerance to decide)."""
    return tol / band < value < band * tol
