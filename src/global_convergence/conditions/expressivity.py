"""The expressivity condition of [KS21], Assumption 1.

    There is ``w(1:H)`` with ``rank([h_X(w(1:H)), 1_n]) = n``,

``h_X`` the last-hidden-layer outputs on the n training inputs. The paper checks it at one random
draw with ``numpy.linalg.matrix_rank`` and its default tolerance (§7.1); :func:`expressivity`
checks it at the model's current state, with features in float64 (docs/verifiers.md) and two methods (SVD
and QR with column pivoting) on ``[h_X, 1]`` itself.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from ..linalg import (FACTOR_MEMORY_BUDGET, RANK_BAND, DenseFactor, Verdict, dense_rank_verdict,
                      factor_rank_verdict)
from .batchnorm import with_recomputed_batchnorm
from .certified import certified_features
from .features import FEATURE_CHUNK, require_split, trunk_features, with_constant

METHODS = ("auto", "dense", "gram")
DENSE_UP_TO_FLOPS = 1e9
"""``method="auto"`` runs the paper's two methods (dense SVD and pivoted QR) up to this cost."""
DENSE_WORKSPACE = 3
"""A dense SVD plus pivoted QR of an ``n × c`` matrix needs about this many copies of it."""


def dense_flops(rows: int, cols: int) -> float:
    """About the flops of an SVD plus a pivoted QR of a ``rows × cols`` matrix:
    ``6 · rows · cols · min(rows, cols)``."""
    return 6.0 * rows * cols * min(rows, cols)


def check_flops(rows: int, cols: int, dense_up_to_flops: float = DENSE_UP_TO_FLOPS) -> float:
    """About the flops of one expressivity check on ``[h_X, 1]`` (``rows × cols``): the dense
    methods where ``method="auto"`` takes them, else forming the Gram and its Cholesky."""
    dense = dense_flops(rows, cols)
    if dense <= dense_up_to_flops or cols < rows:
        return dense
    return 2.0 * rows * rows * cols + rows ** 3 / 3.0


def float32_screen(sample: Tensor, feature_error: float, n: int,
                   band: float = RANK_BAND) -> tuple[bool, dict[str, float]]:
    """:data:`~.certified.Screen` for ``[h, 1]``: ``σ_n ≤ σ_min([h_s, 1])`` of the sampled rows
    against ``band`` times the noise floor ``e·‖h‖_F`` (``‖h‖_F`` estimated from the sample)."""
    if sample.shape[0] == 0:
        return True, {}
    upper = float(torch.linalg.svdvals(with_constant(sample))[-1])
    floor = feature_error * float(sample.norm()) * math.sqrt(n / sample.shape[0])
    return upper > band * floor, {"sigma_n_upper_bound": upper, "noise_floor_estimate": floor}


def expressivity(model: nn.Module, x: Tensor, *, dtype: torch.dtype | None = None,
                 precision: str = "auto", recompute_batchnorm: bool = True,
                 chunk_size: int = FEATURE_CHUNK, tol: float | None = None,
                 band: float = RANK_BAND, method: str = "auto",
                 memory_budget: int = FACTOR_MEMORY_BUDGET) -> Verdict:
    """[KS21] Assumption 1 at the model's current state: ``rank([h_X, 1_n]) = n``.

    ``model`` is a :class:`~global_convergence.models.TwoPhaseModel` (any ``SplitNet``: ``h_X``
    is its trunk output), evaluated on a copy in eval mode, ``chunk_size`` samples at a time; the
    caller's model is untouched. ``recompute_batchnorm=True`` (a check at initialisation) first
    recomputes the trunk's batch-norm statistics over ``x``
    (:func:`~.batchnorm.with_recomputed_batchnorm`); ``False`` keeps the model's (after the
    switch they are the fixed ones); ``details["batchnorm"]`` says which. ``precision="auto"``:
    the float32 features with their measured noise floor, accepted only when they verify, else
    float64 (:func:`~.certified.certified_features`); ``"float64"``: float64 only; ``dtype``
    (old keyword) forces features in that dtype. ``method="dense"``: SVD and pivoted QR of
    ``[h_X, 1]`` (the paper's test, two methods); ``"gram"``: the Gram certificate with fallback
    to the factor (:func:`~global_convergence.linalg.factor_rank_verdict`); ``"auto"``:
    dense SVD and QR when they cost at most :data:`DENSE_UP_TO_FLOPS` or ``m_H + 1 < n`` (the
    rank cannot reach n; they say how far it is), else the Gram certificate (``n²(m_H + 1) +
    n³/3`` flops against ``6 n²(m_H + 1)``) with the factor as fallback. ``tol`` defaults to
    numpy's ``σ_max · max(n, m_H + 1) · ε``. The verdict's shape is ``[n, m_H + 1]``.
    """
    model = require_split(model, "expressivity")
    model, statistics = with_recomputed_batchnorm(model, x, recompute=recompute_batchnorm,
                                                  batch_size=chunk_size)

    def check(h: Tensor, error: float | None, fallback: float | None) -> Verdict:
        return expressivity_of_features(h, tol=tol, band=band, method=method,
                                        memory_budget=memory_budget, feature_error=error,
                                        fallback_flops=fallback)

    if dtype is not None:
        h, seconds = trunk_features(model, x, dtype, chunk_size)
        verdict = check(h, None, None)
        verdict.seconds["features"] = seconds
    else:
        _, verdict = certified_features(model, x, check, None, precision, chunk_size,
                                        mode="full", condition="expressivity",
                                        check_flops=lambda n, m: check_flops(n, m + 1),
                                        screen=float32_screen)
    verdict.details["batchnorm"] = statistics
    return verdict


def expressivity_of_features(h: Tensor, *, tol: float | None = None, band: float = RANK_BAND,
                             method: str = "auto", memory_budget: int = FACTOR_MEMORY_BUDGET,
                             feature_error: float | None = None,
                             fallback_flops: float | None = None,
                             dense_up_to_flops: float = DENSE_UP_TO_FLOPS) -> Verdict:
    """The expressivity verdict for given last-hidden-layer features ``h`` (n × m_H).

    ``feature_error``: a relative row error ``‖h̃_i − h_i‖ ≤ e‖h_i‖`` of ``h`` (e.g. a float32
    pass); its noise floor ``e·‖h‖_F ≥ ‖[h̃, 1] − [h, 1]‖₂`` then bounds the tolerance below.
    ``fallback_flops`` caps the cost of SVD and QR (``None``: no cap), as in
    :func:`~global_convergence.linalg.factor_rank_verdict`.
    """
    if method not in METHODS:
        raise UserInputError(f"expressivity method must be one of {', '.join(METHODS)}, got "
                             f"{method!r}")
    a = with_constant(h)
    if method == "auto":
        fits = DENSE_WORKSPACE * a.numel() * a.element_size() <= memory_budget
        cost = dense_flops(*a.shape)
        allowed = fallback_flops is None or cost <= fallback_flops
        wide = a.shape[1] >= a.shape[0]
        method = "dense" if fits and (cost <= dense_up_to_flops or (allowed and not wide)) \
            else "gram"
    floor = 0.0 if feature_error is None else feature_error * float(h.norm())
    if method == "dense":
        verdict = dense_rank_verdict(a, condition="expressivity", tol=tol, band=band,
                                     noise_floor=floor)
    else:
        verdict = factor_rank_verdict(DenseFactor(a), condition="expressivity", tol=tol,
                                      band=band, factor_memory_budget=memory_budget,
                                      noise_floor=floor, fallback_flops=fallback_flops)
    verdict.details["assumption"] = "[KS21] Assumption 1: rank([h_X, 1_n]) = n"
    return verdict
