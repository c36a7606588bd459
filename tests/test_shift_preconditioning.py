"""The row preconditioner of a shifted Cholesky factor: its bounds hold, it decides where the Gram
certificate cannot, and it never certifies dependent rows."""
from __future__ import annotations

import numpy as np
import torch

from global_convergence.linalg import (NOT_VERIFIED, RANK_BAND, VERIFIED, DenseFactor,
                                       factor_rank_verdict, numpy_tolerance)
from global_convergence.linalg import rank as rank_module
from global_convergence.linalg.shift_preconditioning import shift_precondition, shifted_factor
from global_convergence.linalg.tolerance import gram_rounding_bound

F64 = torch.float64


def with_singular_values(rows: int, cols: int, values, seed: int) -> torch.Tensor:
    """``U diag(values) Vᵀ`` with random orthonormal ``U``, ``V``: its singular values known."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=F64))
    return u @ torch.diag(torch.as_tensor(values, dtype=F64)) @ v[:, :rows].T


def mean_dominated(n: int = 80, cols: int = 200, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Trained-feature-like rows: one huge common direction (1e4) over a spectrum down to 1e-6,
    ``σ_n/σ_max = 1e-10``: far above the tolerance, far below the Gram certificate's floor."""
    values = np.logspace(0, -6, n)
    values[0] = 1e4
    return with_singular_values(n, cols, values, seed), float(values[-1])


def figures(a: torch.Tensor):
    gram = a @ a.T
    return gram, gram_rounding_bound(a.shape[1], float(gram.trace()), a.dtype)


def test_shifted_factor_bounds_its_smallest_singular_value():
    a, _ = mean_dominated()
    gram, delta = figures(a)
    shifted = shifted_factor(gram, delta)
    sigma = torch.linalg.svdvals(shifted.lower)
    assert 0 < shifted.sigma_min_bound <= float(sigma[-1])
    assert shifted.sigma_min_bound > 0.5 * float(sigma[-1])       # and not far below it
    assert float(shifted.lower.pow(2).sum()) <= shifted.frobenius_sq


def test_forming_error_bounds_the_solve_residual_in_extended_precision():
    a, _ = mean_dominated(seed=1)
    gram, delta = figures(a)
    kept = gram.clone()
    pre = shift_precondition(DenseFactor(a), gram, delta)
    lower = shifted_factor(kept, delta).lower          # the L̂ the preconditioner solved with
    b = pre.factor.a
    # the residual L̂B̂ − A in long double (80-bit on x86): its own rounding is far below the bound
    residual = lower.numpy().astype(np.longdouble) @ b.numpy().astype(np.longdouble) \
        - a.numpy().astype(np.longdouble)
    error = pre.forming_error / pre.norm_bound                      # e = ‖L̂B̂ − A‖₂ bound
    assert 0 < np.linalg.norm(residual.astype(np.float64), 2) <= error
    assert pre.trace_ratio > 1e3                                    # the trace is squashed


def test_it_decides_where_the_gram_certificate_cannot_with_a_sound_bound():
    a, sigma_n = mean_dominated(seed=2)
    tol = numpy_tolerance(1e4, a.shape, F64)
    plain: dict = {"notes": []}
    assert not rank_module._gram_certificate(DenseFactor(a), tol, RANK_BAND, None, None, 0,
                                             plain)["certified"]
    v = factor_rank_verdict(DenseFactor(a))                         # gconv verify: tightened
    assert v.verdict == VERIFIED and v.methods == {"shift_preconditioned_cholesky": 80}
    assert v.details["route"] == "gram-cholesky+shift-preconditioned-gram-cholesky"
    assert sigma_n / 5 <= v.smallest_kept <= sigma_n * (1 + 1e-6)
    assert v.details["shift_preconditioned"]["tightened"]["certified"]
    assert v.to_dict()["spectrum"]["certified"]
    run = factor_rank_verdict(DenseFactor(a), fallback_flops=1e9)  # a run's budget
    assert run.verdict == VERIFIED and "tightened" not in run.details["shift_preconditioned"]
    assert RANK_BAND * run.tolerance < run.smallest_kept <= v.smallest_kept


def test_dependent_rows_are_never_certified():
    a, _ = mean_dominated(seed=3)
    a[57] = a[12]                                                   # rank 79
    v = factor_rank_verdict(DenseFactor(a))
    assert "shift_preconditioned_cholesky" not in v.methods
    assert v.verdict == NOT_VERIFIED and v.methods == {"svd": 79, "qr": 79}
    assert v.details["route"].endswith("factor-svd-qr")


def test_the_plain_attempt_leaves_the_gram_matrix_as_it_was():
    a, _ = mean_dominated(seed=4)
    gram = a @ a.T
    before = gram.clone()
    outcome = rank_module._dense_cholesky(gram, 1e-3)
    assert not outcome.success and torch.equal(gram, before)


def test_a_memory_budget_too_small_for_the_route_skips_it_and_says_so():
    a, _ = mean_dominated(seed=2)
    need = (80 * 200 + 80 * 80) * 8                                 # B̂ and its Gram matrix
    v = factor_rank_verdict(DenseFactor(a), gram_memory_budget=need - 1)
    assert v.details["shift_preconditioned"]["skipped"] == {"bytes": need,
                                                            "bytes_budget": need - 1}
    assert "shift_preconditioned_cholesky" not in v.methods
    assert v.details["route"] == "gram-cholesky+factor-svd-qr"       # decided by the factor
    assert v.verdict == VERIFIED
    enough = factor_rank_verdict(DenseFactor(a), gram_memory_budget=need)
    assert enough.methods == {"shift_preconditioned_cholesky": 80}
