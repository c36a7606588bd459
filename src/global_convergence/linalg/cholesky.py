"""Shifted Cholesky factorisation of a Gram matrix: the fast certificate of full row rank.

If the floating-point Cholesky factorisation of ``Ĝ − μ I`` succeeds, with ``Ĝ`` the computed Gram
matrix and ``μ ≥ c_chol + δ_G + m`` (``c_chol = γ_{n+2} tr G`` Rump's bound for the factorisation,
``δ_G = γ_k tr G`` the rounding of forming ``Ĝ``, see :mod:`.tolerance`), then the exact Gram
matrix satisfies ``λ_min(G) > m``, i.e. ``σ_min(A) > √m``: the rows of ``A`` are linearly
independent with a certified margin. The factorisation costs ``n³/3`` flops, against
``O(n² cols)`` for an SVD of ``A``.

Two layouts: the dense ``n × n`` matrix (:func:`.lapack.cholesky_lower`), or, when that does not
fit, a left-looking blocked factorisation over column panels ``L[k0:, k0:k1]`` whose Gram blocks
are rebuilt from the factor on demand, so only the lower triangle (``n²/2`` numbers) is ever held.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .factors import GRAM_ROW_CHUNK, RowFactor
from .lapack import cholesky_lower

CHOLESKY_BLOCK = 4096
"""Panel width of the blocked factorisation (one panel of 60,000 rows is ~2 GB in float64)."""
TRSM_ROW_CHUNK = 8192
"""Rows of a panel solved at once in the triangular solve (bounds its temporary)."""
INVERSE_ITERATIONS = 8
"""Steps of inverse iteration for the estimate of ``λ_min`` once the factorisation succeeded."""


@dataclass
class CholeskyFactor:
    """``L`` with ``L Lᵀ = Ĝ − shift·I``, as column panels ``(k0, L[k0:, k0:k0+b])``."""

    panels: list[tuple[int, Tensor]]
    n: int
    shift: float

    def solve(self, v: Tensor) -> Tensor:
        """``(Ĝ − shift·I)⁻¹ v`` by forward and backward substitution over the panels."""
        y = v.clone()
        for k0, p in self.panels:
            b = p.shape[1]
            yk = torch.linalg.solve_triangular(p[:b], y[k0:k0 + b], upper=False)
            y[k0:k0 + b] = yk
            if p.shape[0] > b:
                y[k0 + b:] -= p[b:] @ yk
        for k0, p in reversed(self.panels):
            b = p.shape[1]
            rhs = y[k0:k0 + b]
            if p.shape[0] > b:
                rhs = rhs - p[b:].T @ y[k0 + b:]
            y[k0:k0 + b] = torch.linalg.solve_triangular(p[:b].T, rhs, upper=True)
        return y

    def smallest_eigenvalue_estimate(self, iterations: int = INVERSE_ITERATIONS,
                                     seed: int = 0) -> float:
        """``λ_min(Ĝ)`` estimated by inverse iteration: ``shift + 1/‖(Ĝ − shift·I)⁻¹ x‖`` for a
        unit ``x``. Every iterate gives an upper bound on ``λ_min``; it converges to it."""
        first = self.panels[0][1]
        return inverse_iteration(self.solve, self.n, self.shift, first.dtype, first.device,
                                 iterations, seed)


def inverse_iteration(solve, n: int, shift: float, dtype: torch.dtype, device: torch.device,
                      iterations: int = INVERSE_ITERATIONS, seed: int = 0) -> float:
    """``shift + 1/‖(Ĝ − shift·I)⁻¹ x‖`` iterated from a seeded unit ``x`` (``solve(x)`` applies
    ``(Ĝ − shift·I)⁻¹``): every iterate is an upper bound on ``λ_min(Ĝ)``, converging to it."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=dtype).to(device)
    x /= x.norm()
    estimate = float("inf")
    for _ in range(max(1, iterations)):
        y = solve(x)
        norm = float(y.norm())
        estimate = min(estimate, 1.0 / norm if norm > 0 else float("inf"))
        x = y / norm
    return shift + estimate


@dataclass
class CholeskyOutcome:
    """Result of a shifted factorisation: the factor, or the 0-based index where it broke down
    (the leading ``failed_at × failed_at`` block was positive definite after the shift)."""

    factor: CholeskyFactor | None
    failed_at: int | None

    @property
    def success(self) -> bool:
        return self.factor is not None


def shifted_cholesky(factor: RowFactor, shift: float, block: int | None = None) -> CholeskyOutcome:
    """Cholesky of ``Ĝ − shift·I`` with ``Ĝ = A Aᵀ`` formed from ``factor``.

    ``block=None`` forms the dense ``n × n`` matrix; otherwise a left-looking blocked
    factorisation with panels of ``block`` columns (memory ``≈ n²/2 + n·block/2`` numbers).
    """
    n = factor.rows
    if block is None or block >= n:
        gram = factor.gram()
        gram.diagonal().sub_(shift)
        lower, info = cholesky_lower(gram, overwrite=True)
        del gram
        if info != 0:
            return CholeskyOutcome(None, info - 1)
        return CholeskyOutcome(CholeskyFactor([(0, lower)], n, shift), None)
    return _blocked_cholesky(factor, shift, block)


def _blocked_cholesky(factor: RowFactor, shift: float, block: int) -> CholeskyOutcome:
    """Left-looking blocked Cholesky: for each panel ``k``, rebuild ``G[k0:, k0:k1]`` from the
    factor, subtract ``Σ_{j<k} L[k0:, j] L[k0:k1, j]ᵀ``, factor the diagonal block and solve for
    the rows below it."""
    n = factor.rows
    panels: list[tuple[int, Tensor]] = []
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        b = k1 - k0
        a = factor.gram_block(slice(k0, n), slice(k0, k1))
        a[:b].diagonal().sub_(shift)
        for j0, p in panels:
            rows = p[k0 - j0:]
            a.addmm_(rows, rows[:b].T, alpha=-1.0)
        lower, info = cholesky_lower(a[:b], overwrite=True)
        if info != 0:
            return CholeskyOutcome(None, k0 + info - 1)
        a[:b] = lower
        for s in range(b, a.shape[0], TRSM_ROW_CHUNK):
            e = min(s + TRSM_ROW_CHUNK, a.shape[0])
            a[s:e] = torch.linalg.solve_triangular(lower.T, a[s:e], upper=True, left=False)
        panels.append((k0, a))
    return CholeskyOutcome(CholeskyFactor(panels, n, shift), None)


def blocked_bytes(n: int, block: int, itemsize: int) -> int:
    """Memory of the blocked factorisation: the lower-triangular panels plus the temporaries of
    one Gram row chunk and one triangular-solve chunk."""
    panels = sum((n - k0) * min(block, n - k0) for k0 in range(0, n, block))
    return (panels + (GRAM_ROW_CHUNK + TRSM_ROW_CHUNK) * min(block, n)) * itemsize
