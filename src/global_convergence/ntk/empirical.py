"""The empirical NTK ``M(θ) = J(θ) J(θ)ᵀ`` (the papers' ``K(w)`` / ``M(θ)``) ([K22] §2.1.2).

Methods (all exact up to rounding; all leave the model's mode, parameters and buffers as they
were, and never depend on the caller's ``torch.set_flush_denormal`` setting):

``"structured"``
    Per-layer sums from captured activations and output-gradients for ``nn.Linear``,
    ``nn.Conv2d`` and eval-mode batch norm (:mod:`.structured`); ``J`` is never formed for them.
    Other parameters fall back to per-sample ``torch.func`` Jacobians of just those parameters.
    Needs independent samples, so it is refused when batch norm normalises with batch
    statistics (train mode).
``"jacobian"``
    Rows of ``J`` chunk by chunk (per-sample ``vmap(jacrev)``, or the whole-batch Jacobian when
    samples are coupled), contracted block by block.
``"ntvp"``
    Column blocks ``J Jᵀ E`` by vmapped vjp → jvp over the whole batch; memory ``k × d``.
``"auto"``
    ``"structured"`` when samples are independent (``"jacobian"`` if a layer then runs a different
    number of times than in the structured method's probe pass). When train-mode batch norm
    couples the samples: ``"jacobian"`` (whole-batch engine, exact) if all of ``J`` fits
    ``common.CACHE_BYTES``, else ``"ntvp"`` (exact, memory ``k × d``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..linalg.symmetric import gram
from . import common
from .common import (
    batch_statistics_modules,
    chunk_slices,
    numerics_guard,
    pairwise_blocks,
    trainable_parameters,
    with_dtype,
    zero_subnormals_,
)
from .jacobian import flat_width, jacobian_rows, parameter_dtype
from .products import ntvp_ntk
from .structured import StructureChanged, structured_ntk

METHODS: tuple[str, ...] = ("auto", "structured", "jacobian", "ntvp")
"""Accepted values of ``empirical_ntk(method=...)``."""


def _rows_gram(fa: Tensor, fb: Tensor) -> Tensor:
    """``J_a J_bᵀ`` for row blocks ``(m, c_a, d)``, ``(m, c_b, d)`` → ``(m, c_a, m, c_b)``."""
    m, ca, d = fa.shape
    cb = fb.shape[1]
    a = fa.reshape(m * ca, d)
    prod = gram(a) if fa is fb else a @ fb.reshape(m * cb, d).T
    return prod.view(m, ca, m, cb)


def jacobian_ntk(model: nn.Module, x: Tensor, chunk_size: int | None, coupled: bool,
                 switch_to_ntvp: bool = False) -> Tensor:
    """``J Jᵀ`` from explicit row blocks of ``J``: one symmetric product when all of ``J`` fits
    ``CACHE_BYTES``, else block products ``J_a J_bᵀ`` over pairs of chunks ``a ≤ b``.

    With ``switch_to_ntvp`` and a coupled model whose ``J`` exceeds ``CACHE_BYTES``, uses
    :func:`ntvp_ntk` instead (recomputing whole-batch row blocks would cost more).
    """
    params = trainable_parameters(model)
    n, d = x.shape[0], flat_width(params)
    dtype = parameter_dtype(params, x)
    m, c, rows = jacobian_rows(model, x, list(params), chunk_size, coupled)
    nbytes = n * m * d * torch.empty((), dtype=dtype).element_size()
    if switch_to_ntvp and coupled and nbytes > common.CACHE_BYTES:
        return ntvp_ntk(model, x, chunk_size)
    if d == 0:
        return torch.zeros(m * n, m * n, dtype=dtype, device=x.device)
    if nbytes <= common.CACHE_BYTES:       # all of J fits: one symmetric product
        full = torch.empty(m, n, d, dtype=dtype, device=x.device)
        for s in chunk_slices(n, c):
            zero_subnormals_(rows(s, full[:, s]))
        return gram(full.view(m * n, d))
    out = torch.zeros(m * n, m * n, dtype=dtype, device=x.device)
    return pairwise_blocks(n, m, c, lambda s: zero_subnormals_(rows(s, None)), _rows_gram,
                           lambda t: t.numel() * t.element_size(), out)


def empirical_ntk(model: nn.Module, x: Tensor, *, method: str = "auto",
                  chunk_size: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The empirical NTK ``M = J Jᵀ ∈ R^{(n·m_y)×(n·m_y)}``; entry ``(j·n + i, k·n + i')`` is
    ``⟨∂f(x_i)_j/∂θ, ∂f(x_{i'})_k/∂θ⟩`` over the parameters with ``requires_grad``.

    ``method``: one of :data:`METHODS` (see the module docstring). ``chunk_size``: samples per
    chunk (default: what fits ``CHUNK_BYTES``). ``dtype``: precision of the computation and of the
    result; ``None`` keeps the model's, another dtype evaluates a converted copy of the model
    (e.g. ``torch.float64`` for a reference). Memory beyond the ``(n·m_y)²`` result stays bounded.
    """
    if method not in METHODS:
        raise ValueError(f"unknown NTK method {method!r}; choose one of {', '.join(METHODS)}")
    model, x = with_dtype(model, x, dtype)
    coupled = bool(batch_statistics_modules(model))
    if method == "structured" and coupled:
        raise ValueError("method='structured' needs independent samples, but batch norm uses "
                         f"batch statistics in {', '.join(batch_statistics_modules(model))}; "
                         "use method='auto', 'jacobian' or 'ntvp'")
    with numerics_guard(model):
        if method in ("auto", "structured") and not coupled:
            try:
                return structured_ntk(model, x, chunk_size)
            except StructureChanged:
                if method == "structured":
                    raise
                return jacobian_ntk(model, x, chunk_size, coupled=False)
        if method == "ntvp":
            return ntvp_ntk(model, x, chunk_size)
        return jacobian_ntk(model, x, chunk_size, coupled, switch_to_ntvp=method == "auto")
