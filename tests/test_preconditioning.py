"""The column-preconditioned Gram certificate σ_n(ϕ) ≥ (σ_n(fl(ϕC)) − error)/‖C‖₂ with
C = C_S ⊗ C_Z: its bounds hold against float64 references, and it decides where the plain Gram
certificate's rounding floor (proportional to tr ϕϕᵀ) hides λ_min behind a few huge directions."""
import math

import torch

from global_convergence.linalg import (NOT_VERIFIED, RANK_BAND, VERIFIED, KhatriRaoFactor,
                                       factor_rank_verdict)
from global_convergence.linalg import rank as rank_module
from global_convergence.linalg.preconditioning import (PRECONDITION_FIRST_GAIN, PRECONDITION_MIN_GAIN,
                                                      cap_side, precondition,
                                                      trace_gain_estimate)

F64, F32 = torch.float64, torch.float32


def _mean_dominated(n: int = 120, m_s: int = 20, m_z: int = 21, mean: float = 1e5,
                    spread: float = 1e-2, dtype: torch.dtype = F64) -> KhatriRaoFactor:
    """Gates near 0.5 and features on a large common mean, like trained features: almost all of
    ``tr ϕϕᵀ`` lies in one direction."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, m_z, generator=g, dtype=F64) + mean * torch.rand(m_z, generator=g,
                                                                         dtype=F64)
    s = 0.5 + spread * torch.randn(n, m_s, generator=g, dtype=F64)
    return KhatriRaoFactor(s.to(dtype), z.to(dtype))


def test_cap_side_bounds_hold_and_cap_the_spectrum():
    m = _mean_dominated(dtype=F32).z
    side = cap_side(m)
    c64 = side.preconditioner.double()
    assert float(torch.linalg.matrix_norm(c64, ord=2)) <= side.norm_bound
    exact = m.double() @ c64                                     # m Ĉ without float32 rounding
    errors = (side.matrix.double() - exact).norm(dim=1)
    assert torch.all(errors <= side.row_errors.double())
    m = _mean_dominated().z                                      # the spectrum, in float64
    side = cap_side(m)
    capped = torch.linalg.eigvalsh(side.matrix.T @ side.matrix)
    original = torch.linalg.eigvalsh(m.T @ m)
    assert side.cap < original[-1] / 10                         # the big direction is capped,
    expected = original.clamp(max=side.cap)                     # the others kept below the cap
    torch.testing.assert_close(capped, expected, rtol=1e-4, atol=1e-6)
    assert (original < side.cap).sum() >= 2


def test_forming_error_bounds_the_rounding_of_the_preconditioned_factor():
    factor = _mean_dominated(dtype=F32)
    pre = precondition(factor)
    c_s = cap_side(factor.s).preconditioner.double()
    c_z = factor.z_cache["capped"].preconditioner.double()
    exact = KhatriRaoFactor(factor.s.double() @ c_s, factor.z.double() @ c_z).dense()
    error = float(torch.linalg.matrix_norm(pre.factor.dense().double() - exact, ord=2))
    assert 0 < error <= pre.forming_error
    assert pre.trace_ratio > 100 and 1 <= pre.norm_bound < 1 + 1e-3


def test_preconditioned_certificate_decides_where_the_gram_certificate_fails():
    factor = _mean_dominated()
    v = factor_rank_verdict(factor, condition="safe-exploration")
    # it lowers the trace enough to go first; the plain certificate, tried alone, fails
    assert v.details["route"] == "preconditioned-gram-cholesky"
    assert v.verdict == VERIFIED and v.methods == {"preconditioned_cholesky": 120}
    plain: dict = {"notes": []}
    tol = v.tolerance
    assert not rank_module._gram_certificate(factor, tol, RANK_BAND, None, None, 0, plain)[
        "certified"] and "cholesky_failed_at" in plain
    exact = float(torch.linalg.svdvals(factor.dense())[-1])
    assert RANK_BAND * v.tolerance < v.smallest_kept <= exact    # a sound lower bound on σ_n
    estimate = v.details["preconditioned"]["sigma_n_estimate"]
    assert v.smallest_kept < estimate and math.isclose(estimate, exact, rel_tol=0.5)
    # the second certificate, at half the estimate, proves a bound near σ_n, far above the band
    assert v.details["preconditioned"]["tightened"]["certified"]
    assert v.smallest_kept >= 0.4 * estimate and v.details["margin"] > 1000
    assert v.details["margin"] == v.smallest_kept / v.tolerance
    assert v.to_dict()["spectrum"]["certified"]
    capped = factor_rank_verdict(factor, fallback_flops=1e9)     # a run's budget: no tightening
    assert capped.verdict == VERIFIED and "tightened" not in capped.details["preconditioned"]
    assert RANK_BAND * capped.tolerance < capped.smallest_kept < v.smallest_kept
    full = factor_rank_verdict(factor, cross_check=True)        # SVD and QR of ϕ agree
    assert full.methods["svd"] == full.methods["qr"] == 120


def test_shared_z_is_preconditioned_once_for_all_outputs():
    factor = _mean_dominated()
    cache: dict = {}
    zz = factor.z @ factor.z.T
    outputs = [KhatriRaoFactor(factor.s * (1 + 0.1 * j), factor.z, zz, cache) for j in range(3)]
    verdicts = [factor_rank_verdict(f) for f in outputs]
    assert all(v.verdict == VERIFIED for v in verdicts)
    capped = cache["capped"]
    assert all(precondition(f).factor.z is capped.matrix for f in outputs)
    assert cache["capped_zz"].shape == (120, 120)


def test_preconditioning_never_hides_dependent_rows():
    factor = _mean_dominated()
    s, z = factor.s.clone(), factor.z.clone()
    s[7], z[7] = s[3], z[3]                                      # a repeated input
    v = factor_rank_verdict(KhatriRaoFactor(s, z))
    assert v.verdict == NOT_VERIFIED and v.rank == 119
    assert "preconditioned_cholesky" not in v.methods
    assert math.isfinite(v.details["preconditioned"]["trace_ratio"])


def test_a_moderate_gain_tries_the_preconditioned_certificate_after_the_plain_one():
    """Gates near 0.5 and inputs on a moderate common mean (gain 3e3 < PRECONDITION_FIRST_GAIN),
    one pair of rows 1e-3 apart: the plain certificate goes first and fails, the preconditioned
    one then decides with a sound bound."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(480, 22, generator=g, dtype=F64) + 10 * torch.rand(22, generator=g, dtype=F64)
    s = 0.5 + 0.05 * torch.randn(480, 22, generator=g, dtype=F64)
    z[7] = z[3] + 1e-3 * torch.randn(22, generator=g, dtype=F64)
    s[7] = s[3]
    factor = KhatriRaoFactor(s, z)
    assert PRECONDITION_MIN_GAIN <= precondition(factor).trace_ratio < PRECONDITION_FIRST_GAIN
    v = factor_rank_verdict(factor, condition="safe-exploration")
    assert v.details["route"] == "gram-cholesky+preconditioned-gram-cholesky"
    assert "cholesky_failed_at" in v.details
    assert v.verdict == VERIFIED and v.methods == {"preconditioned_cholesky": 480}
    exact = float(torch.linalg.svdvals(factor.dense())[-1])
    assert RANK_BAND * v.tolerance < v.smallest_kept <= exact


def test_the_trace_gain_estimate_is_close_to_the_preconditioned_ratio():
    for factor in (_mean_dominated(), KhatriRaoFactor(
            0.5 + 0.2 * torch.randn(200, 9, dtype=F64),
            torch.randn(200, 30, dtype=F64) + 3 * torch.rand(30, dtype=F64))):
        ratio = precondition(factor).trace_ratio
        assert math.isclose(trace_gain_estimate(factor), ratio, rel_tol=0.1)


def test_a_plain_certificate_that_decides_spends_no_capped_gram():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(480, 21, generator=g, dtype=F64) + 3 * torch.rand(21, generator=g, dtype=F64)
    s = 0.5 + 0.2 * torch.randn(480, 24, generator=g, dtype=F64)
    cache: dict = {}
    factor = KhatriRaoFactor(s, z, z @ z.T, cache)
    v = factor_rank_verdict(factor)
    assert v.verdict == VERIFIED and v.details["route"] == "gram-cholesky"
    # only the estimate of the trace gain from the sides' eigenvalues, no capped factor or Gram
    assert "gain" in cache and "capped" not in cache and cache.get("capped_zz") is None
