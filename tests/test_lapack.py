"""SciPy's potrf and trsm behind the certificates (global_convergence.linalg.lapack) give what
torch.linalg gives: the same factor to rounding, the same breakdown index, the input intact."""
import pytest
import torch

from global_convergence.linalg.lapack import cholesky_lower, solve_lower


def spd(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 7, generator=g, dtype=torch.float64)
    return (a @ a.T).to(dtype)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_the_factor_is_torchs_to_rounding_with_zeros_above_the_diagonal(dtype, rel):
    g = spd(300, dtype)
    kept = g.clone()
    lower, info = cholesky_lower(g)
    reference, ref_info = torch.linalg.cholesky_ex(g)
    assert info == int(ref_info) == 0
    assert lower.dtype == dtype and lower.is_contiguous()
    assert torch.equal(lower, lower.tril())
    assert float((lower - reference).abs().max()) <= rel * float(reference.abs().max())
    assert torch.equal(g, kept)                       # the matrix is left as it was


def test_a_matrix_that_is_not_positive_definite_breaks_down_where_torchs_does():
    g = spd(200, torch.float64)
    g[120, 120] = -1.0                                # the leading 121 × 121 minor fails
    _, info = cholesky_lower(g)
    _, ref_info = torch.linalg.cholesky_ex(g)
    assert info == int(ref_info) == 121


def test_a_view_of_a_wider_tensor_is_factored():
    wide = torch.zeros(150, 260, dtype=torch.float64)
    wide[:, :150] = spd(150, torch.float64, seed=3)
    view = wide[:, :150]                              # row stride 260: not contiguous
    lower, info = cholesky_lower(view)
    assert info == 0
    assert torch.allclose(lower @ lower.T, view, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
def test_the_triangular_solve_is_torchs_and_reads_only_the_lower_triangle(dtype, rel):
    lower = torch.linalg.cholesky(spd(120, torch.float64, seed=1)).to(dtype)
    rhs = torch.randn(120, 333, generator=torch.Generator().manual_seed(2), dtype=dtype)
    reference = torch.linalg.solve_triangular(lower, rhs, upper=False)
    littered = lower + torch.triu(torch.full_like(lower, 7.0), diagonal=1)
    x = solve_lower(littered, rhs)
    assert x.shape == rhs.shape and x.dtype == dtype
    assert float((x - reference).abs().max()) <= rel * float(reference.abs().max())


def test_other_dtypes_fall_back_to_torch():
    g = spd(40, torch.float64).to(torch.complex128)
    lower, info = cholesky_lower(g)
    assert info == 0 and torch.allclose(lower @ lower.mH, g)


def test_overwrite_factors_in_place_and_gives_the_same_factor():
    g = spd(250, torch.float64, seed=4)
    copied, _ = cholesky_lower(g)
    pointer = g.data_ptr()
    lower, info = cholesky_lower(g, overwrite=True)
    assert info == 0 and lower.data_ptr() == pointer    # no second n × n array
    assert torch.equal(lower, copied)


@pytest.mark.parametrize("where", [(0, 0), (3, 1)])
def test_a_nan_breaks_the_factorisation_down_where_torchs_does(where):
    g = spd(30, torch.float64)
    i, j = where
    g[i, j] = g[j, i] = float("nan")
    _, info = cholesky_lower(g)
    _, ref_info = torch.linalg.cholesky_ex(g)
    assert info == int(ref_info) == max(i, j) + 1


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_one_by_one_matrices(n):
    g = spd(n, torch.float64) if n else torch.zeros(0, 0, dtype=torch.float64)
    lower, info = cholesky_lower(g)
    assert info == 0 and lower.shape == (n, n)
    assert torch.allclose(lower @ lower.T, g)
    assert solve_lower(lower, torch.ones(n, 2, dtype=torch.float64)).shape == (n, 2)


def test_a_single_non_contiguous_right_hand_side():
    lower = torch.linalg.cholesky(spd(60, torch.float64, seed=5))
    rhs = torch.randn(60, 3, dtype=torch.float64)[:, 1:2]            # (60, 1), row stride 3
    assert not rhs.is_contiguous()
    expected = torch.linalg.solve_triangular(lower, rhs, upper=False)
    assert torch.allclose(solve_lower(lower, rhs), expected, rtol=1e-10, atol=1e-12)
