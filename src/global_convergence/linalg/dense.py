"""Rank of a matrix held in memory: SVD and QR with column pivoting, and the verdict rule.

``numpy.linalg.matrix_rank`` counts singular values above ``σ_max · max(rows, cols) · ε``; QR with
column pivoting (Golub & Van Loan, Algorithm 5.4.1; LAPACK ``geqp3``) counts ``|R_ii|`` above the
same tolerance. The two are the "two standard methods" of [K22] §3.4 (Press et al. / Golub & Van
Loan). The verdict rule is :func:`decide`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ..errors import NumericalError
from .tolerance import RANK_BAND, in_band, numpy_tolerance, precision_name
from .verdict import INCONCLUSIVE, NOT_VERIFIED, VERIFIED, Verdict


def require_finite(a: Tensor, condition: str, what: str = "the matrix") -> None:
    """Refuse ``what`` when it holds inf/NaN: the rank (and so ``condition``) is not defined."""
    finite = torch.isfinite(a)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NumericalError(f"{condition}: {what} holds {bad} non-finite value(s) (inf or NaN) "
                             f"among {a.numel()}; the rank is not defined")


def singular_values(a: Tensor) -> np.ndarray:
    """Singular values of ``a`` in descending order (computed on ``a``'s device, in its dtype)."""
    return torch.linalg.svdvals(a).cpu().numpy().astype(np.float64)


def pivoted_qr_diagonal(a: Tensor) -> np.ndarray:
    """``|R_ii|`` of QR with column pivoting ``a P = Q R`` (non-increasing; LAPACK ``geqp3`` via
    scipy, on the CPU in ``a``'s dtype)."""
    r = scipy.linalg.qr(a.detach().cpu().numpy(), mode="r", pivoting=True, check_finite=False)[0]
    return np.abs(np.diag(r)).astype(np.float64)


@dataclass(frozen=True)
class RankCut:
    """Where a tolerance cuts a non-increasing list of values."""

    rank: int
    smallest_kept: float | None
    largest_dropped: float | None


def cut(values: np.ndarray, tol: float) -> RankCut:
    """``rank = #{v > tol}``, with the values on either side of the cut."""
    values = np.asarray(values, dtype=np.float64)
    rank = int(np.count_nonzero(values > tol))
    kept = float(values[rank - 1]) if rank > 0 else None
    dropped = float(values[rank]) if rank < values.size else None
    return RankCut(rank, kept, dropped)


def target_value(values: np.ndarray, target: int) -> float:
    """The ``target``-th largest value (1-based), 0 where there are fewer values: the singular
    value that decides whether the rank reaches ``target``."""
    return float(values[target - 1]) if 0 < target <= len(values) else 0.0


def decide(target: int, methods: dict[str, int], deciding: float, tol: float,
           band: float = RANK_BAND) -> str:
    """The verdict rule for the question "rank = target" (docs/verifiers.md "What a verdict
    decides").

    *inconclusive* when that question is open: the methods disagree about whether the rank
    reaches ``target`` (one finds it, another does not), or the deciding value — the
    ``target``-th singular value — lies within a factor ``band`` of ``tol``. Otherwise
    *verified* if every method's rank reaches the target, *not-verified* if none does — also
    when their ranks differ below it (1229 vs 1231 of 4000 both answer "no").
    """
    reaches = {rank >= target for rank in methods.values()}
    if len(reaches) != 1 or in_band(deciding, tol, band):
        return INCONCLUSIVE
    return VERIFIED if reaches.pop() else NOT_VERIFIED


TAIL_VALUES_KEPT = 200
"""Values kept in a verdict's ``spectrum`` for plots: σ_max and the smallest ones up to here."""


def spectrum_tail(values: np.ndarray, kind: str, tail: int = TAIL_VALUES_KEPT) -> dict:
    """``{"kind", "index", "values"}``: ``σ_1`` and the last ``tail`` values (1-based indices),
    small enough for a verdict's JSON at any ``n``."""
    values = np.asarray(values, dtype=np.float64)
    keep = sorted({0, *range(max(0, values.size - tail), values.size)}) if values.size else []
    return {"kind": kind, "index": [i + 1 for i in keep], "values": [float(values[i]) for i in keep]}


def verdict_from_values(condition: str, target: int, shape: list[int], dtype: torch.dtype,
                        tol: float, svd_values: np.ndarray, qr_diagonal: np.ndarray | None,
                        band: float = RANK_BAND) -> Verdict:
    """A :class:`Verdict` from singular values (and optionally pivoted-QR diagonals)."""
    svd = cut(svd_values, tol)
    methods = {"svd": svd.rank}
    if qr_diagonal is not None:
        methods["qr"] = cut(qr_diagonal, tol).rank
    deciding = target_value(svd_values, target)
    return Verdict(condition=condition, verdict=decide(target, methods, deciding, tol, band),
                   rank=svd.rank, n=target, tolerance=tol, precision=precision_name(dtype),
                   smallest_kept=svd.smallest_kept, largest_dropped=svd.largest_dropped,
                   methods=methods, agree=len(set(methods.values())) == 1, shape=list(shape),
                   details={"band": band, "margin": deciding / tol if tol > 0 else None,
                            "spectrum": spectrum_tail(svd_values, "singular values (SVD)")})


def dense_rank_verdict(a: Tensor, target: int | None = None, *, condition: str = "rank",
                       tol: float | None = None, band: float = RANK_BAND,
                       use_qr: bool = True, noise_floor: float = 0.0) -> Verdict:
    """Decide ``rank(a) = target`` (default: the number of rows) by SVD and pivoted QR.

    ``tol`` defaults to numpy's ``σ_max · max(rows, cols) · ε`` in ``a``'s precision, raised to
    ``noise_floor`` (a bound on ``‖a − a_exact‖₂``, e.g. from a float32 forward pass) when that is
    larger: by Weyl's inequality ``|σ_k(a) − σ_k(a_exact)| ≤ ‖a − a_exact‖₂``. The verdict
    follows :func:`decide`; ``details["margin"]`` is the deciding singular value over ``tol``.
    """
    start = time.perf_counter()
    require_finite(a, condition)
    target = a.shape[0] if target is None else int(target)
    values = singular_values(a)
    sigma_max = float(values[0]) if values.size else 0.0
    tol = numpy_tolerance(sigma_max, a.shape, a.dtype) if tol is None else float(tol)
    tol = max(tol, float(noise_floor))
    qr_diag = pivoted_qr_diagonal(a) if use_qr else None
    verdict = verdict_from_values(condition, target, list(a.shape), a.dtype, tol, values,
                                  qr_diag, band)
    verdict.details["route"] = "dense-svd-qr" if use_qr else "dense-svd"
    if noise_floor:
        verdict.details["noise_floor"] = float(noise_floor)
    verdict.seconds["rank"] = time.perf_counter() - start
    return verdict


def svd_rank(a: Tensor, tol: float | None = None) -> int:
    """Numerical rank by SVD — ``numpy.linalg.matrix_rank(a, tol)``'s count."""
    values = singular_values(a)
    if tol is None:
        tol = numpy_tolerance(values[0] if values.size else 0.0, a.shape, a.dtype)
    return cut(values, tol).rank


def qr_rank(a: Tensor, tol: float | None = None) -> int:
    """Numerical rank by QR with column pivoting: ``#{|R_ii| > tol}``, with ``tol`` defaulting to
    numpy's convention (``σ_max`` from the SVD, so the two ranks are comparable)."""
    if tol is None:
        values = singular_values(a)
        tol = numpy_tolerance(values[0] if values.size else 0.0, a.shape, a.dtype)
    return cut(pivoted_qr_diagonal(a), tol).rank
