"""The certificates' two cubic kernels on the CPU through SciPy's LAPACK and BLAS.

The Gram certificate's cost is one Cholesky factorisation (``n³/3`` flops), and the row
preconditioner of :mod:`.shift_preconditioning` adds one triangular solve with many right-hand
sides (``n² cols``). On the CPU both run through SciPy's ``potrf`` and ``trsm`` (OpenBLAS,
measured faster than ``torch.linalg`` on the same matrices: docs/performance.md,
``benchmarks/bench_lapack.py``), on as many threads as PyTorch's intra-op pool
(:func:`.symmetric.blas_threads_like_torch`). Both are standard LAPACK/BLAS algorithms (no fast
matrix multiplication), so the backward error bounds the certificates rely on (Higham, Thm. 10.3
for Cholesky, Thm. 8.5 for the triangular solve) hold for any ordering of the inner products,
with one rounding more for the multiplication by the pivot's reciprocal (counted in
:mod:`.tolerance` and :mod:`.shift_preconditioning`). Other devices and dtypes use
``torch.linalg``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .symmetric import blas_threads_like_torch

_POTRF = {torch.float64: "dpotrf", torch.float32: "spotrf"}
_TRSM = {torch.float64: "dtrsm", torch.float32: "strsm"}


def _on_scipy(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _POTRF and t.dim() == 2
               and not t.requires_grad for t in tensors) and len({t.dtype for t in tensors}) == 1


def cholesky_lower(matrix: Tensor, *, overwrite: bool = False) -> tuple[Tensor, int]:
    """``(L, info)`` with ``L Lᵀ = matrix`` (symmetric, both triangles set) as
    ``torch.linalg.cholesky_ex`` returns them: ``L`` lower triangular with zeros above the
    diagonal, ``info = 0`` on success, else the order of the leading minor that is not positive
    definite or not finite (``L`` is then not a factor). ``matrix`` is left as it was, unless
    ``overwrite``: then a contiguous CPU ``matrix`` becomes ``L`` in place (no second ``n × n``
    array), and holds neither ``matrix`` nor a factor when ``info ≠ 0``."""
    if not _on_scipy(matrix):
        lower, info = torch.linalg.cholesky_ex(matrix)
        return lower, int(info)
    from scipy.linalg import lapack

    if overwrite and matrix.is_contiguous():
        out = matrix.detach()
    else:
        out = matrix.detach().clone(memory_format=torch.contiguous_format)
    work = out.numpy()
    # the C-ordered L is the Fortran-ordered Lᵀ: factor the upper triangle of the transposed view
    with blas_threads_like_torch():
        _, info = getattr(lapack, _POTRF[matrix.dtype])(work.T, lower=0, overwrite_a=1, clean=1)
    if info == 0:           # OpenBLAS tests pivots by ``≤ 0`` only, which a NaN passes
        bad = torch.nonzero(~torch.isfinite(out.diagonal()))
        info = int(bad[0]) + 1 if len(bad) else 0
    return out, int(info)


def solve_lower(lower: Tensor, rhs: Tensor) -> Tensor:
    """``L⁻¹ B`` for a lower triangular ``L`` (its upper triangle is not read) and a matrix
    ``B``, as ``torch.linalg.solve_triangular(L, B, upper=False)``."""
    if not _on_scipy(lower, rhs):
        return torch.linalg.solve_triangular(lower, rhs, upper=False)
    from scipy.linalg import blas

    l_np = np.ascontiguousarray(lower.detach().numpy())
    b_np = np.ascontiguousarray(rhs.detach().numpy())
    # row-major L X = B is Xᵀ Lᵀ = Bᵀ in the Fortran views, where Lᵀ is upper triangular
    with blas_threads_like_torch():
        x = getattr(blas, _TRSM[lower.dtype])(1.0, l_np.T, b_np.T, side=1, lower=0, trans_a=0)
    return torch.from_numpy(np.ascontiguousarray(x.T))
