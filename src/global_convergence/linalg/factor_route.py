"""The factor route of the rank decisions: SVD and pivoted QR of ``A`` itself (docs/verifiers.md).

A Gram matrix squares the condition number; where no certificate decides, ``rank(A)`` comes from
``A``: TSQR of ``Aᵀ`` from column chunks (:mod:`.triangular`), then the singular values and the
pivoted-QR diagonal of the ``rows × rows`` factor ``R`` (``R`` has ``A``'s singular values), each
counted against the same tolerance — the papers' two methods.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .dense import pivoted_qr_diagonal, singular_values
from .factors import RowFactor
from .triangular import triangular_factor, tsqr_bytes

TSQR_MIN_COLUMNS = 4096
"""Columns per TSQR chunk at least (fewer, larger QR calls; per-call overhead dominates small
ones), memory permitting; otherwise ``rows`` columns."""


def factor_route_flops(rows: int, cols: int) -> float:
    """Flops of the factor route: Householder QR of ``Aᵀ`` (``2·cols·rows² − 2 rows³/3``, TSQR
    costs the same), then SVD and pivoted QR of the ``rows × rows`` ``R`` (about ``6 rows³``)."""
    n, c = float(rows), float(cols)
    return 2.0 * c * n * n - 2.0 * n ** 3 / 3.0 + 6.0 * n ** 3


def factor_values(factor: RowFactor, budget: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Singular values and pivoted-QR diagonal of ``A`` via TSQR, or None if over ``budget``."""
    n, itemsize = factor.rows, torch.empty((), dtype=factor.dtype).element_size()
    width = max(n, TSQR_MIN_COLUMNS)
    if tsqr_bytes(n, width, itemsize) > budget:
        width = max(1, n)
    if tsqr_bytes(n, width, itemsize) > budget:
        return None
    r = triangular_factor(factor.column_chunks(width))
    return singular_values(r), pivoted_qr_diagonal(r)


def bounded_factor_values(factor: RowFactor, memory: int, flops: float | None,
                          details: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`factor_values` within ``memory`` bytes and ``flops`` (None: no cap); a note in
    ``details`` says why it was skipped."""
    cost = factor_route_flops(factor.rows, factor.cols)
    if flops is not None and cost > flops:
        details["factor_route_skipped"] = {"flops": cost, "flops_budget": flops}
        details["notes"].append(f"the factor route (SVD and pivoted QR of the factor, {cost:.3g} "
                                f"flops) is over the budget of {flops:.3g} flops; skipped")
        return None
    values = factor_values(factor, memory)
    if values is None:
        details["notes"].append("the factor route (SVD and pivoted QR of the factor) needs "
                                "more than factor_memory_budget; skipped")
    return values
