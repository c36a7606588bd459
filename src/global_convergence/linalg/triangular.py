"""The triangular factor of a wide matrix from its column chunks (TSQR), without squaring.

For ``A`` (rows × cols) with ``Aᵀ = Q R``, ``R`` (at most rows × rows) has the singular values of
``A``, and ``A = Rᵀ Qᵀ`` has the left singular vectors of ``Rᵀ``. ``R`` is accumulated chunk by
chunk: ``R ← qr([R; A[:, c]ᵀ]).R``, each step backward stable (Householder QR), so ``R`` is as
accurate as a QR of the whole ``Aᵀ`` — unlike ``A Aᵀ``, whose condition number is squared.
Memory: ``R`` plus one stacked chunk.

QR with column pivoting of ``R`` is QR with column pivoting of ``Aᵀ`` (``Q`` preserves the column
norms that drive the pivoting), i.e. pivoting over the rows (samples) of ``A``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def triangular_factor(chunks: Iterable[Tensor]) -> Tensor:
    """``R`` with ``Aᵀ = Q R`` from the column chunks ``A[:, c]`` (each rows × width)."""
    r: Tensor | None = None
    for chunk in chunks:
        stacked = chunk.T if r is None else torch.cat([r, chunk.T], dim=0)
        r = torch.linalg.qr(stacked, mode="r").R
    if r is None:
        raise ValueError("triangular_factor needs at least one column chunk")
    return r


def tsqr_bytes(rows: int, chunk_cols: int, itemsize: int) -> int:
    """Peak memory of :func:`triangular_factor` and the SVD / pivoted QR of ``R`` that follow:
    ``R`` and the stacked chunk, plus about two more ``rows × rows`` workspaces."""
    return (4 * rows * rows + 2 * (rows + chunk_cols) * rows) * itemsize
