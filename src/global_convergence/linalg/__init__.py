"""Numerical rank with honest verdicts (docs/verifiers.md): SVD, QR with column pivoting, Gram matrices
with a Cholesky certificate, TSQR of wide factors, and least-squares residuals.

Every decision states its tolerance (numpy's ``σ_max · max(rows, cols) · ε`` unless given), its
precision, the singular values on either side of the cut and the methods used; a deciding value
within a factor :data:`RANK_BAND` of the tolerance, or methods that disagree about whether the
rank reaches the target, give *inconclusive* (:func:`decide`).

Entry points: :func:`dense_rank_verdict` (a matrix in memory), :func:`factor_rank_verdict` (a
:class:`RowFactor`, e.g. the :class:`KhatriRaoFactor` of safe exploration, decided by its Gram
matrix with fallback to the factor), :func:`gram_rank_verdict` (a Gram matrix alone),
:func:`relative_residual`.
"""
from .cholesky import CHOLESKY_BLOCK, CholeskyFactor, shifted_cholesky
from .dense import (cut, decide, dense_rank_verdict, pivoted_qr_diagonal, require_finite,
                    singular_values, svd_rank, qr_rank)
from .factors import DenseFactor, KhatriRaoFactor, RowFactor
from .factor_route import factor_route_flops
from .rank import (DENSE_GRAM_BYTES, FACTOR_MEMORY_BUDGET, factor_rank_verdict, gram_rank_verdict,
                   largest_gram_eigenvalue)
from .spectrum import GramSpectrum, projection_residual, relative_residual
from .tolerance import (CHOLESKY_SAFETY, RANK_BAND, machine_epsilon, numpy_tolerance,
                        precision_name)
from .triangular import triangular_factor
from .verdict import INCONCLUSIVE, NOT_VERIFIED, VERDICTS, VERIFIED, Verdict, jsonable

__all__ = ["CHOLESKY_BLOCK", "CHOLESKY_SAFETY", "DENSE_GRAM_BYTES", "FACTOR_MEMORY_BUDGET",
           "INCONCLUSIVE", "NOT_VERIFIED", "RANK_BAND", "VERDICTS", "VERIFIED", "CholeskyFactor",
           "DenseFactor", "GramSpectrum", "KhatriRaoFactor", "RowFactor", "Verdict", "cut",
           "decide", "dense_rank_verdict", "factor_rank_verdict", "factor_route_flops",
           "gram_rank_verdict", "jsonable",
           "largest_gram_eigenvalue", "machine_epsilon", "numpy_tolerance", "pivoted_qr_diagonal",
           "precision_name", "projection_residual", "qr_rank", "relative_residual", "require_finite",
           "shifted_cholesky", "singular_values", "svd_rank", "triangular_factor"]
