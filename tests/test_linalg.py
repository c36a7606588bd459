"""Numerical rank with verdicts: agreement with numpy, the band, the Gram fallback, TSQR,
Khatri-Rao Gram products, the blocked Cholesky, least-squares residuals, JSON."""
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from global_convergence.errors import NumericalError
from global_convergence.linalg import (INCONCLUSIVE, NOT_VERIFIED, RANK_BAND, VERIFIED,
                                       DenseFactor, GramSpectrum, KhatriRaoFactor, Verdict, decide,
                                       dense_rank_verdict, factor_rank_verdict, gram_rank_verdict,
                                       numpy_tolerance, qr_rank, relative_residual,
                                       shifted_cholesky, svd_rank, triangular_factor)

F64 = torch.float64


def with_singular_values(rows: int, cols: int, values, seed: int = 0) -> torch.Tensor:
    """A rows × cols matrix U diag(values) Vᵀ with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=F64))
    k = len(values)
    return u[:, :k] @ torch.diag(torch.as_tensor(values, dtype=F64)) @ v[:, :k].T


def product_of_rank(rows: int, cols: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, k, generator=g, dtype=F64)
    return left @ torch.randn(k, cols, generator=g, dtype=F64)


@pytest.mark.parametrize("rows,cols", [(30, 30), (40, 70), (70, 40)])
def test_full_rank_matches_numpy_and_is_verified(rows, cols):
    a = torch.randn(rows, cols, dtype=F64, generator=torch.Generator().manual_seed(rows + cols))
    expected = np.linalg.matrix_rank(a.numpy())
    assert svd_rank(a) == qr_rank(a) == expected == min(rows, cols)
    v = dense_rank_verdict(a)
    assert v.rank == expected
    assert v.methods == {"svd": expected, "qr": expected} and v.agree
    assert v.verdict == (VERIFIED if rows <= cols else NOT_VERIFIED)
    assert v.tolerance == pytest.approx(np.linalg.svd(a.numpy(), compute_uv=False)[0]
                                        * max(rows, cols) * np.finfo(np.float64).eps)


@pytest.mark.parametrize("k", [1, 7, 19])
def test_rank_deficient_product_matches_numpy(k):
    a = product_of_rank(25, 60, k, seed=k)
    assert np.linalg.matrix_rank(a.numpy()) == k
    assert svd_rank(a) == qr_rank(a) == k
    v = dense_rank_verdict(a)
    assert (v.rank, v.verdict, v.agree) == (k, NOT_VERIFIED, True)
    assert v.largest_dropped < v.tolerance / RANK_BAND < RANK_BAND * v.tolerance < v.smallest_kept
    w = factor_rank_verdict(DenseFactor(a))               # Gram fails → factor route
    assert (w.rank, w.verdict) == (k, NOT_VERIFIED)
    assert w.methods == {"svd": k, "qr": k}
    assert "cholesky_failed_at" in w.details


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 30), m=st.integers(2, 30), data=st.data(), seed=st.integers(0, 2**16))
def test_rank_of_product_equals_inner_dimension(n, m, data, seed):
    k = data.draw(st.integers(1, min(n, m)), label="k")
    a = product_of_rank(n, m, k, seed)
    assert svd_rank(a) == k
    assert qr_rank(a) == k
    assert np.linalg.matrix_rank(a.numpy()) == k


def test_values_straddling_the_tolerance_are_inconclusive():
    rows, cols = 20, 50
    probe = with_singular_values(rows, cols, [1.0] * rows)
    tol = numpy_tolerance(1.0, probe.shape, F64)
    # smallest singular value 3·tol: above the tolerance (kept) but inside the band
    a = with_singular_values(rows, cols, [1.0] * (rows - 1) + [3 * tol], seed=1)
    v = dense_rank_verdict(a)
    assert v.rank == rows and v.verdict == INCONCLUSIVE
    # and 0.3·tol: dropped, still inside the band
    b = with_singular_values(rows, cols, [1.0] * (rows - 1) + [0.3 * tol], seed=2)
    w = dense_rank_verdict(b)
    assert w.rank == rows - 1 and w.verdict == INCONCLUSIVE
    # far from the tolerance both ways: decided
    assert dense_rank_verdict(with_singular_values(rows, cols, [1.0] * (rows - 1) + [1e4 * tol],
                                                   seed=3)).verdict == VERIFIED
    assert dense_rank_verdict(with_singular_values(rows, cols, [1.0] * (rows - 1) + [0.0],
                                                   seed=4)).verdict == NOT_VERIFIED


def test_disagreeing_methods_are_inconclusive():
    assert decide(5, {"svd": 5, "qr": 4}, deciding=1.0, tol=1e-10) == INCONCLUSIVE
    assert decide(5, {"svd": 5, "qr": 5}, deciding=1.0, tol=1e-10) == VERIFIED
    assert decide(5, {"svd": 4, "qr": 4}, deciding=1e-20, tol=1e-10) == NOT_VERIFIED


def test_gram_not_positive_definite_is_decided_without_the_gram_alone():
    """σ_min/σ_max = 1e-9: the Gram's smallest eigenvalue (1e-18 relative) is lost in its rounding
    (eigvalsh gives the wrong rank), yet σ_min is far above the float64 tolerance: the shifted
    Cholesky row preconditioner decides, or, without it, the factor route."""
    n, cols = 60, 150
    values = np.logspace(0, -9, n)
    a = with_singular_values(n, cols, values, seed=5)
    gram = a @ a.T
    assert np.linalg.matrix_rank(a.numpy()) == n
    lam = torch.linalg.eigvalsh(gram)
    tol = numpy_tolerance(1.0, a.shape, F64)
    assert int((lam > tol ** 2).sum()) != n                    # the naive Gram count is wrong
    eig = gram_rank_verdict(gram, a.shape)
    assert eig.verdict == INCONCLUSIVE                         # a Gram alone cannot tell
    v = factor_rank_verdict(DenseFactor(a))
    assert v.verdict == VERIFIED and v.rank == n
    assert v.methods == {"shift_preconditioned_cholesky": n} and "cholesky_failed_at" in v.details
    assert v.details["route"] == "gram-cholesky+shift-preconditioned-gram-cholesky"
    assert RANK_BAND * v.tolerance < v.smallest_kept <= 1e-9       # a certified lower bound
    # σ_n at 20·tol: beyond the band, but below what the shifted route can prove (its rounding,
    # about n^1.5·u·σ_max, is a few tolerances): the factor route (SVD and pivoted QR) decides
    values[-1] = 20 * tol
    close = with_singular_values(n, cols, values, seed=5)
    factor = factor_rank_verdict(DenseFactor(close))
    assert factor.details["route"] == ("gram-cholesky+shift-preconditioned-gram-cholesky"
                                       "+factor-svd-qr")
    assert factor.verdict == VERIFIED and factor.methods == {"svd": n, "qr": n}
    assert factor.smallest_kept == pytest.approx(20 * tol, rel=1e-3)
    skipped = factor_rank_verdict(DenseFactor(close), factor_memory_budget=1)
    assert skipped.verdict == INCONCLUSIVE                     # no factor route: never a guess


def test_cholesky_certificate_is_fast_path_and_sound():
    n, cols = 80, 200
    a = with_singular_values(n, cols, np.linspace(3.0, 0.01, n), seed=6)
    v = factor_rank_verdict(DenseFactor(a))
    assert v.verdict == VERIFIED and v.methods == {"cholesky": n}
    assert v.details["route"] == "gram-cholesky"
    lower = v.details["certified_sigma_min_lower_bound"]
    assert RANK_BAND * v.tolerance <= lower <= 0.01 <= v.smallest_kept * (1 + 1e-6)
    assert v.smallest_kept == pytest.approx(0.01, rel=1e-3)
    both = factor_rank_verdict(DenseFactor(a), cross_check=True)
    assert both.methods == {"cholesky": n, "svd": n, "qr": n} and both.agree


def test_khatri_rao_factor_matches_dense_phi():
    g = torch.Generator().manual_seed(7)
    s = torch.sigmoid(torch.randn(30, 4, generator=g, dtype=F64))
    z = torch.randn(30, 9, generator=g, dtype=F64)
    f = KhatriRaoFactor(s, z)
    phi = torch.stack([torch.cat([s[i, k] * z[i] for k in range(4)]) for i in range(30)])
    assert torch.allclose(f.dense(), phi)
    assert torch.allclose(torch.cat(list(f.column_chunks(18)), dim=1), phi)
    assert torch.allclose(f.gram(), phi @ phi.T)
    v = torch.randn(30, generator=g, dtype=F64)
    assert torch.allclose(f.gram_matvec(v), phi @ (phi.T @ v))
    assert torch.allclose(f.row_norms_sq(), (phi ** 2).sum(1))
    assert f.shape == [30, 36]


def test_blocked_cholesky_equals_dense_and_reports_breakdown():
    a = torch.randn(50, 90, dtype=F64, generator=torch.Generator().manual_seed(8))
    f = DenseFactor(a)
    dense = shifted_cholesky(f, 0.1)
    blocked = shifted_cholesky(f, 0.1, block=16)
    assert dense.success and blocked.success
    lower = torch.zeros(50, 50, dtype=F64)
    for k0, p in blocked.factor.panels:
        lower[k0:, k0:k0 + p.shape[1]] = p
    assert torch.allclose(lower, dense.factor.panels[0][1], atol=1e-10)
    rhs = torch.randn(50, 1, dtype=F64)
    expected = torch.linalg.solve(a @ a.T - 0.1 * torch.eye(50, dtype=F64), rhs)
    assert torch.allclose(blocked.factor.solve(rhs), expected, atol=1e-8)
    dup = torch.cat([a[:30], a[:1], a[30:49]])              # row 30 repeats row 0
    broken = shifted_cholesky(DenseFactor(dup), 1e-8, block=16)
    assert not broken.success and broken.failed_at == 30
    v = factor_rank_verdict(DenseFactor(a), block=16)
    assert v.verdict == VERIFIED and v.details["cholesky_layout"] == "blocked"


def test_triangular_factor_has_the_singular_values_of_the_factor():
    a = torch.randn(20, 75, dtype=F64, generator=torch.Generator().manual_seed(9))
    r = triangular_factor(a[:, c:c + 16] for c in range(0, 75, 16))
    assert r.shape == (20, 20)
    assert torch.allclose(torch.linalg.svdvals(r), torch.linalg.svdvals(a))
    assert torch.allclose(r.T @ r, a @ a.T)


def test_relative_residual_separates_inside_from_outside():
    a = product_of_rank(40, 100, 12, seed=10).float().double()   # float32 entries, as J
    g = torch.Generator().manual_seed(11)
    inside = a @ torch.randn(100, generator=g, dtype=F64)
    u, _, _ = torch.linalg.svd(a)
    outside = u[:, 20]                                         # orthogonal to Col(a)
    tol = numpy_tolerance(float(torch.linalg.svdvals(a)[0]), a.shape, torch.float32)
    gram = a @ a.T
    assert relative_residual(gram, inside, tol) < 1e-6
    assert relative_residual(gram, outside, tol) == pytest.approx(1.0, abs=1e-6)
    mixed = inside / inside.norm() + outside
    assert relative_residual(gram, mixed, tol) == pytest.approx(2 ** -0.5, abs=1e-6)
    # the least-squares residual computed from a itself (same cut-off) agrees
    rcond = tol / float(torch.linalg.svdvals(a)[0])
    coef = torch.linalg.lstsq(a, mixed[:, None], rcond=rcond, driver="gelsd").solution[:, 0]
    ls = float((mixed - a @ coef).norm() / mixed.norm())
    assert relative_residual(gram, mixed, tol) == pytest.approx(ls, abs=1e-6)
    # a float64 tolerance is below the Gram's resolution: refused, not guessed
    with pytest.raises(ValueError, match="resolution"):
        relative_residual(gram, mixed, numpy_tolerance(1.0, a.shape, F64))


def test_gram_spectrum_resolves_float32_tolerance():
    a = torch.randn(30, 500, dtype=torch.float32, generator=torch.Generator().manual_seed(12))
    gram = a.double() @ a.double().T
    spectrum = GramSpectrum.of(gram)
    tol32 = numpy_tolerance(spectrum.singular_values[0], a.shape, torch.float32)
    assert spectrum.resolves(tol32)
    assert spectrum.rank(tol32) == np.linalg.matrix_rank(a.numpy()) == 30
    # a rank-deficient factor: its zero singular values squared sit in the Gram's rounding,
    # which a float64 tolerance squared cannot be told from
    b = product_of_rank(30, 500, 10, seed=13)
    deficient = GramSpectrum.of(b @ b.T)
    tol64 = numpy_tolerance(deficient.singular_values[0], b.shape, F64)
    assert not deficient.resolves(tol64)


def test_verdict_json_has_the_spec_keys():
    v = dense_rank_verdict(torch.randn(5, 8, dtype=F64))
    v.details["rank_augmented"] = np.int64(5)
    d = json.loads(json.dumps(v.to_dict()))
    for key in ("condition", "n", "rank", "verdict", "tolerance", "precision", "smallest_kept",
                "largest_dropped", "methods", "agree", "shape", "seconds", "rank_augmented"):
        assert key in d
    assert d["shape"] == [5, 8] and d["precision"] == "float64"
    assert set(d["seconds"]) == {"features", "rank"}
    with pytest.raises(ValueError):
        Verdict("x", "maybe", 0, 0, 0.0, "float64", None, None, {}, True, [0, 0])


def test_verdicts_and_condition_reports_refuse_an_unknown_verdict():
    from global_convergence.conditions import ConditionReport
    from global_convergence.linalg import Verdict
    with pytest.raises(ValueError, match="verdict must be one of"):
        ConditionReport("width", "probably")
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict(condition="rank", verdict="yes", rank=1, n=1, tolerance=0.0, precision="float64",
                smallest_kept=None, largest_dropped=None, methods={}, agree=True, shape=[1, 1])
    assert ConditionReport("width", "inconclusive").verified is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rank_verdicts_refuse_non_finite_matrices_by_name(bad):
    a = with_singular_values(6, 9, [3.0, 2.0, 1.0, 1.0, 0.5, 0.2]).to(F64)
    a[2, 4] = bad
    with pytest.raises(NumericalError, match=r"expressivity: the matrix holds 1 non-finite value"):
        dense_rank_verdict(a, condition="expressivity")
    s = torch.ones(6, 2, dtype=F64)
    with pytest.raises(NumericalError, match=r"safe-exploration: .*squared row norms holds 1 non"):
        factor_rank_verdict(KhatriRaoFactor(s, a), condition="safe-exploration")
    g = a.nan_to_num(0.0, 0.0, 0.0) @ a.nan_to_num(0.0, 0.0, 0.0).T
    g[0, 0] = bad
    with pytest.raises(NumericalError, match=r"alignment: the Gram matrix holds 1 non-finite"):
        gram_rank_verdict(g, a.shape, condition="alignment")
    a[2, 4] = 0.0                      # the same matrices, finite: decided
    assert dense_rank_verdict(a).verdict == VERIFIED
    assert factor_rank_verdict(KhatriRaoFactor(s, a)).verdict == VERIFIED


# ------------------------------------------------------------ what a verdict decides: rank = n

def _kahan(n: int = 60, theta: float = 1.2) -> torch.Tensor:
    """Kahan's matrix, on which QR with column pivoting does not reveal the rank: ``|R_nn|`` is
    1e-2 while ``σ_n`` is 3e-10 (columns scaled by ``(1 − 1e-7)^j`` so no pivoting happens)."""
    s, c = np.sin(theta), np.cos(theta)
    k = np.diag(s ** np.arange(n)) @ (np.eye(n) + np.triu(-c * np.ones((n, n)), 1))
    return torch.from_numpy(k @ np.diag((1 - 1e-7) ** np.arange(n)))


def test_ranks_far_short_of_n_are_not_verified_even_when_the_methods_differ():
    assert decide(4000, {"svd": 1229, "qr": 1231}, deciding=1e-14 * 3e-9, tol=3e-9) == NOT_VERIFIED
    # σ decaying through the tolerance: SVD and QR cut it at different places, both far below n
    values = np.logspace(0, -30, 50)
    v = dense_rank_verdict(with_singular_values(50, 80, values))
    assert v.rank == 23 and max(v.methods.values()) <= 25        # of n = 50
    assert v.verdict == NOT_VERIFIED
    assert v.details["margin"] < 1 / RANK_BAND


def test_nth_value_inside_the_band_is_inconclusive():
    values = np.concatenate([np.ones(19), [3e-6]])
    v = dense_rank_verdict(with_singular_values(20, 30, values), tol=1e-6)
    assert v.methods == {"svd": 20, "qr": 20}                  # both reach n ...
    assert v.verdict == INCONCLUSIVE                           # ... but σ_n = 3·tol is too close
    below = dense_rank_verdict(with_singular_values(20, 30, values), tol=1e-5)
    assert below.rank == 19 and below.verdict == INCONCLUSIVE  # σ_n = tol/3 likewise
    far = dense_rank_verdict(with_singular_values(20, 30, values), tol=1e-9)
    assert far.verdict == VERIFIED and far.details["margin"] > RANK_BAND


def test_methods_disagreeing_about_reaching_n_are_inconclusive():
    assert decide(5, {"svd": 5, "qr": 4}, deciding=1.0, tol=1e-10) == INCONCLUSIVE
    kahan = _kahan()
    v = dense_rank_verdict(kahan, tol=1e-4)
    assert v.methods == {"svd": 59, "qr": 60}                  # QR says n, the SVD does not
    assert v.smallest_kept is not None and v.details["margin"] < 1e-5
    assert v.verdict == INCONCLUSIVE
