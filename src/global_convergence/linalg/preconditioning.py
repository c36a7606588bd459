"""A column preconditioner for the Gram certificate of a Khatri–Rao ``ϕ`` that keeps its structure.

For any ``C`` (cols × cols), ``σ_n(ϕC) ≤ σ_n(ϕ) ‖C‖₂``, so

    σ_n(ϕ) ≥ σ_n(ϕC) / ‖C‖₂.

With ``C = C_S ⊗ C_Z`` the rows of ``ϕC`` are ``(s_i C_S) ⊗ (z_i C_Z)`` (the mixed-product rule
for ``ϕ_i = s_i ⊗ z_i``, [K22] §3.3.1): ``ϕC`` is again a Khatri–Rao product, of ``S C_S`` and
``Z C_Z``, and its Gram matrix costs what ``ϕϕᵀ`` costs.

Why it helps: the worst-case rounding of the Gram certificate, ``δ_G + c_chol`` (Rump's shift,
:mod:`.tolerance`), is proportional to ``tr(ϕϕᵀ)``, and on trained features that trace is almost
all in a few directions — the mean of the positive gates ``s_i`` and of the features ``z_i``, the
class means — while ``λ_min`` lives elsewhere. ``C_M = Q diag(d) Qᵀ`` from the eigenvectors ``Q``
of ``MᵀM`` with ``d_k = min(1, √(c / λ_k))`` caps every eigenvalue of ``(MC_M)ᵀ(MC_M)`` at ``c``
(``c`` = the mean of the eigenvalues not above their mean ``tr(MᵀM)/m``: one eigenvalue that holds
most of the trace does not set the cap) and leaves the small ones alone: the trace and with it
the rounding floor fall by orders of magnitude, ``λ_min`` barely moves.

Everything is bounded, so a certificate on the preconditioned factor is a proof for ``ϕ``:

* **‖C‖₂.** ``Ĉ = fl(Q̂ D Q̂ᵀ)`` with ``Q̂`` the computed eigenvectors: ``‖Q̂‖₂² ≤ 1 +
  ‖fl(Q̂ᵀQ̂) − I‖_F + γ_m ‖Q̂‖_F²`` and ``‖Ĉ − Q̂DQ̂ᵀ‖₂ ≤ γ_m ‖Q̂‖_F² max d`` (Higham §3.5), so
  ``‖Ĉ‖₂ ≤ max d · (‖Q̂‖₂² + γ_m ‖Q̂‖_F²)``; ``‖C_S ⊗ C_Z‖₂ = ‖C_S‖₂ ‖C_Z‖₂``.
* **Forming S Ĉ_S and Z Ĉ_Z.** Row i carries ``‖e_i‖ ≤ γ_m ‖m_i‖ ‖Ĉ‖_F``; the computed Khatri–Rao
  rows then differ from ``ϕ_i Ĉ`` by at most ``‖e_s‖‖ẑ'‖ + ‖ŝ'‖‖e_z‖ + ‖e_s‖‖e_z‖``, and the
  Frobenius norm of those row errors bounds ``‖fl(ϕC) − ϕC‖₂`` (Weyl's inequality subtracts it).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .factors import KhatriRaoFactor, RowFactor
from .symmetric import gram as symmetric_gram
from .tolerance import gamma

PRECONDITION_MIN_GAIN = 10.0
"""The preconditioned certificate is tried only when it lowers ``tr(ϕϕᵀ)`` — and with it the
rounding floor of the Gram certificate — by at least this factor."""
PRECONDITION_FIRST_GAIN = 1e4
"""From this gain on, the preconditioned certificate is tried before the plain one: nearly all of
the trace then lies in a few directions (trained features, whose gates and inputs share a large
mean), and the plain floor, that many times higher, is likely to hide ``λ_min`` — measured: about
1e7 on the trained EE ``mlp`` of docs/verifiers.md, where the plain certificate fails on nine of
ten outputs; about 1e2 for ResNet-18 at initialisation, where it decides with a wide margin."""


SMALL_EIGH = 2048
"""Eigendecompositions of at most this many columns run on one thread (:func:`_one_thread`)."""


@contextlib.contextmanager
def _one_thread(active: bool = True) -> Iterator[None]:
    """PyTorch on one intra-op thread inside the block (when ``active``): a small
    eigendecomposition's thread barriers cost more than its work, and on a shared machine, where
    another process holds a core, many times more."""
    saved = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@dataclass(frozen=True)
class CappedSide:
    """``M Ĉ`` for one side (``S`` or ``Z``) of a Khatri–Rao factor, with ``‖Ĉ‖₂ ≤ norm_bound``
    and ``row_errors[i] ≥ ‖fl(m_i Ĉ) − m_i Ĉ‖``."""

    matrix: Tensor
    preconditioner: Tensor
    norm_bound: float
    row_errors: Tensor
    cap: float


@dataclass(frozen=True)
class PreconditionedFactor:
    """A factor ``B̂`` with ``σ_n(ϕ) ≥ (σ_n(B̂) − forming_error) / norm_bound``, and
    ``trace_ratio = tr(ϕϕᵀ) / tr(B̂B̂ᵀ)``. Here ``B̂ = fl(ϕC)``, a Khatri–Rao factor, with
    ``‖C‖₂ ≤ norm_bound`` and ``‖fl(ϕC) − ϕC‖₂ ≤ forming_error``; the row preconditioner of a
    dense factor (:mod:`.shift_preconditioning`) gives the same form."""

    factor: RowFactor
    norm_bound: float
    forming_error: float
    trace_ratio: float

    def to_dict(self) -> dict[str, float]:
        return {"norm_bound": self.norm_bound, "forming_error": self.forming_error,
                "trace_ratio": self.trace_ratio}

    def tolerance_for(self, tol: float, band: float) -> float:
        """What ``σ_n(fl(ϕC))`` must clear, times ``band``, for ``σ_n(ϕ)`` to clear ``band·tol``:
        ``tol·‖C‖₂ + error/band``."""
        return tol * self.norm_bound + self.forming_error / band

    def tightened(self, cert: dict, certify, band: float, record: dict) -> dict:
        """A second certificate of ``fl(ϕC)`` at half its σ_n estimate, where that would prove a
        bound four times the first or more (the first is run at the shift that decides the
        verdict, so its bound says how far the verdict is from the band, not where σ_n is):
        ``certify(tol, record)`` runs one certificate against ``tol``; one more ``n³/3``."""
        if not cert.get("estimate") or cert["estimate"] / 2 < 4 * cert["lower"]:
            return cert
        second: dict = {"notes": []}
        again = certify(cert["estimate"] / 2 / band, second)
        record["tightened"] = {"cholesky_shift": second.get("cholesky_shift"),
                               "certified": again["certified"]}
        return {**again, "estimate": cert["estimate"]} if again["certified"] else cert

    def result_for_phi(self, cert: dict, record: dict) -> dict:
        """A certificate of ``fl(ϕC)`` turned into one of ``ϕ``: the certified bound
        ``(σ − error)/‖C‖₂ ≤ σ_n(ϕ)`` and the estimate ``σ̂_n(ϕC)/‖C‖₂`` (an estimate, not a
        bound), also written into ``record``."""
        lower = (cert["lower"] - self.forming_error) / self.norm_bound
        estimate = cert["estimate"] / self.norm_bound
        record.update(certified_sigma_min_lower_bound=lower, sigma_n_estimate=estimate)
        return {**cert, "lower": lower, "estimate": estimate, "preconditioned": True}


def cap_side(m: Tensor) -> CappedSide:
    """``M Ĉ`` with ``Ĉ = Q diag(min(1, √(c/λ))) Qᵀ``, ``(λ, Q)`` the eigenpairs of ``MᵀM`` and
    ``c`` the mean of the eigenvalues not above their mean (module docstring); bounds in ``m``'s
    precision."""
    cols, dtype = m.shape[1], m.dtype
    gram = symmetric_gram(m.T)
    with _one_thread(cols <= SMALL_EIGH):
        lam, q = torch.linalg.eigh(gram)
    lam_plus = lam.clamp_min(0)
    below = lam_plus[lam_plus <= lam_plus.mean()]
    cap = float(below.mean())
    d = torch.sqrt(cap / lam.clamp_min(torch.finfo(dtype).tiny)).clamp_(max=1.0)
    c = (q * d) @ q.T
    g = gamma(cols, dtype)
    q_fro_sq = float(q.pow(2).sum())
    orthogonality = float(torch.linalg.matrix_norm(q.T @ q - torch.eye(cols, dtype=dtype,
                                                                         device=m.device)))
    q_norm_sq = 1.0 + orthogonality + g * q_fro_sq
    norm_bound = float(d.max()) * (q_norm_sq + g * q_fro_sq)
    row_errors = g * m.norm(dim=1) * float(c.norm())
    return CappedSide(matrix=m @ c, preconditioner=c, norm_bound=norm_bound,
                      row_errors=row_errors, cap=cap)


def trace_gain_estimate(factor: KhatriRaoFactor) -> float:
    """About :attr:`PreconditionedFactor.trace_ratio` of :func:`precondition`, from the eigenvalues
    of ``SᵀS`` and ``ZᵀZ`` alone: each side's ``Σ λ_k / Σ min(λ_k, c)`` (the trace its cap
    removes), multiplied. For choosing the order of the certificates only; ``Z``'s factor is kept
    in ``factor.z_cache`` for the outputs that share ``Z``."""
    def side_gain(m: Tensor) -> float:
        gram = symmetric_gram(m.T)
        with _one_thread(m.shape[1] <= SMALL_EIGH):
            lam = torch.linalg.eigvalsh(gram).clamp_min(0)
        below = lam[lam <= lam.mean()]
        capped = float(lam.clamp(max=float(below.mean())).sum())
        return float(lam.sum()) / capped if capped > 0 else math.inf

    if "gain" not in factor.z_cache:
        factor.z_cache["gain"] = side_gain(factor.z)
    return side_gain(factor.s) * factor.z_cache["gain"]


def share_capped_gram(pre: PreconditionedFactor, factor: KhatriRaoFactor) -> PreconditionedFactor:
    """Give ``pre.factor`` (from :func:`precondition` of ``factor``) the capped ``Z'Z'ᵀ``, formed
    once in ``factor.z_cache`` for the outputs that share ``Z Zᵀ`` — only when its certificate is
    about to run (a plain certificate that decides needs only the trace ratio)."""
    if factor.zz is not None and pre.factor.zz is None:
        if factor.z_cache.get("capped_zz") is None:
            factor.z_cache["capped_zz"] = symmetric_gram(factor.z_cache["capped"].matrix)
        pre.factor.zz = factor.z_cache["capped_zz"]
    return pre


def precondition(factor: KhatriRaoFactor) -> PreconditionedFactor:
    """``fl(ϕC)`` with ``C = C_S ⊗ C_Z`` from :func:`cap_side`. The capped ``Z`` is kept in
    ``factor.z_cache`` for the outputs that share ``Z`` (and its ``Z'Z'ᵀ``, by
    :func:`share_capped_gram`)."""
    s_side = cap_side(factor.s)
    if "capped" not in factor.z_cache:
        factor.z_cache["capped"] = cap_side(factor.z)
    z_side = factor.z_cache["capped"]
    s2, z2 = s_side.matrix, z_side.matrix
    es, ez = s_side.row_errors, z_side.row_errors
    rows = es * z2.norm(dim=1) + s2.norm(dim=1) * ez + es * ez
    capped = KhatriRaoFactor(s2, z2, factor.z_cache.get("capped_zz"))
    capped_trace = capped.trace()
    # a zero cap (a side whose eigenvalues below the mean are all 0) leaves nothing to certify
    ratio = factor.trace() / capped_trace if capped_trace > 0 else 0.0
    return PreconditionedFactor(factor=capped, norm_bound=s_side.norm_bound * z_side.norm_bound,
                                forming_error=float(rows.norm()), trace_ratio=ratio)
