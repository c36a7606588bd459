"""A sufficient test of full row rank that neither squares the conditioning nor forms ``ϕ``.

For any ``Ω`` (cols × k) and every i, ``σ_i(ϕΩ) ≤ σ_i(ϕ) ‖Ω‖₂``, so with ``k ≥ n``

    σ_n(ϕ) ≥ σ_n(ϕΩ) / ‖Ω‖₂.

With a Khatri–Rao ``Ω = Ω_S ⊙ Ω_Z`` (column l is ``ω_S,l ⊗ ω_Z,l``) and ``ϕ_i = s_i ⊗ z_i``
([K22] §3.3.1), ``(ϕΩ)_il = (s_i · ω_S,l)(z_i · ω_Z,l)``: ``ϕΩ = (S Ω_S) ⊙ (Z Ω_Z)`` costs
``2nk(m_S + m_Z)`` flops, and its SVD ``≈ 4n²k`` — against ``2n²·m_S·m_Z`` for a QR of ``ϕ``.

Every step is bounded, so the result is a proof up to the usual backward-error constants:

* **‖Ω‖₂.** ``‖Ω‖₂² = ‖ΩᵀΩ‖₂ ≤ ‖ΩᵀΩ‖_∞`` with ``ΩᵀΩ = (Ω_SᵀΩ_S) ⊙ (Ω_ZᵀΩ_Z)``; each computed
  entry is within ``γ_{m_S+m_Z+1} ‖ω_l‖ ‖ω_l'‖`` of the exact one (Higham §3.1), which is added
  to its absolute value, and the row sums carry ``γ_k``. Also ``‖Ω‖₂ ≤ ‖Ω‖_F``; the smaller
  bound is used. (An estimate such as power iteration would not be a bound.)
* **Forming ϕΩ.** Each entry's error is at most ``γ_{m_S+m_Z+1} ‖s_i‖‖ω_S,l‖ ‖z_i‖‖ω_Z,l‖``, so
  ``‖fl(ϕΩ) − ϕΩ‖₂ ≤ γ_{m_S+m_Z+1} ‖ϕ‖_F ‖Ω‖_F`` (``‖ϕ_i‖ = ‖s_i‖‖z_i‖``).
* **The SVD.** The computed singular values are those of ``fl(ϕΩ) + E`` with
  ``‖E‖₂ ≤ max(n, k) · ε · ‖fl(ϕΩ)‖₂`` — the backward error numpy's default tolerance assumes.

Both errors are multiplied by :data:`~.tolerance.CHOLESKY_SAFETY` and subtracted from
``σ̂_n`` before dividing by the bound on ``‖Ω‖₂`` (Weyl's inequality).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .dense import singular_values
from .factors import KhatriRaoFactor
from .tolerance import CHOLESKY_SAFETY, gamma, machine_epsilon

SKETCH_OVERSAMPLING = 2.0
"""Columns of the sketch per row: ``k = ⌈2n⌉`` (σ_n of an n × k Gaussian-like sketch grows like
``√k − √n``)."""


@dataclass(frozen=True)
class SketchBound:
    """``lower ≤ σ_n(ϕ)`` from the sketch, and the figures it came from; ``lower_bounds`` are
    ``(σ̂_i − error) / ‖Ω‖₂ ≤ σ_i(ϕ)`` for every i ≤ n (a certified lower spectrum)."""

    lower: float
    sigma_hat: float
    omega_norm_bound: float
    forming_error: float
    svd_error: float
    columns: int
    lower_bounds: np.ndarray

    def to_dict(self) -> dict[str, float | int]:
        return {"certified_sigma_n_lower_bound": self.lower, "sketch_sigma_n": self.sigma_hat,
                "omega_norm_bound": self.omega_norm_bound, "forming_error": self.forming_error,
                "svd_error": self.svd_error, "columns": self.columns}


def sketch_flops(rows: int, m_s: int, m_z: int, columns: int) -> float:
    """Flops of :func:`khatri_rao_sketch_bound`: ``ϕΩ``, ``ΩᵀΩ`` and the SVD of ``ϕΩ``."""
    n, k = float(rows), float(columns)
    return 2.0 * n * k * (m_s + m_z) + 2.0 * k * k * (m_s + m_z) + 4.0 * n * n * k


def sketch_columns(rows: int, oversampling: float = SKETCH_OVERSAMPLING) -> int:
    """``k = ⌈oversampling · n⌉`` columns (at least n)."""
    return max(rows, math.ceil(oversampling * rows))


def omega_norm_bound(omega_s: Tensor, omega_z: Tensor) -> tuple[float, float]:
    """``(bound on ‖Ω‖₂, ‖Ω‖_F)`` for ``Ω = Ω_S ⊙ Ω_Z`` (module docstring)."""
    k = omega_s.shape[1]
    g = gamma(omega_s.shape[0] + omega_z.shape[0] + 1, omega_s.dtype)
    norms = omega_s.norm(dim=0) * omega_z.norm(dim=0)                 # ‖ω_l‖
    frobenius = float(norms.pow(2).sum().sqrt()) * (1 + CHOLESKY_SAFETY * g)
    gram = (omega_s.T @ omega_s).mul_(omega_z.T @ omega_z).abs_()
    gram.add_(torch.outer(norms, norms), alpha=CHOLESKY_SAFETY * g)
    row_sums = float(gram.sum(dim=1).max()) * (1 + CHOLESKY_SAFETY * gamma(k, omega_s.dtype))
    return min(math.sqrt(row_sums), frobenius), frobenius


def khatri_rao_sketch_bound(factor: KhatriRaoFactor, columns: int | None = None,
                            seed: int = 0) -> SketchBound:
    """A certified lower bound on ``σ_n(ϕ)`` for ``ϕ`` given by ``S`` and ``Z`` (module
    docstring), with ``columns ≥ n`` Gaussian Khatri–Rao columns drawn from ``seed``."""
    s, z = factor.s, factor.z
    n, dtype, device = factor.rows, factor.dtype, factor.device
    k = sketch_columns(n) if columns is None else int(columns)
    if k < n:
        raise ValueError(f"the sketch needs at least n = {n} columns, got {k}")
    g = torch.Generator().manual_seed(seed)
    omega_s = torch.randn(s.shape[1], k, generator=g, dtype=torch.float64).to(device, dtype)
    omega_z = torch.randn(z.shape[1], k, generator=g, dtype=torch.float64).to(device, dtype)
    omega_s /= omega_s.norm(dim=0)
    omega_z /= omega_z.norm(dim=0)
    omega_2, omega_f = omega_norm_bound(omega_s, omega_z)
    sketch = (s @ omega_s).mul_(z @ omega_z)                          # ϕΩ, n × k
    values = singular_values(sketch)
    del sketch
    inner = s.shape[1] + z.shape[1] + 1
    forming = gamma(inner, dtype) * math.sqrt(factor.trace()) * omega_f
    svd = max(n, k) * machine_epsilon(dtype) * float(values[0])
    error = CHOLESKY_SAFETY * (forming + svd)
    bounds = np.clip(values[:n] - error, 0.0, None) / omega_2
    return SketchBound(lower=float(bounds[n - 1]), sigma_hat=float(values[n - 1]),
                       omega_norm_bound=omega_2, forming_error=forming, svd_error=svd,
                       columns=k, lower_bounds=bounds)
