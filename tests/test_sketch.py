"""The Khatri–Rao sketch bound σ_n(ϕ) ≥ σ_n(ϕΩ)/‖Ω‖₂: sound against the dense SVD, and the route
that decides where the Gram certificate cannot and the factor route would cost more."""
import numpy as np
import torch

from global_convergence.linalg import VERIFIED, KhatriRaoFactor, factor_rank_verdict
from global_convergence.linalg.sketch import (khatri_rao_sketch_bound, omega_norm_bound,
                                              sketch_flops)

F64 = torch.float64


def _close_rows_factor(delta: float, n: int = 40, m: int = 60) -> KhatriRaoFactor:
    """``S``, ``Z`` (n × m) whose rows 0 and 1 differ by ``delta``: ``σ_n(ϕ) ≈ delta·‖ϕ_0‖``."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(n, m, generator=g, dtype=F64)
    z = torch.randn(n, m, generator=g, dtype=F64)
    s[1] = s[0] + delta * torch.randn(m, generator=g, dtype=F64)
    z[1] = z[0] + delta * torch.randn(m, generator=g, dtype=F64)
    return KhatriRaoFactor(s, z)


def test_omega_norm_bound_is_an_upper_bound():
    g = torch.Generator().manual_seed(1)
    omega_s = torch.randn(7, 50, generator=g, dtype=F64)
    omega_z = torch.randn(9, 50, generator=g, dtype=F64)
    dense = (omega_s[:, None, :] * omega_z[None, :, :]).reshape(63, 50)   # column l: ω_S ⊗ ω_Z
    bound, frobenius = omega_norm_bound(omega_s, omega_z)
    assert float(torch.linalg.matrix_norm(dense, ord=2)) <= bound <= frobenius
    assert frobenius >= float(dense.norm())


def test_sketch_bound_is_below_the_true_singular_values():
    factor = _close_rows_factor(1e-6)
    exact = torch.linalg.svdvals(factor.dense()).numpy()
    bound = khatri_rao_sketch_bound(factor, seed=3)
    assert bound.columns == 80
    assert np.all(bound.lower_bounds <= exact[:40] * (1 + 1e-12))
    assert 0 < bound.lower <= exact[39]
    assert bound.lower > exact[39] / 1000          # and not uselessly loose here


def test_sketch_decides_where_the_gram_certificate_fails():
    factor = _close_rows_factor(1e-8)
    v = factor_rank_verdict(factor, condition="safe-exploration")
    assert "gram-cholesky" in v.details["route"] and "cholesky" not in v.methods
    # no factor route spent; the preconditioned certificate cannot help near-duplicate rows
    # (σ_n itself is tiny): it breaks down at the second of them
    assert v.details["route"] == ("gram-cholesky+preconditioned-gram-cholesky"
                                  "+khatri-rao-sketch")
    assert "cholesky_failed_at" in v.details
    assert v.details["preconditioned"]["cholesky_failed_at"] == 1
    assert v.verdict == VERIFIED and v.methods == {"sketch": 40}
    exact = float(torch.linalg.svdvals(factor.dense())[-1])
    assert v.tolerance * 10 < v.smallest_kept <= exact
    assert v.details["sketch"]["flops"] == sketch_flops(40, 60, 60, 80)
    spectrum = v.to_dict()["spectrum"]
    assert spectrum["certified"] and spectrum["index"][-1] == 40
    # the factor route (SVD and QR of ϕ) agrees that the rank is n
    full = factor_rank_verdict(factor, cross_check=True)
    assert full.methods["svd"] == full.methods["qr"] == 40
