"""Rank and projections from a Gram matrix ``G = A Aᵀ`` by its eigen-decomposition.

``λ_i(G) = σ_i(A)²``, so the numerical rank at tolerance ``tol`` counts ``λ_i > tol²``. ``G``
carries an absolute error ``δ`` (forming it, then ``eigh``: see :mod:`.tolerance`), so the count
is only trustworthy when no eigenvalue lies within ``δ`` of ``tol²``
(:meth:`GramSpectrum.resolves`).
That holds when the tolerance is far above the Gram's rounding — a float32 tolerance on a Gram
formed in float64, as for the alignment test — and fails for a float64 tolerance, whose square is
below float64 rounding: then decide from the factor itself (:mod:`.triangular`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .tolerance import gamma


@dataclass
class GramSpectrum:
    """Eigenvalues (descending) and eigenvectors of ``G``, with the absolute uncertainty of each
    eigenvalue."""

    values: np.ndarray
    vectors: Tensor
    uncertainty: float

    @classmethod
    def of(cls, gram: Tensor, rounding: float = 0.0) -> "GramSpectrum":
        """``eigh`` of ``gram``; ``rounding`` is the error already in ``gram`` (``δ_G``), to which
        ``eigh``'s own backward error ``γ_n · max|λ|`` is added."""
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0), vectors.flip(1)
        vals = values.cpu().numpy().astype(np.float64)
        scale = float(np.abs(vals).max()) if vals.size else 0.0
        return cls(vals, vectors, rounding + gamma(gram.shape[0], gram.dtype) * scale)

    @property
    def singular_values(self) -> np.ndarray:
        """``σ_i = √max(λ_i, 0)``."""
        return np.sqrt(np.clip(self.values, 0.0, None))

    def rank(self, tol: float) -> int:
        """``#{λ_i > tol²}``."""
        return int(np.count_nonzero(self.values > tol * tol))

    def resolves(self, tol: float) -> bool:
        """Whether every eigenvalue is farther than the uncertainty from ``tol²``."""
        return bool(np.all(np.abs(self.values - tol * tol) > self.uncertainty))

    def residual(self, y: Tensor, tol: float) -> float:
        """``‖(I − P) y‖ / ‖y‖`` with ``P`` the projection onto the eigenvectors with
        ``λ > tol²`` (the numerically significant part of ``Col(A)``)."""
        return projection_residual(self.vectors[:, :self.rank(tol)], y)


def projection_residual(basis: Tensor, y: Tensor) -> float:
    """``‖y − B Bᵀ y‖ / ‖y‖`` for an orthonormal basis ``B`` (columns); 0 for ``y = 0``."""
    y = y.to(dtype=basis.dtype, device=basis.device).reshape(-1)
    norm = float(y.norm())
    if norm == 0.0:
        return 0.0
    return float((y - basis @ (basis.T @ y)).norm()) / norm


def relative_residual(gram: Tensor, y: Tensor, tol: float, rounding: float = 0.0) -> float:
    """Least-squares relative residual ``‖(I − P) y‖ / ‖y‖`` of projecting ``y`` onto ``Col(A)``,
    from ``G = A Aᵀ`` alone: ``P = U_k U_kᵀ`` over the eigenvectors of ``G`` with ``λ > tol²``
    (singular values of ``A`` above ``tol``). ``rounding`` is the error already in ``gram``.

    Raises ``ValueError`` when ``tol²`` is below the Gram's resolution (its rounding plus
    ``eigh``'s): eigenvectors of rounding-level eigenvalues would be counted as signal. Project
    with the factor's own singular vectors then (e.g. from :func:`.triangular_factor`).
    """
    spectrum = GramSpectrum.of(gram, rounding)
    if tol * tol <= spectrum.uncertainty:
        raise ValueError(f"tolerance {tol:.3g} is below the resolution of the Gram matrix "
                         f"(eigenvalue uncertainty {spectrum.uncertainty:.3g} > tol²)")
    return spectrum.residual(y, tol)
